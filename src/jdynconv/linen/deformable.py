"""flax.linen deformable convolutions over :func:`jdynconv.deform_conv` and :func:`jdynconv.dcnv3`: DeformConv
(torchvision's ``DeformConv2d``; mmcv's ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack``) and DCNv3
(InternImage's ``DCNv3_pytorch``), N-d.

The attribute checks and the DCNv3 block's forward pass are here once; :mod:`jdynconv.nnx.deformable` calls
them with its own submodules.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdynconv import _batch_norm, _checks
from jdynconv._dcnv3 import dcnv3
from jdynconv._deform import deform_conv
from jdynconv._dtypes import canonicalize_dtype, promote_dtype
from jdynconv.linen._common import Dtype, Initializer, default_kernel_init, ones, zeros
from jdynconv.linen._depthwise import DepthwiseConv


def exact_gelu(x: jax.Array) -> jax.Array:
    """GELU with the exact ``erf`` (PyTorch's ``nn.GELU()``, InternImage's ``act_layer="GELU"``), not
    :func:`jax.nn.gelu`'s default tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


# InternImage's _reset_parameters: xavier_uniform_ on input_proj and output_proj (the same law on Flax's
# (in, out) kernel as on PyTorch's (out, in) weight: it depends on fan_in + fan_out only).
xavier_uniform: Initializer = nn.initializers.xavier_uniform()

NORMS = ("layer", "batch")
# InternImage's build_norm_layer: nn.LayerNorm(C, eps=1e-6) for "LN", nn.BatchNorm2d(C) for "BN" (eps 1e-5,
# momentum 0.1, which is Flax's 0.9).
LAYER_NORM_EPSILON = 1e-6
BATCH_NORM_EPSILON = 1e-5
BATCH_NORM_MOMENTUM = 0.9


def torch_batch_norm(
    inputs: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    *,
    training: bool,
    axis_name: str | tuple[str, ...] | None,
    dtype: Dtype | None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """``nn.BatchNorm2d`` (InternImage's ``"BN"``) over the last axis: the output and, when ``training`` on a
    non-empty batch, the new running ``(mean, var)`` (None otherwise: they stay as they are).

    :func:`jdynconv._batch_norm.batch_norm` with PyTorch's running statistics: the running variance moves
    towards the unbiased batch variance (``n / (n - 1)`` times Flax's biased one); the batch is normalised by
    the biased one, as both do. Momentum and epsilon are ``nn.BatchNorm2d``'s defaults. The statistics are
    computed in at least float32 from the inputs as given and the result cast to the dtype Flax's BatchNorm
    gives (``dtype``, else the inputs' and parameters' promoted). An empty batch has no statistics to
    normalise by or learn from: it is normalised by the running ones, which stay as they were (PyTorch's
    BatchNorm on a batch of size 0).
    """
    out_dtype = canonicalize_dtype(inputs, scale, bias, dtype=dtype)
    training = training and inputs.shape[0] > 0
    norm = _batch_norm.NormConfig(BATCH_NORM_MOMENTUM, BATCH_NORM_EPSILON, True, axis_name)
    values = inputs.astype(_batch_norm.statistics_dtype(inputs.dtype))
    out, stats = _batch_norm.batch_norm(values, scale, bias, mean, var, training=training, norm=norm)
    return out.astype(out_dtype), (stats if training else None)


class TorchBatchNorm(nn.Module):
    """DCNv3's ``norm="batch"``: :func:`torch_batch_norm` with Flax's BatchNorm variables (``params``
    ``scale``, ``bias``; ``batch_stats`` ``mean``, ``var``, float32), so that a model keeps PyTorch's running
    statistics. As ``flax.linen.BatchNorm``, no collective over ``axis_name`` while initialising (which runs
    outside the ``shard_map``) and no running-statistics update either."""

    use_running_average: bool
    axis_name: str | tuple[str, ...] | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        features = (inputs.shape[-1],)
        scale = self.param("scale", ones, features, self.param_dtype)
        bias = self.param("bias", zeros, features, self.param_dtype)
        mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        initializing = self.is_initializing()
        out, stats = torch_batch_norm(
            inputs,
            scale,
            bias,
            mean.value,
            var.value,
            training=not self.use_running_average,
            axis_name=None if initializing else self.axis_name,
            dtype=self.dtype,
        )
        if stats is not None and not initializing:
            mean.value, var.value = stats
        return out


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"`{name}` must be a bool, got {value!r}.")


# --- DeformConv -----------------------------------------------------------------------------------------------


def check_deform_conv_config(
    *,
    features: Any,
    kernel_size: Any,
    strides: Any,
    padding: Any,
    kernel_dilation: Any,
    feature_group_count: Any,
    use_bias: Any,
    offset_groups: Any,
    use_mask: Any,
    predict_offsets: Any,
) -> None:
    """DeformConv's attributes, at construction (before the inputs fix the number of spatial dims)."""
    _checks.check_conv_attributes(
        features=features,
        kernel_size=kernel_size,
        strides=strides,
        padding=padding,
        kernel_dilation=kernel_dilation,
        feature_group_count=feature_group_count,
    )
    _checks.check_positive_int("offset_groups", offset_groups)
    for name, value in (("use_bias", use_bias), ("use_mask", use_mask), ("predict_offsets", predict_offsets)):
        check_bool(name, value)
    if use_mask and not predict_offsets:
        raise ValueError(
            "`use_mask` applies to predicted offsets only (the offset conv then also predicts the mask); with "
            "`predict_offsets=False` pass the mask to the call instead, as torchvision's DeformConv2d takes it."
        )


def offset_channels(offset_groups: int, kernel_size: Sequence[int], use_mask: bool) -> int:
    """The offset conv's output channels: ``G_off * K * N`` offsets, then ``G_off * K`` mask logits."""
    return offset_groups * math.prod(kernel_size) * (len(kernel_size) + int(use_mask))


def split_offset_conv(
    out: jax.Array, offset_groups: int, kernel_size: Sequence[int], use_mask: bool
) -> tuple[jax.Array, jax.Array | None]:
    """``(offsets, mask)`` from the offset conv's output: the first ``G_off * K * N`` channels are the offsets
    in :func:`jdynconv.deform_conv`'s layout, the last ``G_off * K`` the mask logits (mmcv's
    ``ModulatedDeformConv2dPack``: ``o1, o2, mask = chunk(out, 3)``, offsets ``cat(o1, o2)``)."""
    if not use_mask:
        return out, None
    count = offset_groups * math.prod(kernel_size) * len(kernel_size)
    return out[..., :count], jax.nn.sigmoid(out[..., count:])


def deform_conv_offsets(predict_offsets: bool, offsets: Any, mask: Any) -> tuple[jax.Array | None, jax.Array | None]:
    """The call's ``offsets`` and ``mask``, checked against ``predict_offsets``: arrays when given."""
    if predict_offsets:
        for name, value in (("offsets", offsets), ("mask", mask)):
            if value is not None:
                raise ValueError(
                    f"`{name}` must not be passed: the layer predicts offsets and mask with its `conv_offset` "
                    "(`predict_offsets=True`); build it with `predict_offsets=False` to pass your own."
                )
        return None, None
    if offsets is None:
        raise ValueError(
            "`offsets` (B, *out_spatial, offset_groups * K * N) are required: the layer has "
            "`predict_offsets=False`, so the call passes them (and optionally `mask`)."
        )
    offsets = _checks.as_array("offsets", offsets)
    _checks.check_float_dtype("offsets", offsets)
    if mask is not None:
        mask = _checks.as_array("mask", mask)
        _checks.check_float_dtype("mask", mask)
    return offsets, mask


def check_offset_groups(inputs: jax.Array, offset_groups: int) -> None:
    if inputs.shape[-1] % offset_groups:
        raise ValueError(
            f"`inputs` channels (={inputs.shape[-1]}) must be divisible by `offset_groups` (={offset_groups})."
        )


class DeformConv(nn.Module):
    """Deformable convolution (DCNv1, Dai et al. 2017; with ``use_mask`` DCNv2, Zhu et al. 2019), N-d.

    Every kernel tap ``t`` (kernel index ``k_t``) of output position ``o`` reads the input at ``o * strides -
    pad_low + k_t * kernel_dilation + offset[o, g, t]`` (channel group ``g`` of ``offset_groups``), multilinearly
    with zeros outside, scaled by ``mask[o, g, t]`` when there is a mask; the samples are contracted with
    ``kernel`` as a convolution contracts its window (:func:`jdynconv.deform_conv`, torchvision's
    ``deform_conv2d`` arithmetic).

    With ``predict_offsets`` (the default; mmcv's ``DeformConv2dPack``, and with ``use_mask``
    ``ModulatedDeformConv2dPack``) the offsets, and the mask, come from ``conv_offset``, a ``flax.linen.Conv``
    over the inputs with the layer's kernel size, strides, padding and dilation, zero-initialised so that the
    first call is a plain convolution. Its ``G_off * K * (N + use_mask)`` output channels are the offsets in
    :func:`jdynconv.deform_conv`'s channels-last layout (offset group, then tap, then coordinate) and then
    the mask logits (group, then tap); the mask is their ``sigmoid``. Without ``predict_offsets``
    (torchvision's ``DeformConv2d``) the call passes the offsets and optionally a mask.

    Variables (``params``): ``kernel (*kernel_size, C_in // G, features)``, ``bias (features,)`` (if
    ``use_bias``), and with ``predict_offsets`` ``conv_offset``: ``kernel (*kernel_size, C_in, G_off * K *
    (N + use_mask))``, ``bias (G_off * K * (N + use_mask),)``; ``K = prod(kernel_size)``, N spatial dims.

    Attributes:
      features: output channels C_out.
      kernel_size: int (same in every spatial dim) or one int per spatial dim.
      strides: an int or one int per spatial dim.
      padding: ``"SAME"`` (the default, as every jdynconv layer; torchvision's and mmcv's default is 0),
        ``"VALID"``, ``"CAUSAL"`` (1-D), an int, one int per spatial dim or one ``(low, high)`` per spatial
        dim; the offset conv has the same.
      kernel_dilation: an int or one int per spatial dim (PyTorch's ``dilation``).
      feature_group_count: G; ``C_in`` and ``features`` must be multiples of it (PyTorch's ``groups``).
      use_bias: whether the conv has a bias.
      offset_groups: G_off, the channel groups with their own offsets and mask (torchvision's
        ``offset_groups``, mmcv's ``deform_groups``); divides ``C_in``. It sizes ``conv_offset``; without
        ``predict_offsets`` the offsets' size gives the number of groups at each call, as torchvision reads it.
      use_mask: whether ``conv_offset`` also predicts a mask (DCNv2). Only with ``predict_offsets``; without
        it, a mask is whatever the call passes.
      predict_offsets: whether the layer predicts offsets (and mask) with ``conv_offset``; False: the call
        passes them.
      dtype: the computation dtype (None: inferred from the inputs and parameters, as ``flax.linen.Conv``).
      param_dtype: the parameters' dtype.
      precision: passed to ``jax.lax``'s convolutions and matmuls.
      kernel_init: the kernel's initialiser.
      bias_init: the bias's initialiser.
      offset_kernel_init: ``conv_offset``'s kernel initialiser (zeros: mmcv's ``init_offset``, DCNv2's).
      offset_bias_init: ``conv_offset``'s bias initialiser (zeros).
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: _checks.IntOrSequence = 1
    padding: _checks.PaddingLike = "SAME"
    kernel_dilation: _checks.IntOrSequence = 1
    feature_group_count: int = 1
    use_bias: bool = True
    offset_groups: int = 1
    use_mask: bool = False
    predict_offsets: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = zeros
    offset_kernel_init: Initializer = zeros
    offset_bias_init: Initializer = zeros

    def __post_init__(self) -> None:
        check_deform_conv_config(  # at construction: every attribute error names the attribute
            features=self.features,
            kernel_size=self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            kernel_dilation=self.kernel_dilation,
            feature_group_count=self.feature_group_count,
            use_bias=self.use_bias,
            offset_groups=self.offset_groups,
            use_mask=self.use_mask,
            predict_offsets=self.predict_offsets,
        )
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: jax.Array, offsets: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
        """Applies the layer.

        Args:
          inputs: ``(B, *spatial, C_in)``, 1 to 3 spatial dims.
          offsets: ``(B, *out_spatial, G_off * K * N)`` in :func:`jdynconv.deform_conv`'s channels-last layout;
            only without ``predict_offsets``, and then required.
          mask: ``(B, *out_spatial, G_off * K)``, used as given (DCNv2 passes a sigmoid), or None; only without
            ``predict_offsets``.

        Returns:
          ``(B, *out_spatial, features)``, ``out_spatial`` as a convolution's with the same arguments.
        """
        inputs = _checks.as_array("inputs", inputs)
        in_features = num_spatial = None
        if self.has_variable("params", "kernel"):  # before self.param, whose shape error says less
            shape = self.get_variable("params", "kernel").shape
            num_spatial, in_features = len(shape) - 2, shape[-2] * self.feature_group_count
        _checks.check_layer_inputs(inputs, in_features, self.feature_group_count, num_spatial)
        if self.predict_offsets:
            check_offset_groups(inputs, self.offset_groups)
        offsets, mask = deform_conv_offsets(self.predict_offsets, offsets, mask)
        rank = inputs.ndim - 2
        kernel_size = _checks.canonicalize_ints(self.kernel_size, rank, "kernel_size")
        strides = _checks.canonicalize_ints(self.strides, rank, "strides")
        dilation = _checks.canonicalize_ints(self.kernel_dilation, rank, "kernel_dilation")
        pads = _checks.canonicalize_padding(
            self.padding,
            spatial_shape=inputs.shape[1:-1],
            kernel_size=kernel_size,
            strides=strides,
            kernel_dilation=dilation,
            input_dilation=(1,) * rank,
        )
        in_channels = inputs.shape[-1]
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (*kernel_size, in_channels // self.feature_group_count, self.features),
            self.param_dtype,
        )
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        if self.predict_offsets:
            out = nn.Conv(
                offset_channels(self.offset_groups, kernel_size, self.use_mask),
                kernel_size,
                strides=strides,
                padding=pads,
                kernel_dilation=dilation,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                precision=self.precision,
                kernel_init=self.offset_kernel_init,
                bias_init=self.offset_bias_init,
                name="conv_offset",
            )(inputs)
            offsets, mask = split_offset_conv(out, self.offset_groups, kernel_size, self.use_mask)
        inputs, kernel, bias, offsets, mask = promote_dtype((inputs, kernel, bias, offsets, mask), dtype=self.dtype)
        return deform_conv(
            inputs,
            offsets,
            kernel,
            bias,
            mask=mask,
            strides=strides,
            padding=pads,
            kernel_dilation=dilation,
            feature_group_count=self.feature_group_count,
            precision=self.precision,
        )


# --- DCNv3 ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DCNv3Geometry:
    """DCNv3's sizes for one number of spatial dims, one int per dim."""

    kernel_size: tuple[int, ...]
    dw_kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: tuple[int, ...]
    kernel_dilation: tuple[int, ...]
    taps: int  # T = prod(kernel_size) - remove_center

    @property
    def dw_padding(self) -> tuple[tuple[int, int], ...]:
        """The depthwise conv's: ``(dw_kernel_size - 1) // 2`` on each side, stride 1 (the original's)."""
        return tuple(((k - 1) // 2, (k - 1) // 2) for k in self.dw_kernel_size)


def check_dcnv3_config(
    *,
    channels: Any,
    kernel_size: Any,
    dw_kernel_size: Any,
    strides: Any,
    padding: Any,
    kernel_dilation: Any,
    groups: Any,
    offset_scale: Any,
    activation: Any,
    norm: Any,
    center_feature_scale: Any,
    remove_center: Any,
) -> None:
    """DCNv3's attributes, at construction (before the inputs fix the number of spatial dims)."""
    _checks.check_positive_int("channels", channels)
    _checks.check_positive_int("groups", groups)
    if channels % groups:
        raise ValueError(f"`channels` (={channels}) must be divisible by `groups` (={groups}).")
    for name, value in (("kernel_size", kernel_size), ("strides", strides), ("kernel_dilation", kernel_dilation)):
        _checks.check_spatial_ints(name, value)
    if dw_kernel_size is not None:
        _checks.check_spatial_ints("dw_kernel_size", dw_kernel_size)
    dw = kernel_size if dw_kernel_size is None else dw_kernel_size
    if any(k % 2 == 0 for k in _as_tuple(dw)):
        raise ValueError(
            f"`dw_kernel_size` must be odd (or None: `kernel_size`, then odd): the depthwise conv pads "
            f"(dw_kernel_size - 1) // 2 on each side and must keep the input's size, got {dw!r}."
        )
    if isinstance(padding, str):
        raise ValueError(
            f"`padding` must be an int or one int per spatial dim (zeros on both sides, as InternImage's `pad`), "
            f"got {padding!r}."
        )
    padding_rank = len(padding) if isinstance(padding, Sequence) else 1
    _checks.canonicalize_ints(padding, padding_rank, "padding", minimum=0)
    _checks.check_positive_number("offset_scale", offset_scale)
    if not callable(activation):
        raise TypeError(f"`activation` must be a callable (e.g. jdynconv.linen.exact_gelu), got {activation!r}.")
    if norm not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS} (InternImage's 'LN' and 'BN'), got {norm!r}.")
    check_bool("center_feature_scale", center_feature_scale)
    check_bool("remove_center", remove_center)
    if remove_center and any(k % 2 == 0 for k in _as_tuple(kernel_size)):
        raise ValueError(f"`remove_center` needs odd kernel sizes (a centre tap), got `kernel_size` {kernel_size!r}.")


def _as_tuple(value: Any) -> tuple[int, ...]:
    return (value,) if _checks.is_int(value) else tuple(value)


def dcnv3_geometry(
    rank: int,
    *,
    kernel_size: Any,
    dw_kernel_size: Any,
    strides: Any,
    padding: Any,
    kernel_dilation: Any,
    remove_center: bool,
) -> DCNv3Geometry:
    kernel_t = _checks.canonicalize_ints(kernel_size, rank, "kernel_size")
    dw = kernel_t if dw_kernel_size is None else _checks.canonicalize_ints(dw_kernel_size, rank, "dw_kernel_size")
    return DCNv3Geometry(
        kernel_size=kernel_t,
        dw_kernel_size=dw,
        strides=_checks.canonicalize_ints(strides, rank, "strides"),
        padding=_checks.canonicalize_ints(padding, rank, "padding", minimum=0),
        kernel_dilation=_checks.canonicalize_ints(kernel_dilation, rank, "kernel_dilation"),
        taps=math.prod(kernel_t) - int(remove_center),
    )


def check_dcnv3_output_size(spatial: Sequence[int], geometry: DCNv3Geometry) -> None:
    """DCNv3 predicts its offsets and mask at the input's resolution, so the sampling grid must have it."""
    spatial = tuple(spatial)
    out = _checks.conv_output_shape(
        spatial,
        geometry.kernel_size,
        strides=geometry.strides,
        pads=tuple((p, p) for p in geometry.padding),
        kernel_dilation=geometry.kernel_dilation,
        input_dilation=(1,) * len(spatial),
    )
    if out != spatial:
        raise ValueError(
            f"`strides` {geometry.strides}, `padding` {geometry.padding} and `kernel_dilation` "
            f"{geometry.kernel_dilation} must keep the spatial size with `kernel_size` {geometry.kernel_size}: "
            f"DCNv3 predicts its offsets and mask at the input's size {spatial}, but they give a sampling grid of "
            f"{out} (stride 1 and 2 * padding == kernel_dilation * (kernel_size - 1) keep it). InternImage's module "
            "fails there too, or broadcasts silently where the grid size is 1; refused here."
        )


@dataclasses.dataclass(frozen=True)
class DCNv3Parts:
    """The DCNv3 block's layers as callables, from either API."""

    input_proj: Callable[[jax.Array], jax.Array]
    dw_conv: Callable[[jax.Array], jax.Array]
    dw_norm: Callable[[jax.Array], jax.Array]
    activation: Callable[[jax.Array], jax.Array]
    offset: Callable[[jax.Array], jax.Array]
    mask: Callable[[jax.Array], jax.Array]
    output_proj: Callable[[jax.Array], jax.Array]
    center_feature_scale_proj: Callable[[jax.Array], jax.Array] | None


def dcnv3_block(
    parts: DCNv3Parts,
    inputs: jax.Array,
    geometry: DCNv3Geometry,
    *,
    groups: int,
    offset_scale: float,
    remove_center: bool,
    dtype: Dtype | None,
) -> jax.Array:
    """``DCNv3_pytorch.forward``, channels-last and N-d: ``(B, *spatial, C) -> (B, *spatial, C)``."""
    x = parts.input_proj(inputs)
    x_proj = x
    x1 = parts.activation(parts.dw_norm(parts.dw_conv(inputs)))
    offsets = parts.offset(x1)
    logits = parts.mask(x1)
    mask = jax.nn.softmax(logits.reshape(*logits.shape[:-1], groups, geometry.taps), axis=-1).reshape(logits.shape)
    x, x_proj, offsets, mask = promote_dtype((x, x_proj, offsets, mask), dtype=dtype)
    x = dcnv3(
        x,
        offsets,
        mask,
        kernel_size=geometry.kernel_size,
        strides=geometry.strides,
        padding=geometry.padding,
        kernel_dilation=geometry.kernel_dilation,
        groups=groups,
        offset_scale=offset_scale,
        remove_center=remove_center,
    )
    if parts.center_feature_scale_proj is not None:
        scale = jax.nn.sigmoid(parts.center_feature_scale_proj(x1))  # (B, *spatial, groups)
        scale = jnp.repeat(scale, x.shape[-1] // groups, axis=-1).astype(x.dtype)  # each group's channels
        x = x * (1 - scale) + x_proj * scale
    return parts.output_proj(x)


class DCNv3(nn.Module):
    """InternImage's DCNv3 block (Wang et al., CVPR 2023; ``DCNv3_pytorch``), channels-last, N-d.

    The original's forward pass, on ``(B, *spatial, C)`` inputs::

        x      = input_proj(inputs)                                       Dense C -> C
        x1     = activation(dw_norm(dw_conv(inputs)))                     depthwise conv, stride 1
        offset = offset(x1)                                               Dense C -> groups * T * N
        mask   = softmax over each group's T taps of mask(x1)             Dense C -> groups * T
        x      = dcnv3(x, offset, mask, ...)                              jdynconv.dcnv3
        (center_feature_scale: s = sigmoid(center_feature_scale_proj(x1)), each group's value on its
         C / groups channels; x = x * (1 - s) + input_proj(inputs) * s)
        out    = output_proj(x)                                           Dense C -> C

    with ``T = prod(kernel_size) - remove_center`` taps and N spatial dims; the offsets' and mask's layout is
    InternImage's (:func:`jdynconv.dcnv3`). The offsets and mask are predicted at the input's resolution, so
    the sampling grid must keep it: stride 1 and ``2 * padding == kernel_dilation * (kernel_size - 1)`` (a
    ValueError otherwise, where InternImage's module fails, or broadcasts silently when the grid has size 1).

    Variables: ``params``: ``input_proj``, ``output_proj`` (``kernel (C, C)``, ``bias (C,)``), ``dw_conv``
    (``kernel (*dw_kernel_size, 1, C)``, ``bias (C,)``), ``dw_norm`` (``scale``, ``bias`` ``(C,)``),
    ``offset`` (``kernel (C, groups * T * N)``, ``bias``), ``mask`` (``kernel (C, groups * T)``, ``bias``),
    with ``center_feature_scale`` ``center_feature_scale_proj`` (``kernel (C, groups)``, ``bias
    (groups,)``); with ``norm="batch"``, ``batch_stats``: ``dw_norm`` (``mean``, ``var`` ``(C,)``).

    Attributes:
      channels: C, the input and output channels.
      kernel_size: int (same in every spatial dim) or one int per spatial dim: the deformable sampling's.
      dw_kernel_size: the depthwise conv's, odd; None: ``kernel_size``.
      strides: an int or one int per spatial dim (InternImage's ``stride``); must keep the size (see above).
      padding: an int or one int per spatial dim, zeros on both sides (InternImage's ``pad``).
      kernel_dilation: an int or one int per spatial dim (InternImage's ``dilation``).
      groups: the channel groups, each with its own offsets and mask (InternImage's ``group``); divides
        ``channels``.
      offset_scale: scales the offsets and the regular grid about the centre tap.
      activation: applied after ``dw_norm`` (default :func:`exact_gelu`: PyTorch's ``nn.GELU()``).
      norm: ``"layer"`` (LayerNorm, epsilon 1e-6: InternImage's ``"LN"``) or ``"batch"`` (BatchNorm with
        ``nn.BatchNorm2d``'s defaults: epsilon 1e-5, momentum 0.1, i.e. Flax's 0.9; InternImage's ``"BN"``).
        The BatchNorm keeps PyTorch's running statistics: its running variance moves towards the unbiased
        batch variance (Flax's BatchNorm: the biased one), so that a ported model trains as the original.
      center_feature_scale: mix the input projection back in per group with a learned sigmoid weight.
      remove_center: leave out the centre tap (odd kernel sizes).
      use_running_average: the BatchNorm's mode (``norm="batch"`` only); may instead be given at call time.
      axis_name: as ``flax.linen.BatchNorm``'s (``norm="batch"`` only): inside ``jax.shard_map``, the mesh
        axis (or axes) the batch is split over.
      dtype: the computation dtype (None: inferred from the inputs and parameters, as ``flax.linen.Dense``).
      param_dtype: the parameters' dtype.
      precision: passed to the Dense layers' matmuls (the depthwise conv is elementwise products, which it does
        not affect).
      kernel_init: ``input_proj``'s and ``output_proj``'s kernel initialiser (InternImage's xavier uniform).
      bias_init: ``input_proj``'s and ``output_proj``'s bias initialiser (zeros).
      dw_kernel_init: the depthwise conv's kernel initialiser (Flax's default; InternImage leaves PyTorch's).
      dw_bias_init: the depthwise conv's bias initialiser.
      offset_kernel_init: the ``offset``, ``mask`` and ``center_feature_scale_proj`` kernels' initialiser
        (zeros, as InternImage: the first call samples the regular grid with equal weights).
      offset_bias_init: their biases' initialiser (zeros).
    """

    channels: int
    kernel_size: int | Sequence[int] = 3
    dw_kernel_size: int | Sequence[int] | None = None
    strides: _checks.IntOrSequence = 1
    padding: _checks.IntOrSequence = 1
    kernel_dilation: _checks.IntOrSequence = 1
    groups: int = 4
    offset_scale: float = 1.0
    activation: Callable[[jax.Array], jax.Array] = exact_gelu
    norm: str = "layer"
    center_feature_scale: bool = False
    remove_center: bool = False
    use_running_average: bool | None = None
    axis_name: str | tuple[str, ...] | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = xavier_uniform
    bias_init: Initializer = zeros
    dw_kernel_init: Initializer = default_kernel_init
    dw_bias_init: Initializer = zeros
    offset_kernel_init: Initializer = zeros
    offset_bias_init: Initializer = zeros

    def __post_init__(self) -> None:
        check_dcnv3_config(  # at construction: every attribute error names the attribute
            channels=self.channels,
            kernel_size=self.kernel_size,
            dw_kernel_size=self.dw_kernel_size,
            strides=self.strides,
            padding=self.padding,
            kernel_dilation=self.kernel_dilation,
            groups=self.groups,
            offset_scale=self.offset_scale,
            activation=self.activation,
            norm=self.norm,
            center_feature_scale=self.center_feature_scale,
            remove_center=self.remove_center,
        )
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: jax.Array, *, use_running_average: bool | None = None) -> jax.Array:
        """Applies the block.

        Args:
          inputs: ``(B, *spatial, C)``, 1 to 3 spatial dims.
          use_running_average: the BatchNorm's mode (``norm="batch"``), if not set as an attribute.

        Returns:
          ``(B, *spatial, C)``.
        """
        inputs = _checks.as_array("inputs", inputs)
        num_spatial = None
        if self.has_variable("params", "dw_conv"):  # the variables fix the number of spatial dims
            num_spatial = self.get_variable("params", "dw_conv")["kernel"].ndim - 2
        _checks.check_layer_inputs(inputs, self.channels, 1, num_spatial)
        geometry = dcnv3_geometry(
            inputs.ndim - 2,
            kernel_size=self.kernel_size,
            dw_kernel_size=self.dw_kernel_size,
            strides=self.strides,
            padding=self.padding,
            kernel_dilation=self.kernel_dilation,
            remove_center=self.remove_center,
        )
        check_dcnv3_output_size(inputs.shape[1:-1], geometry)
        channels, groups, num_spatial = self.channels, self.groups, inputs.ndim - 2
        common = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        dense = {**common, "precision": self.precision}
        if self.norm == "layer":
            dw_norm = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, use_fast_variance=False, **common, name="dw_norm")
        else:
            use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
            dw_norm = TorchBatchNorm(use_running_average, self.axis_name, **common, name="dw_norm")
        offset_inits = {"kernel_init": self.offset_kernel_init, "bias_init": self.offset_bias_init}
        proj_inits = {"kernel_init": self.kernel_init, "bias_init": self.bias_init}
        parts = DCNv3Parts(
            input_proj=nn.Dense(channels, **proj_inits, **dense, name="input_proj"),
            dw_conv=DepthwiseConv(
                channels,
                geometry.dw_kernel_size,
                geometry.dw_padding,
                kernel_init=self.dw_kernel_init,
                bias_init=self.dw_bias_init,
                **common,
                name="dw_conv",
            ),
            dw_norm=dw_norm,
            activation=self.activation,
            offset=nn.Dense(groups * geometry.taps * num_spatial, **offset_inits, **dense, name="offset"),
            mask=nn.Dense(groups * geometry.taps, **offset_inits, **dense, name="mask"),
            output_proj=nn.Dense(channels, **proj_inits, **dense, name="output_proj"),
            center_feature_scale_proj=(
                nn.Dense(groups, **offset_inits, **dense, name="center_feature_scale_proj")
                if self.center_feature_scale
                else None
            ),
        )
        return dcnv3_block(
            parts,
            inputs,
            geometry,
            groups=groups,
            offset_scale=self.offset_scale,
            remove_center=self.remove_center,
            dtype=self.dtype,
        )
