"""flax.nnx deformable convolutions: the NNX twins of :class:`jdynconv.linen.DeformConv` and
:class:`jdynconv.linen.DCNv3`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdynconv import _checks
from jdynconv._deform import deform_conv
from jdynconv._dtypes import promote_dtype
from jdynconv.linen._common import Dtype, Initializer, default_kernel_init, ones, zeros
from jdynconv.linen.deformable import (
    LAYER_NORM_EPSILON,
    DCNv3Parts,
    check_dcnv3_config,
    check_dcnv3_output_size,
    check_deform_conv_config,
    dcnv3_block,
    dcnv3_geometry,
    deform_conv_offsets,
    exact_gelu,
    offset_channels,
    split_offset_conv,
    torch_batch_norm,
    xavier_uniform,
)
from jdynconv.nnx._common import spatial_kernel_size
from jdynconv.nnx._depthwise import DepthwiseConv


class DeformConv(nnx.Module):
    """The NNX twin of :class:`jdynconv.linen.DeformConv` (see it for the maths and every attribute): the same
    variables under the same names (``kernel``, ``bias``, ``conv_offset`` an ``nnx.Conv``).

    Every argument not described here is the linen layer's attribute of the same name.

    Args:
      in_features: input channels C_in.
      kernel_size: one int per spatial dim.
      rngs: ``nnx.Rngs`` for the initialisers.
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        kernel_size: Sequence[int],
        *,
        strides: _checks.IntOrSequence = 1,
        padding: _checks.PaddingLike = "SAME",
        kernel_dilation: _checks.IntOrSequence = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        offset_groups: int = 1,
        use_mask: bool = False,
        predict_offsets: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = zeros,
        offset_kernel_init: Initializer = zeros,
        offset_bias_init: Initializer = zeros,
        rngs: nnx.Rngs,
    ) -> None:
        check_deform_conv_config(
            features=features,
            kernel_size=kernel_size,
            strides=strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            feature_group_count=feature_group_count,
            use_bias=use_bias,
            offset_groups=offset_groups,
            use_mask=use_mask,
            predict_offsets=predict_offsets,
        )
        if not _checks.is_int(in_features) or in_features < 1 or in_features % feature_group_count:
            raise ValueError(
                "`in_features` must be a positive int divisible by `feature_group_count` "
                f"(={feature_group_count}), got {in_features!r}."
            )
        if predict_offsets and in_features % offset_groups:
            raise ValueError(f"`in_features` (={in_features}) must be divisible by `offset_groups` (={offset_groups}).")
        kernel_size = spatial_kernel_size(kernel_size)
        rank = len(kernel_size)
        self.in_features = in_features
        self.features = features
        self.kernel_size = kernel_size
        self.strides = _checks.canonicalize_ints(strides, rank, "strides")
        self.kernel_dilation = _checks.canonicalize_ints(kernel_dilation, rank, "kernel_dilation")
        self.padding = _frozen(padding)
        self.feature_group_count = feature_group_count
        self.offset_groups = offset_groups
        self.use_mask = use_mask
        self.predict_offsets = predict_offsets
        self.dtype = dtype
        self.precision = precision
        shape = (*kernel_size, in_features // feature_group_count, features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (features,), param_dtype)) if use_bias else None
        self.conv_offset = (
            nnx.Conv(
                in_features,
                offset_channels(offset_groups, kernel_size, use_mask),
                kernel_size,
                strides=self.strides,
                padding=_offset_conv_padding(padding, kernel_size, self.kernel_dilation),
                kernel_dilation=self.kernel_dilation,
                dtype=dtype,
                param_dtype=param_dtype,
                precision=precision,
                kernel_init=offset_kernel_init,
                bias_init=offset_bias_init,
                rngs=rngs,
            )
            if predict_offsets
            else None
        )

    def __call__(self, inputs: jax.Array, offsets: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
        """Applies the layer: ``(B, *spatial, C_in) -> (B, *out_spatial, features)``.

        Arguments as :meth:`jdynconv.linen.DeformConv.__call__`'s.
        """
        inputs = _checks.as_array("inputs", inputs)
        _checks.check_layer_inputs(inputs, self.in_features, self.feature_group_count, len(self.kernel_size))
        offsets, mask = deform_conv_offsets(self.predict_offsets, offsets, mask)
        if self.conv_offset is not None:
            out = self.conv_offset(inputs)
            offsets, mask = split_offset_conv(out, self.offset_groups, self.kernel_size, self.use_mask)
        bias = None if self.bias is None else self.bias[...]
        inputs, kernel, bias, offsets, mask = promote_dtype(
            (inputs, self.kernel[...], bias, offsets, mask), dtype=self.dtype
        )
        return deform_conv(
            inputs,
            offsets,
            kernel,
            bias,
            mask=mask,
            strides=self.strides,
            padding=self.padding,
            kernel_dilation=self.kernel_dilation,
            feature_group_count=self.feature_group_count,
            precision=self.precision,
        )


def _frozen(padding: _checks.PaddingLike) -> _checks.PaddingLike:
    """``padding`` with tuples for lists: an NNX module's static attributes are hashed."""
    if isinstance(padding, str) or _checks.is_int(padding):
        return padding
    return tuple(p if _checks.is_int(p) else tuple(p) for p in padding)


def _offset_conv_padding(
    padding: _checks.PaddingLike, kernel_size: tuple[int, ...], kernel_dilation: tuple[int, ...]
) -> str | _checks.Pads:
    """The offset conv's padding, as :func:`jdynconv.deform_conv` resolves ``padding``: ``"SAME"`` and
    ``"VALID"`` mean the same to ``nnx.Conv`` (``jax.lax``'s rule); every other form is resolved here to
    explicit pairs, which do not depend on the input's size."""
    if isinstance(padding, str) and padding.upper() in ("SAME", "VALID"):
        return padding.upper()
    rank = len(kernel_size)
    return _checks.canonicalize_padding(
        padding,
        spatial_shape=(1,) * rank,
        kernel_size=kernel_size,
        strides=(1,) * rank,
        kernel_dilation=kernel_dilation,
        input_dilation=(1,) * rank,
    )


class TorchBatchNorm(nnx.Module):
    """The NNX twin of :class:`jdynconv.linen.deformable.TorchBatchNorm`, DCNv3's ``norm="batch"``: ``scale``,
    ``bias`` (``nnx.Param``), ``mean``, ``var`` (``nnx.BatchStat``, float32), as ``nnx.BatchNorm``'s, with
    PyTorch's running statistics. The mode is the call's (the DCNv3 holds ``use_running_average``)."""

    def __init__(
        self,
        num_features: int,
        *,
        axis_name: str | tuple[str, ...] | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.axis_name = axis_name
        self.dtype = dtype
        self.scale = nnx.Param(ones(rngs.params(), (num_features,), param_dtype))
        self.bias = nnx.Param(zeros(rngs.params(), (num_features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, inputs: jax.Array, *, training: bool) -> jax.Array:
        out, stats = torch_batch_norm(
            inputs,
            self.scale[...],
            self.bias[...],
            self.mean[...],
            self.var[...],
            training=training,
            axis_name=self.axis_name,
            dtype=self.dtype,
        )
        if stats is not None:
            self.mean[...], self.var[...] = stats
        return out


class DCNv3(nnx.Module):
    """The NNX twin of :class:`jdynconv.linen.DCNv3` (see it for the maths and every attribute): the same
    variables under the same names (``input_proj``, ``offset``, ``mask``, ``output_proj``,
    ``center_feature_scale_proj`` ``nnx.Linear``; ``dw_conv`` a depthwise conv with ``nnx.Conv``'s ``kernel``
    and ``bias``; ``dw_norm`` an ``nnx.LayerNorm`` or a :class:`TorchBatchNorm`).

    Every argument not described here is the linen layer's attribute of the same name.

    Args:
      channels: C, the input and output channels.
      kernel_size: one int per spatial dim (the default ``(3, 3)``: 2-D, as InternImage's).
      use_running_average: the BatchNorm's mode (``norm="batch"``); ``model.train()`` sets it to False,
        ``model.eval()`` to True.
      rngs: ``nnx.Rngs`` for the initialisers.
    """

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: Sequence[int] = (3, 3),
        dw_kernel_size: int | Sequence[int] | None = None,
        strides: _checks.IntOrSequence = 1,
        padding: _checks.IntOrSequence = 1,
        kernel_dilation: _checks.IntOrSequence = 1,
        groups: int = 4,
        offset_scale: float = 1.0,
        activation: Callable[[jax.Array], jax.Array] = exact_gelu,
        norm: str = "layer",
        center_feature_scale: bool = False,
        remove_center: bool = False,
        use_running_average: bool = False,
        axis_name: str | tuple[str, ...] | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = xavier_uniform,
        bias_init: Initializer = zeros,
        dw_kernel_init: Initializer = default_kernel_init,
        dw_bias_init: Initializer = zeros,
        offset_kernel_init: Initializer = zeros,
        offset_bias_init: Initializer = zeros,
        rngs: nnx.Rngs,
    ) -> None:
        check_dcnv3_config(
            channels=channels,
            kernel_size=kernel_size,
            dw_kernel_size=dw_kernel_size,
            strides=strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            groups=groups,
            offset_scale=offset_scale,
            activation=activation,
            norm=norm,
            center_feature_scale=center_feature_scale,
            remove_center=remove_center,
        )
        kernel_size = spatial_kernel_size(kernel_size)
        num_spatial = len(kernel_size)
        self.geometry = dcnv3_geometry(
            num_spatial,
            kernel_size=kernel_size,
            dw_kernel_size=dw_kernel_size,
            strides=strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            remove_center=remove_center,
        )
        self.channels = channels
        self.groups = groups
        self.offset_scale = offset_scale
        self.activation = activation
        self.remove_center = remove_center
        self.use_running_average = use_running_average
        self.dtype = dtype
        common = {"dtype": dtype, "param_dtype": param_dtype}
        dense = {**common, "precision": precision, "rngs": rngs}
        proj_inits = {"kernel_init": kernel_init, "bias_init": bias_init}
        offset_inits = {"kernel_init": offset_kernel_init, "bias_init": offset_bias_init}
        taps = self.geometry.taps
        self.input_proj = nnx.Linear(channels, channels, **proj_inits, **dense)
        self.dw_conv = DepthwiseConv(
            channels,
            self.geometry.dw_kernel_size,
            self.geometry.dw_padding,
            kernel_init=dw_kernel_init,
            bias_init=dw_bias_init,
            **common,
            rngs=rngs,
        )
        if norm == "layer":
            self.dw_norm = nnx.LayerNorm(
                channels, epsilon=LAYER_NORM_EPSILON, use_fast_variance=False, **common, rngs=rngs
            )
        else:
            self.dw_norm = TorchBatchNorm(channels, axis_name=axis_name, **common, rngs=rngs)
        self.offset = nnx.Linear(channels, groups * taps * num_spatial, **offset_inits, **dense)
        self.mask = nnx.Linear(channels, groups * taps, **offset_inits, **dense)
        self.output_proj = nnx.Linear(channels, channels, **proj_inits, **dense)
        self.center_feature_scale_proj = (
            nnx.Linear(channels, groups, **offset_inits, **dense) if center_feature_scale else None
        )

    def __call__(self, inputs: jax.Array, *, use_running_average: bool | None = None) -> jax.Array:
        """Applies the block: ``(B, *spatial, C) -> (B, *spatial, C)``.

        The other arguments are :meth:`jdynconv.linen.DCNv3.__call__`'s.

        Args:
          use_running_average: the BatchNorm's mode for this call (``norm="batch"``); None: the attribute.
        """
        inputs = _checks.as_array("inputs", inputs)
        _checks.check_layer_inputs(inputs, self.channels, 1, len(self.geometry.kernel_size))
        check_dcnv3_output_size(inputs.shape[1:-1], self.geometry)
        dw_norm: Callable[[jax.Array], jax.Array] = self.dw_norm
        if isinstance(self.dw_norm, TorchBatchNorm):
            use_running_average = self.use_running_average if use_running_average is None else use_running_average

            def dw_norm(x: jax.Array) -> jax.Array:
                return self.dw_norm(x, training=not use_running_average)

        parts = DCNv3Parts(
            input_proj=self.input_proj,
            dw_conv=self.dw_conv,
            dw_norm=dw_norm,
            activation=self.activation,
            offset=self.offset,
            mask=self.mask,
            output_proj=self.output_proj,
            center_feature_scale_proj=self.center_feature_scale_proj,
        )
        return dcnv3_block(
            parts,
            inputs,
            self.geometry,
            groups=self.groups,
            offset_scale=self.offset_scale,
            remove_center=self.remove_center,
            dtype=self.dtype,
        )
