"""flax.nnx per-position convolutions: the twins of :mod:`jdynconv.linen.per_position` (Involution,
LightweightConv, DynamicLightweightConv), same maths, same variables under the same names."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdynconv import _checks, _involution, _lightconv
from jdynconv._dtypes import promote_dtype
from jdynconv.linen._common import Dtype, Initializer, zeros
from jdynconv.linen.deformable import check_bool
from jdynconv.linen.odconv import kaiming_normal_fan_out
from jdynconv.linen.per_position import (
    check_involution_config,
    check_involution_inputs,
    check_renorm_padding,
    fairseq_xavier_uniform,
    xavier_uniform,
)
from jdynconv.nnx._common import spatial_kernel_size
from jdynconv.nnx.deformable import TorchBatchNorm


class Involution(nnx.Module):
    """The NNX twin of :class:`jdynconv.linen.Involution` (see it for the maths and every attribute): ``conv1``,
    ``bn`` (a :class:`jdynconv.nnx.deformable.TorchBatchNorm`), ``conv2``.

    Args:
      channels: C, the input and output channels.
      kernel_size: one int per spatial dim (1 to 3).
      use_running_average: the BatchNorm's mode; ``model.train()`` sets it to False, ``model.eval()`` to True.
      rngs: ``nnx.Rngs`` for the initialisers.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: Sequence[int],
        *,
        strides: _checks.IntOrSequence = 1,
        reduction_ratio: int = 4,
        group_channels: int = 16,
        use_running_average: bool = False,
        axis_name: str | tuple[str, ...] | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = kaiming_normal_fan_out,
        bias_init: Initializer = zeros,
        rngs: nnx.Rngs,
    ) -> None:
        check_involution_config(
            kernel_size=kernel_size, strides=strides, reduction_ratio=reduction_ratio, group_channels=group_channels
        )
        self.kernel_size = spatial_kernel_size(kernel_size)
        num_spatial = len(self.kernel_size)
        self.strides = _checks.canonicalize_ints(strides, num_spatial, "strides")
        _checks.check_positive_int("channels", channels)
        probe = jax.ShapeDtypeStruct((1, *(1,) * num_spatial, channels), jnp.float32)
        check_involution_inputs(probe, None, group_channels, reduction_ratio)
        self.channels, self.group_channels, self.reduction_ratio = channels, group_channels, reduction_ratio
        self.use_running_average = use_running_average
        self.dtype = dtype
        groups = channels // group_channels
        ones = (1,) * num_spatial
        common = {"dtype": dtype, "param_dtype": param_dtype, "precision": precision, "rngs": rngs}
        reduced = channels // reduction_ratio
        self.conv1 = nnx.Conv(channels, reduced, ones, use_bias=False, kernel_init=kernel_init, **common)
        self.bn = TorchBatchNorm(reduced, axis_name=axis_name, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv2 = nnx.Conv(
            reduced, groups * math.prod(self.kernel_size), ones, kernel_init=kernel_init, bias_init=bias_init, **common
        )

    def __call__(self, inputs: jax.Array, *, use_running_average: bool | None = None) -> jax.Array:
        """``(B, *spatial, C)`` -> ``(B, *ceil(spatial / strides), C)``; ``use_running_average`` overrides the
        attribute for this call."""
        inputs = _checks.as_array("inputs", inputs)
        _checks.check_layer_inputs(
            inputs, self.channels, 1, len(self.kernel_size), "`kernel_size` has one entry per spatial dim"
        )
        use_running_average = self.use_running_average if use_running_average is None else use_running_average
        hidden = _involution.stride_pool(inputs, self.strides)
        hidden = nnx.relu(self.bn(self.conv1(hidden), training=not use_running_average))
        kernels = self.conv2(hidden)
        groups = self.channels // self.group_channels
        kernels = kernels.reshape(*kernels.shape[:-1], groups, *self.kernel_size)
        inputs, kernels = promote_dtype((inputs, kernels), dtype=self.dtype)
        return _involution.involution(inputs, kernels, self.strides)


class _SequenceConv(nnx.Module):
    """What the two fairseq layers share: layout, decoding cache, and the kernels' normalisation, dropout and
    application (:class:`jdynconv.linen.per_position._SequenceConv`'s)."""

    def _setup(
        self,
        channels: int,
        kernel_size: int,
        *,
        num_heads: int,
        padding: Any,
        weight_softmax: bool,
        weight_dropout: float,
        time_major: bool,
        deterministic: bool,
        dtype: Dtype | None,
        rngs: nnx.Rngs,
    ) -> None:
        """Checks and keeps the settings both layers share; their weight dropout and an empty decoding cache."""
        self.padding_l = _lightconv.check_config(
            kernel_size=kernel_size, num_heads=num_heads, padding=padding, weight_dropout=weight_dropout
        )
        check_bool("time_major", time_major)
        check_bool("weight_softmax", weight_softmax)
        _checks.check_positive_int("channels", channels)
        _lightconv.check_sequence("inputs", jax.ShapeDtypeStruct((1, 1, channels), jnp.float32), None, num_heads)
        self.channels, self.kernel_size, self.num_heads = channels, kernel_size, num_heads
        self.weight_softmax, self.time_major, self.dtype = weight_softmax, time_major, dtype
        self.weight_dropout = nnx.Dropout(weight_dropout, deterministic=deterministic, rngs=rngs)
        self.cached_inputs: nnx.Cache | None = nnx.data(None)
        self.cache_index: nnx.Cache | None = nnx.data(None)

    def init_cache(self, batch_size: int, dtype: Dtype | None = None) -> None:
        """Creates the decoding cache (``cached_inputs (B, K - 1, C)`` zeros, ``cache_index`` 0), as
        ``nnx.MultiHeadAttention.init_cache``; then call with ``decode=True``, one ``(B, 1, C)`` step at a time.
        ``dtype``: the steps' computation dtype (default: the layer's ``dtype``, else float32)."""
        dtype = dtype if dtype is not None else (self.dtype if self.dtype is not None else jnp.float32)
        self.cached_inputs = nnx.Cache(jnp.zeros((batch_size, self.kernel_size - 1, self.channels), dtype))
        self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

    def _apply(
        self, inputs: jax.Array, weights: jax.Array, deterministic: bool | None, decode: bool, renorm: bool
    ) -> jax.Array:
        batch, length, _ = inputs.shape
        start: jax.Array | int = 0
        if decode:
            if self.padding_l != self.kernel_size - 1:
                raise ValueError(f"`decode` needs causal padding (padding_l = kernel_size - 1), got {self.padding_l}.")
            if length != 1:
                raise ValueError(
                    f"`decode` takes one step at a time: `inputs` (B, 1, C), got shape {tuple(inputs.shape)}."
                )
            if self.cached_inputs is None or self.cache_index is None:
                raise ValueError("`decode` needs the cache: call `init_cache(batch_size)` first.")
            if self.cached_inputs.shape[0] != batch:
                raise ValueError(
                    f"`inputs` must have the cache's batch {self.cached_inputs.shape[0]} (init_cache's batch_size), "
                    f"got shape {tuple(inputs.shape)}."
                )
            if self.cached_inputs.dtype != inputs.dtype:
                raise TypeError(
                    f"`inputs` must have the cache's dtype {self.cached_inputs.dtype} (init_cache's dtype), got "
                    f"{inputs.dtype}."
                )
            start = self.cache_index[...]
        kernels = _lightconv.normalise(
            weights, weight_softmax=self.weight_softmax, renorm_padding=renorm, padding_l=self.padding_l, start=start
        )
        kernels = self.weight_dropout(kernels, deterministic=deterministic)
        if not decode:
            return _lightconv.convolve(inputs, kernels, self.padding_l)
        out, self.cached_inputs[...] = _lightconv.decode_step(inputs, kernels, self.cached_inputs[...])
        self.cache_index[...] = self.cache_index[...] + 1
        return out

    def _batch_major(self, array: jax.Array | None) -> jax.Array | None:
        return array if array is None or not self.time_major else jnp.swapaxes(array, 0, 1)


class LightweightConv(_SequenceConv):
    """The NNX twin of :class:`jdynconv.linen.LightweightConv` (fairseq's ``LightweightConv1dTBC``; see it for the
    maths and every argument): ``kernel (H, K)``, ``bias (C,)`` if ``use_bias``.

    Args:
      channels: C (fairseq's ``input_size``).
      kernel_size: K.
      deterministic: no weight dropout (``model.eval()`` sets it); may be given at call time.
      rngs: ``nnx.Rngs`` for the initialisers and the ``"dropout"`` stream.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        *,
        num_heads: int = 1,
        padding: str | int = "SAME",
        weight_softmax: bool = False,
        weight_dropout: float = 0.0,
        use_bias: bool = False,
        time_major: bool = False,
        deterministic: bool = False,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        kernel_init: Initializer = fairseq_xavier_uniform,
        bias_init: Initializer = zeros,
        rngs: nnx.Rngs,
    ) -> None:
        self._setup(
            channels,
            kernel_size,
            num_heads=num_heads,
            padding=padding,
            weight_softmax=weight_softmax,
            weight_dropout=weight_dropout,
            time_major=time_major,
            deterministic=deterministic,
            dtype=dtype,
            rngs=rngs,
        )
        check_bool("use_bias", use_bias)
        self.kernel = nnx.Param(kernel_init(rngs.params(), (num_heads, kernel_size), param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (channels,), param_dtype)) if use_bias else None

    def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None, decode: bool = False) -> jax.Array:
        """``(B, T, C)`` (``(T, B, C)`` with ``time_major``) -> the same shape; ``decode``: one causal step."""
        inputs = _checks.as_array("inputs", inputs)
        _lightconv.check_sequence("inputs", inputs, self.channels, self.num_heads)
        x = self._batch_major(inputs)
        bias = None if self.bias is None else self.bias[...]
        x, kernel, bias = promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
        weights = jnp.broadcast_to(kernel, (x.shape[0], x.shape[1], *kernel.shape))
        out = self._apply(x, weights, deterministic, decode, renorm=False)
        if bias is not None:
            out = out + bias.reshape(1, 1, -1)
        return self._batch_major(out)


class DynamicLightweightConv(_SequenceConv):
    """The NNX twin of :class:`jdynconv.linen.DynamicLightweightConv` (fairseq's ``DynamicConv1dTBC``; see it for
    the maths and every argument): ``weight_linear`` (an ``nnx.Linear``), ``conv_bias (C,)`` if ``conv_bias``.

    Args:
      channels: C (fairseq's ``input_size``).
      kernel_size: K.
      query_size: Q, the query's features (fairseq's ``query_size``; None: C). Not with ``in_proj``.
      deterministic: no weight dropout (``model.eval()`` sets it); may be given at call time.
      rngs: ``nnx.Rngs`` for the initialisers and the ``"dropout"`` stream.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        *,
        num_heads: int = 1,
        padding: str | int = "SAME",
        weight_softmax: bool = False,
        renorm_padding: bool = False,
        weight_dropout: float = 0.0,
        use_bias: bool = False,
        conv_bias: bool = False,
        query_size: int | None = None,
        in_proj: bool = False,
        time_major: bool = False,
        deterministic: bool = False,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = xavier_uniform,
        bias_init: Initializer = zeros,
        rngs: nnx.Rngs,
    ) -> None:
        self._setup(
            channels,
            kernel_size,
            num_heads=num_heads,
            padding=padding,
            weight_softmax=weight_softmax,
            weight_dropout=weight_dropout,
            time_major=time_major,
            deterministic=deterministic,
            dtype=dtype,
            rngs=rngs,
        )
        for name, value in (("renorm_padding", renorm_padding), ("use_bias", use_bias), ("conv_bias", conv_bias)):
            check_bool(name, value)
        check_bool("in_proj", in_proj)
        check_renorm_padding(renorm_padding, weight_softmax)
        if in_proj and query_size is not None:
            raise ValueError("`query_size` must be None with `in_proj` (the kernels come from the inputs).")
        query_size = channels if query_size is None else query_size
        _checks.check_positive_int("query_size", query_size)
        self.renorm_padding, self.in_proj = renorm_padding, in_proj
        taps = num_heads * kernel_size
        dense = {"dtype": dtype, "param_dtype": param_dtype, "precision": precision, "rngs": rngs}
        inits = {"kernel_init": kernel_init, "bias_init": bias_init}
        if in_proj:
            self.weight_linear = nnx.Linear(channels, channels + taps, **inits, **dense)
        else:
            self.weight_linear = nnx.Linear(query_size, taps, use_bias=use_bias, **inits, **dense)
        self.conv_bias = nnx.Param(bias_init(rngs.params(), (channels,), param_dtype)) if conv_bias else None

    def __call__(
        self,
        inputs: jax.Array,
        query: jax.Array | None = None,
        *,
        deterministic: bool | None = None,
        decode: bool = False,
    ) -> jax.Array:
        """``(B, T, C)`` (``(T, B, C)`` with ``time_major``) and an optional ``(B, T, Q)`` query -> ``(B, T, C)``;
        ``decode``: one causal step."""
        inputs = _checks.as_array("inputs", inputs)
        _lightconv.check_sequence("inputs", inputs, self.channels, self.num_heads)
        x = self._batch_major(inputs)
        query = _lightconv.check_query(query, inputs, self.in_proj, self.weight_linear.in_features)
        if query is not None:
            query = self._batch_major(query)
        elif not self.in_proj and self.weight_linear.in_features != self.channels:
            raise ValueError(
                f"`query` is required: the layer was built for queries of {self.weight_linear.in_features} features "
                f"(`query_size`), the inputs have {self.channels}."
            )
        batch, length, channels = x.shape
        if self.in_proj:
            projected = self.weight_linear(x)
            x, weights = projected[..., :channels], projected[..., channels:]
        else:
            weights = self.weight_linear(x if query is None else query)
        bias = None if self.conv_bias is None else self.conv_bias[...]
        x, weights, bias = promote_dtype((x, weights, bias), dtype=self.dtype)
        weights = weights.reshape(batch, length, self.num_heads, self.kernel_size)
        out = self._apply(x, weights, deterministic, decode, renorm=self.renorm_padding)
        if bias is not None:
            out = out + bias.reshape(1, 1, -1)
        return self._batch_major(out)
