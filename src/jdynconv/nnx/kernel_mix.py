"""flax.nnx kernel-mixing layers: the NNX twins of :class:`jdynconv.linen.PerSampleConv`,
:class:`jdynconv.linen.CondConv` and :class:`jdynconv.linen.DynamicConv`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdynconv import _checks, _kernel_mix
from jdynconv.linen._common import Dtype, Initializer, branch_bank_init, default_kernel_init, zeros
from jdynconv.nnx._common import nnx_layer_config


class PerSampleConv(nnx.Module):
    """The NNX twin of :class:`jdynconv.linen.PerSampleConv`: kernels passed per call, no parameters.

    Every argument not described here is the linen layer's attribute of the same name.

    Args:
      in_features: input channels C_in.
      kernel_size: one int per spatial dim.
      rngs: accepted for uniformity with the other layers; unused.
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
        input_dilation: _checks.IntOrSequence = 1,
        feature_group_count: int = 1,
        dtype: Dtype | None = None,
        precision: Any = None,
        method: str = "auto",
        rngs: nnx.Rngs | None = None,
    ) -> None:
        self.in_features = in_features
        self.config = nnx_layer_config(
            in_features,
            features,
            kernel_size,
            None,
            strides=strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            feature_group_count=feature_group_count,
            dtype=dtype,
            precision=precision,
            mixing="auto",
            method=method,
            input_dilation=input_dilation,
        )

    def __call__(self, inputs: jax.Array, kernels: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        """Convolves each sample with its own kernel: ``(B, *spatial, C_in) -> (B, *out_spatial, features)``.

        Arguments as :meth:`jdynconv.linen.PerSampleConv.__call__`'s.
        """
        inputs = _checks.as_array("inputs", inputs)
        _checks.check_layer_inputs(inputs, self.in_features, self.config.feature_group_count)
        return _kernel_mix.per_sample_layer(self.config, inputs, kernels, bias)


class _ExpertBank(nnx.Module):
    """The k expert kernels and biases shared by CondConv and DynamicConv."""

    def _init_bank(
        self,
        config: _kernel_mix.LayerConfig,
        in_features: int,
        use_bias: bool,
        kernel_init: Initializer,
        bias_init: Initializer,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ) -> None:
        self.in_features = in_features
        self.config = config
        k = config.num_experts
        shape = (k, *config.kernel_size, in_features // config.feature_group_count, config.features)
        self.kernel = nnx.Param(branch_bank_init(kernel_init)(rngs.params(), shape, param_dtype))
        bias = branch_bank_init(bias_init)(rngs.params(), (k, config.features), param_dtype) if use_bias else None
        self.bias = nnx.Param(bias) if use_bias else None

    def _checked(self, inputs: jax.Array) -> jax.Array:
        inputs = _checks.as_array("inputs", inputs)
        num_spatial = len(self.config.kernel_size)
        _checks.check_layer_inputs(inputs, self.in_features, self.config.feature_group_count, num_spatial)
        return inputs

    def _bias_value(self) -> jax.Array | None:
        return None if self.bias is None else self.bias[...]


class CondConv(_ExpertBank):
    """The NNX twin of :class:`jdynconv.linen.CondConv` (same variables under the same names).

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
        num_experts: int,
        *,
        strides: _checks.IntOrSequence = 1,
        padding: _checks.PaddingLike = "SAME",
        kernel_dilation: _checks.IntOrSequence = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: Any = None,
        mixing: str = "auto",
        method: str = "auto",
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = zeros,
        routing_kernel_init: Initializer = default_kernel_init,
        routing_bias_init: Initializer = zeros,
        use_routing: bool = True,
        rngs: nnx.Rngs,
    ) -> None:
        config = nnx_layer_config(
            in_features,
            features,
            kernel_size,
            num_experts,
            strides=strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            feature_group_count=feature_group_count,
            dtype=dtype,
            precision=precision,
            mixing=mixing,
            method=method,
        )
        self._init_bank(config, in_features, use_bias, kernel_init, bias_init, param_dtype, rngs)
        self.use_routing = use_routing
        routing_shape = (in_features, num_experts)
        self.routing_kernel = (
            nnx.Param(routing_kernel_init(rngs.params(), routing_shape, param_dtype)) if use_routing else None
        )
        self.routing_bias = (
            nnx.Param(routing_bias_init(rngs.params(), (num_experts,), param_dtype)) if use_routing else None
        )

    def __call__(self, inputs: jax.Array, routing_weights: jax.Array | None = None) -> jax.Array:
        """Applies the layer: ``(B, *spatial, C_in) -> (B, *out_spatial, features)``.

        Arguments as :meth:`jdynconv.linen.CondConv.__call__`'s.
        """
        return _kernel_mix.cond_conv(
            self.config,
            self._checked(inputs),
            routing_weights,
            None if self.routing_kernel is None else self.routing_kernel[...],
            None if self.routing_bias is None else self.routing_bias[...],
            self.kernel[...],
            self._bias_value(),
        )


class DynamicConv(_ExpertBank):
    """The NNX twin of :class:`jdynconv.linen.DynamicConv` (same variables under the same names).

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
        num_experts: int,
        *,
        ratio: float = 0.25,
        temperature: float = 1.0,
        strides: _checks.IntOrSequence = 1,
        padding: _checks.PaddingLike = "SAME",
        kernel_dilation: _checks.IntOrSequence = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: Any = None,
        mixing: str = "auto",
        method: str = "auto",
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = zeros,
        attention_kernel_init: Initializer = default_kernel_init,
        attention_bias_init: Initializer = zeros,
        rngs: nnx.Rngs,
    ) -> None:
        config = nnx_layer_config(
            in_features,
            features,
            kernel_size,
            num_experts,
            strides=strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            feature_group_count=feature_group_count,
            dtype=dtype,
            precision=precision,
            mixing=mixing,
            method=method,
            ratio=ratio,
        )
        _checks.check_temperature(temperature)
        self.temperature = float(temperature)
        self._init_bank(config, in_features, use_bias, kernel_init, bias_init, param_dtype, rngs)
        hidden = _kernel_mix.hidden_width(in_features, ratio)
        self.attention_hidden_kernel = nnx.Param(
            attention_kernel_init(rngs.params(), (in_features, hidden), param_dtype)
        )
        self.attention_kernel = nnx.Param(attention_kernel_init(rngs.params(), (hidden, num_experts), param_dtype))
        self.attention_bias = nnx.Param(attention_bias_init(rngs.params(), (num_experts,), param_dtype))

    def __call__(
        self,
        inputs: jax.Array,
        temperature: float | jax.Array | None = None,
        attention_weights: jax.Array | None = None,
    ) -> jax.Array:
        """Applies the layer: ``(B, *spatial, C_in) -> (B, *out_spatial, features)``.

        Arguments as :meth:`jdynconv.linen.DynamicConv.__call__`'s.
        """
        return _kernel_mix.dynamic_conv(
            self.config,
            self._checked(inputs),
            self.temperature if temperature is None else temperature,
            attention_weights,
            self.attention_hidden_kernel[...],
            self.attention_kernel[...],
            self.attention_bias[...],
            self.kernel[...],
            self._bias_value(),
        )
