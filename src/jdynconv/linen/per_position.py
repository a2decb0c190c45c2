"""flax.linen per-position convolutions over :func:`jdynconv.per_position_conv`: Involution (d-li14's, N-d) and
fairseq's lightweight and dynamic convolutions (``LightweightConv``, ``DynamicLightweightConv``), with step-by-step
decoding.

The attribute checks are here once; :mod:`jdynconv.nnx.per_position` calls them with its own variables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdynconv import _checks, _involution, _lightconv
from jdynconv._dtypes import promote_dtype
from jdynconv.linen._common import Dtype, Initializer, zeros
from jdynconv.linen.deformable import TorchBatchNorm, check_bool
from jdynconv.linen.odconv import kaiming_normal_fan_out


def fairseq_xavier_uniform(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
    """fairseq's ``nn.init.xavier_uniform_`` on its ``(H, 1, K)`` lightweight weight, for Flax's ``(H, K)``:
    uniform on ``+-sqrt(6 / (K + H * K))`` (PyTorch's fans: ``K`` in, ``H * K`` out)."""
    heads, kernel_size = shape
    bound = math.sqrt(6.0 / (kernel_size + heads * kernel_size))
    return jax.random.uniform(key, tuple(shape), dtype, -bound, bound)


# fairseq's dynamic_convolution.Linear: xavier_uniform_ on the (out, in) weight, the same law on Flax's (in, out).
xavier_uniform: Initializer = nn.initializers.xavier_uniform()


def check_involution_config(
    *, kernel_size: Any, strides: Any, reduction_ratio: Any, group_channels: Any
) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """Checks Involution's attributes; returns kernel_size and strides as tuples where their rank is known."""
    _checks.check_positive_int("reduction_ratio", reduction_ratio)
    _checks.check_positive_int("group_channels", group_channels)
    sizes = (
        None if _checks.is_int(kernel_size) else _checks.canonicalize_ints(kernel_size, len(kernel_size), "kernel_size")
    )
    if _checks.is_int(kernel_size):
        _checks.check_positive_int("kernel_size", kernel_size)
    elif not 1 <= len(sizes) <= 3:
        raise ValueError(f"`kernel_size` must have 1 to 3 spatial dims, got {kernel_size!r}.")
    steps = None if _checks.is_int(strides) else _checks.canonicalize_ints(strides, len(strides), "strides")
    if _checks.is_int(strides):
        _checks.check_positive_int("strides", strides)
    if sizes is not None and steps is not None and len(sizes) != len(steps):
        raise ValueError(f"`strides` {strides!r} must have one entry per kernel dim, as `kernel_size` {kernel_size!r}.")
    return sizes, steps


def check_involution_inputs(
    inputs: jax.Array, channels: int | None, group_channels: int, reduction_ratio: int, num_spatial: int | None = None
) -> None:
    """A float ``(B, *spatial, C)`` (``num_spatial`` dims when the kernel size fixes them), C a multiple of
    ``group_channels`` and at least ``reduction_ratio``."""
    _checks.check_layer_inputs(inputs, channels, 1, num_spatial, "`kernel_size` has one entry per spatial dim")
    channels = inputs.shape[-1]
    if channels % group_channels:
        raise ValueError(
            f"`inputs` channels (={channels}) must be a multiple of `group_channels` (={group_channels}), got "
            f"shape {tuple(inputs.shape)}."
        )
    if channels < reduction_ratio:
        raise ValueError(
            f"`inputs` must have at least `reduction_ratio` (={reduction_ratio}) channels for the reduced kernel "
            f"generator (C // reduction_ratio >= 1), got shape {tuple(inputs.shape)}."
        )


def check_renorm_padding(renorm_padding: bool, weight_softmax: bool) -> None:
    """``renorm_padding`` renormalises the softmax: without ``weight_softmax`` fairseq's band path skips the
    weight dropout instead and its unfold path refuses it, so it is refused here."""
    if renorm_padding and not weight_softmax:
        raise ValueError("`renorm_padding` needs `weight_softmax` (it normalises the softmax over the valid taps).")


class Involution(nn.Module):
    """Involution (Li et al., CVPR 2021): a kernel for every output position, generated from the input, N-d.

    d-li14's ``involution``: the kernels come from the input average-pooled by the stride, through a 1x1 conv to
    ``C // reduction_ratio`` channels (no bias), BatchNorm and ReLU, and a 1x1 conv (with bias) to ``G * K``
    channels (``G = C // group_channels`` groups, ``K = prod(kernel_size)`` taps; group-major, as the original's
    ``view(b, G, K, h, w)``); each group's kernel is applied to the ``group_channels`` contiguous channels of the
    input window under the position (:func:`jdynconv.per_position_conv`). The output has the input's channels.

    Padding is ``(K - 1) // 2`` before and ``K // 2`` after (the original's ``(K - 1) // 2`` on both sides for
    odd kernel sizes), so there are ``ceil(size / stride)`` output positions; the pooling averages the last,
    partial window of a size the stride does not divide over the pixels it covers (PyTorch's ``AvgPool2d(s, s,
    ceil_mode=True)``). The original's shapes disagree there (odd size with stride 2, or an even kernel size)
    and it raises; elsewhere this is the original.

    Variables: ``params``: ``conv1`` (``kernel (1, ..., 1, C, C // reduction_ratio)``), ``bn`` (``scale``,
    ``bias``), ``conv2`` (``kernel (1, ..., 1, C // reduction_ratio, G * K)``, ``bias``); ``batch_stats``: ``bn``'s
    ``mean`` and ``var`` (float32), PyTorch's running statistics (the variance moves towards the unbiased batch
    variance, momentum 0.1, epsilon 1e-5: ``nn.BatchNorm2d``'s, mmcv's ``ConvModule`` with ``norm_cfg=dict(type=
    'BN')``).

    Attributes:
      kernel_size: int (same in every spatial dim) or one int per spatial dim (1 to 3).
      strides: int or one int per spatial dim.
      reduction_ratio: the generator's channel reduction (the original's 4).
      group_channels: channels that share a kernel (the original's 16); divides C.
      use_running_average: the BatchNorm's mode; may instead be given at call time.
      axis_name: as ``flax.linen.BatchNorm``'s: inside ``jax.shard_map``, the mesh axes over which the batch
        statistics are averaged.
      dtype: the computation dtype (None: inferred from inputs and parameters).
      param_dtype: the parameters' dtype.
      precision: of the two 1x1 convs.
      kernel_init: the 1x1 convs' kernel initialiser (mmcv ``ConvModule``'s Kaiming normal, fan out, ReLU gain).
      bias_init: ``conv2``'s bias initialiser (zeros).
    """

    kernel_size: int | Sequence[int]
    strides: _checks.IntOrSequence = 1
    reduction_ratio: int = 4
    group_channels: int = 16
    use_running_average: bool | None = None
    axis_name: str | tuple[str, ...] | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = kaiming_normal_fan_out
    bias_init: Initializer = zeros

    def __post_init__(self) -> None:
        check_involution_config(
            kernel_size=self.kernel_size,
            strides=self.strides,
            reduction_ratio=self.reduction_ratio,
            group_channels=self.group_channels,
        )
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: jax.Array, *, use_running_average: bool | None = None) -> jax.Array:
        """Applies the layer.

        Args:
          inputs: ``(B, *spatial, C)``, 1 to 3 spatial dims.
          use_running_average: the BatchNorm's mode, if not set as an attribute.

        Returns:
          ``(B, *out_spatial, C)``, ``out_spatial = ceil(spatial / strides)``.
        """
        inputs = _checks.as_array("inputs", inputs)
        channels = None
        if self.has_variable("params", "conv1"):
            channels = self.get_variable("params", "conv1")["kernel"].shape[-2]
        fixed = None if _checks.is_int(self.kernel_size) else len(self.kernel_size)
        check_involution_inputs(inputs, channels, self.group_channels, self.reduction_ratio, fixed)
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        num_spatial = inputs.ndim - 2
        kernel_size = _checks.canonicalize_ints(self.kernel_size, num_spatial, "kernel_size")
        strides = _checks.canonicalize_ints(self.strides, num_spatial, "strides")
        channels = inputs.shape[-1]
        groups = channels // self.group_channels
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        ones = (1,) * num_spatial
        hidden = _involution.stride_pool(inputs, strides)
        hidden = nn.Conv(
            channels // self.reduction_ratio, ones, use_bias=False, kernel_init=self.kernel_init, name="conv1", **common
        )(hidden)
        hidden = TorchBatchNorm(
            use_running_average, self.axis_name, dtype=self.dtype, param_dtype=self.param_dtype, name="bn"
        )(hidden)
        hidden = nn.relu(hidden)
        kernels = nn.Conv(
            groups * math.prod(kernel_size),
            ones,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            name="conv2",
            **common,
        )(hidden)
        kernels = kernels.reshape(*kernels.shape[:-1], groups, *kernel_size)
        inputs, kernels = promote_dtype((inputs, kernels), dtype=self.dtype)
        return _involution.involution(inputs, kernels, strides)


class _SequenceConv(nn.Module):
    """What the two fairseq layers share: the layout, the decoding cache, and the kernels' normalisation,
    dropout and application."""

    def _to_batch_major(self, array: jax.Array | None) -> jax.Array | None:
        return None if array is None or not self.time_major else jnp.swapaxes(array, 0, 1)

    def _apply(
        self, inputs: jax.Array, weights: jax.Array, padding_l: int, deterministic: bool, decode: bool, renorm: bool
    ) -> jax.Array:
        """Normalises, drops and applies ``weights (B, T, H, K)`` to ``inputs (B, T, C)``; or one decoding step."""
        batch, length, channels = inputs.shape
        kernel_size = weights.shape[-1]
        if decode:
            if padding_l != kernel_size - 1:
                raise ValueError(
                    f"`decode` needs causal padding (padding_l = kernel_size - 1), got padding_l {padding_l}."
                )
            if length != 1:
                raise ValueError(
                    f"`decode` takes one step at a time: `inputs` (B, 1, C), got shape {tuple(inputs.shape)}."
                )
            cached = self.variable(
                "cache", "cached_inputs", jnp.zeros, (batch, kernel_size - 1, channels), inputs.dtype
            )
            if cached.value.shape[0] != batch or cached.value.dtype != inputs.dtype:
                raise ValueError(
                    f"`inputs` must have the cache's batch {cached.value.shape[0]} and dtype {cached.value.dtype} (as "
                    f"the input the cache was initialised with), got shape {tuple(inputs.shape)}, {inputs.dtype}."
                )
            index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
            kernels = _lightconv.normalise(
                weights,
                weight_softmax=self.weight_softmax,
                renorm_padding=renorm,
                padding_l=padding_l,
                start=index.value,
            )
        else:
            kernels = _lightconv.normalise(
                weights, weight_softmax=self.weight_softmax, renorm_padding=renorm, padding_l=padding_l
            )
        kernels = nn.Dropout(self.weight_dropout, name="weight_dropout")(kernels, deterministic=deterministic)
        self.sow("intermediates", "kernels", kernels)
        if not decode:
            return _lightconv.convolve(inputs, kernels, padding_l)
        if self.is_initializing():  # the cache starts empty whatever the example input
            return _lightconv.convolve(inputs, kernels, padding_l)
        out, cached.value = _lightconv.decode_step(inputs, kernels, cached.value)
        index.value = index.value + 1
        return out


class LightweightConv(_SequenceConv):
    """fairseq's ``LightweightConv1dTBC`` (Wu et al., "Pay Less Attention with Lightweight and Dynamic
    Convolutions", ICLR 2019): a depthwise 1-D convolution whose ``K``-tap kernel is shared by the ``C / H``
    contiguous channels of each of ``H`` heads, optionally softmax-normalised over its taps and DropConnect-ed.

    ``out[b, t, c] = sum_k w[h(c), k] * x[b, t + k - padding_l, c] (+ bias[c])``, zeros outside the sequence.

    Variables (``params``): ``kernel (H, K)``, ``bias (C,)`` if ``use_bias``. With ``decode=True`` a ``cache``
    collection holds ``cached_inputs (B, K - 1, C)`` and ``cache_index`` (the step), as Flax's attention: create
    it with ``init`` on a ``(B, 1, C)`` input, call with ``mutable=["cache"]``, one step at a time; each step's
    output is the causal full pass's at that position.

    Attributes:
      kernel_size: K.
      num_heads: H; divides C.
      padding: ``"CAUSAL"`` (``padding_l = K - 1``: output t sees inputs <= t, fairseq's decoder), ``"SAME"``
        (``padding_l = (K - 1) // 2``, the rest after), or fairseq's ``padding_l`` as an int (``0 <= padding_l <
        K``; ``K - 1 - padding_l`` zeros after the end).
      weight_softmax: softmax over the taps (in float32), as fairseq's ``weight_softmax``.
      weight_dropout: DropConnect rate on the (normalised) kernels at every position, inverted (scaled by ``1 /
        (1 - rate)``), only when not ``deterministic``; from the ``"dropout"`` rng stream.
      use_bias: a bias added to the output (fairseq's ``bias``).
      time_major: inputs and outputs are ``(T, B, C)`` (fairseq's TBC) rather than ``(B, T, C)``.
      deterministic: no weight dropout; may instead be given at call time.
      dtype: the computation dtype (None: inferred from inputs and parameters).
      param_dtype: the parameters' dtype.
      kernel_init: the kernel's initialiser (fairseq's ``xavier_uniform_`` on ``(H, 1, K)``).
      bias_init: the bias's initialiser (zeros).
    """

    kernel_size: int
    num_heads: int = 1
    padding: str | int = "SAME"
    weight_softmax: bool = False
    weight_dropout: float = 0.0
    use_bias: bool = False
    time_major: bool = False
    deterministic: bool | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = fairseq_xavier_uniform
    bias_init: Initializer = zeros

    def __post_init__(self) -> None:
        _lightconv.check_config(
            kernel_size=self.kernel_size,
            num_heads=self.num_heads,
            padding=self.padding,
            weight_dropout=self.weight_dropout,
        )
        for name in ("weight_softmax", "use_bias", "time_major"):
            check_bool(name, getattr(self, name))
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None, decode: bool = False) -> jax.Array:
        """Applies the layer.

        Args:
          inputs: ``(B, T, C)``, or ``(T, B, C)`` with ``time_major``; ``T = 1`` with ``decode``.
          deterministic: no weight dropout, if not set as an attribute.
          decode: one causal step, with the ``cache`` collection.

        Returns:
          The inputs' shape.
        """
        inputs = _checks.as_array("inputs", inputs)
        channels = self.get_variable("params", "bias").shape[0] if self.has_variable("params", "bias") else None
        _lightconv.check_sequence("inputs", inputs, channels, self.num_heads)
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        padding_l = _lightconv.padding_left(self.padding, self.kernel_size)
        x = self._to_batch_major(inputs) if self.time_major else inputs
        kernel = self.param("kernel", self.kernel_init, (self.num_heads, self.kernel_size), self.param_dtype)
        bias = self.param("bias", self.bias_init, (x.shape[-1],), self.param_dtype) if self.use_bias else None
        x, kernel, bias = promote_dtype((x, kernel, bias), dtype=self.dtype)
        weights = jnp.broadcast_to(kernel, (x.shape[0], x.shape[1], *kernel.shape))
        out = self._apply(x, weights, padding_l, deterministic, decode, renorm=False)
        if bias is not None:
            out = out + bias.reshape(1, 1, -1)
        return jnp.swapaxes(out, 0, 1) if self.time_major else out


class DynamicLightweightConv(_SequenceConv):
    """fairseq's ``DynamicConv1dTBC`` (Wu et al., ICLR 2019): a lightweight convolution whose kernel is predicted
    at every time step by a linear layer of the query (the input by default). Not :class:`jdynconv.linen.
    DynamicConv` (Chen et al. 2020, attention over k kernels per sample).

    ``out[b, t, c] = sum_k w[b, t, h(c), k] * x[b, t + k - padding_l, c] (+ conv_bias[c])`` with ``w[b, t] =
    weight_linear(query[b, t])`` reshaped to ``(H, K)`` (head-major), normalised (``weight_softmax``; with
    ``renorm_padding`` over the taps inside the sequence only) and DropConnect-ed.

    fairseq's default path for ``T <= 512`` (the band matrix) is the one computed; its unfold path (``T > 512``
    or ``unfold=True``) differs only for a causal ``K > T`` with ``weight_softmax`` (the softmax then covers the
    last ``T`` taps only). Incremental decoding matches the band path, as here.

    Variables (``params``): ``weight_linear`` (``kernel (Q, H * K)``, ``bias (H * K,)`` if ``use_bias``; with
    ``in_proj``: ``kernel (C, C + H * K)`` and ``bias``), ``conv_bias (C,)`` if ``conv_bias``. With ``decode``,
    the ``cache`` collection of :class:`LightweightConv`.

    Attributes:
      kernel_size: K.
      num_heads: H; divides C.
      padding: as :class:`LightweightConv`'s.
      weight_softmax: softmax over the taps (in float32).
      renorm_padding: with ``weight_softmax``, normalise over the taps that read inside the sequence.
      weight_dropout: DropConnect rate on the (normalised) kernels, inverted, only when not ``deterministic``.
      use_bias: ``weight_linear`` has a bias (fairseq's ``bias``).
      conv_bias: a bias added to the output (fairseq's ``conv_bias``).
      in_proj: ``weight_linear`` maps the input to ``C + H * K`` (the first C are the values convolved, the rest
        the kernels; always with a bias, as fairseq's); no separate query then.
      time_major: inputs, query and outputs are ``(T, B, ·)`` (fairseq's TBC) rather than ``(B, T, ·)``.
      deterministic: no weight dropout; may instead be given at call time.
      dtype: the computation dtype (None: inferred from inputs and parameters).
      param_dtype: the parameters' dtype.
      precision: of ``weight_linear``.
      kernel_init: ``weight_linear``'s kernel initialiser (fairseq's ``xavier_uniform_``).
      bias_init: the biases' initialiser (zeros).
    """

    kernel_size: int
    num_heads: int = 1
    padding: str | int = "SAME"
    weight_softmax: bool = False
    renorm_padding: bool = False
    weight_dropout: float = 0.0
    use_bias: bool = False
    conv_bias: bool = False
    in_proj: bool = False
    time_major: bool = False
    deterministic: bool | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = xavier_uniform
    bias_init: Initializer = zeros

    def __post_init__(self) -> None:
        _lightconv.check_config(
            kernel_size=self.kernel_size,
            num_heads=self.num_heads,
            padding=self.padding,
            weight_dropout=self.weight_dropout,
        )
        for name in ("weight_softmax", "renorm_padding", "use_bias", "conv_bias", "in_proj", "time_major"):
            check_bool(name, getattr(self, name))
        check_renorm_padding(self.renorm_padding, self.weight_softmax)
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        query: jax.Array | None = None,
        *,
        deterministic: bool | None = None,
        decode: bool = False,
    ) -> jax.Array:
        """Applies the layer.

        Args:
          inputs: ``(B, T, C)``, or ``(T, B, C)`` with ``time_major``; ``T = 1`` with ``decode``.
          query: ``(B, T, Q)`` (``(T, B, Q)`` with ``time_major``) the kernels are predicted from; None: the
            inputs. Not with ``in_proj``.
          deterministic: no weight dropout, if not set as an attribute.
          decode: one causal step, with the ``cache`` collection.

        Returns:
          The inputs' shape.
        """
        inputs = _checks.as_array("inputs", inputs)
        channels = None
        if self.has_variable("params", "conv_bias"):
            channels = self.get_variable("params", "conv_bias").shape[0]
        _lightconv.check_sequence("inputs", inputs, channels, self.num_heads)
        query = _lightconv.check_query(query, inputs, self.in_proj, None)
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        padding_l = _lightconv.padding_left(self.padding, self.kernel_size)
        x = self._to_batch_major(inputs) if self.time_major else inputs
        query = self._to_batch_major(query) if self.time_major else query
        batch, length, channels = x.shape
        taps = self.num_heads * self.kernel_size
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        if self.in_proj:
            projected = nn.Dense(
                channels + taps, kernel_init=self.kernel_init, bias_init=self.bias_init, name="weight_linear", **dense
            )(x)
            x, weights = projected[..., :channels], projected[..., channels:]
        else:
            weights = nn.Dense(
                taps,
                use_bias=self.use_bias,
                kernel_init=self.kernel_init,
                bias_init=self.bias_init,
                name="weight_linear",
                **dense,
            )(x if query is None else query)
        bias = self.param("conv_bias", self.bias_init, (channels,), self.param_dtype) if self.conv_bias else None
        x, weights, bias = promote_dtype((x, weights, bias), dtype=self.dtype)
        weights = weights.reshape(batch, length, self.num_heads, self.kernel_size)
        out = self._apply(x, weights, padding_l, deterministic, decode, renorm=self.renorm_padding)
        if bias is not None:
            out = out + bias.reshape(1, 1, -1)
        return jnp.swapaxes(out, 0, 1) if self.time_major else out
