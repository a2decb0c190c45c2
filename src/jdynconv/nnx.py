"""flax.nnx modules: thin wrappers over jdynconv's functional core (same names and maths as ``linen``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jdynconv import _branch_mix, _checks, _gates, _kernel_mix, _modulated, _odconv
from jdynconv.linen import (
    Dtype,
    Initializer,
    branch_bank_init,
    default_kernel_init,
    kaiming_normal_fan_out,
    ones,
    standard_normal,
    zeros,
)

__all__ = [
    "BranchMixConv",
    "CondConv",
    "DynamicConv",
    "ModulatedConv",
    "NoiseConst",
    "ODConv",
    "PerSampleConv",
]


class BranchMixConv(nnx.Module):
    """k parallel ``Conv -> BatchNorm -> activation`` branches mixed per sample by a learned gate.

    The NNX twin of :class:`jdynconv.linen.BranchMixConv` (see it for the maths and every attribute):
    the same variables under the same names, ``nnx.Param`` and ``nnx.BatchStat``. BatchNorm's mode
    follows ``model.train()`` / ``model.eval()`` (the ``use_running_average`` attribute).

    Every argument not described here is the linen layer's attribute of the same name.

    Args:
      in_features: input channels C_in.
      kernel_size: one int per spatial dim, or an int (same in every spatial dim) with ``input_shape``.
      input_shape: the spatial shape ``(H, W)`` etc. of the inputs. Required by the ``"flatten"`` gate
        (its Dense has ``C_in * prod(input_shape)`` inputs) and to expand an int ``kernel_size``.
      use_running_average: BatchNorm mode; ``model.train()`` sets it to False, ``model.eval()`` to True.
      rngs: ``nnx.Rngs`` for the initialisers.
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        kernel_size: int | Sequence[int],
        num_branches: int,
        *,
        input_shape: Sequence[int] | None = None,
        strides: _checks.IntOrSequence = 1,
        padding: _checks.PaddingLike = "SAME",
        kernel_dilation: _checks.IntOrSequence = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        use_running_average: bool = False,
        unbiased_running_var: bool = False,
        gate_input: _gates.GateInput = "flatten",
        gate_activation: str | Callable[[jax.Array], jax.Array] = "leaky_relu",
        branch_activation: Callable[[jax.Array], jax.Array] = _gates.leaky_relu,
        remat: bool = False,
        method: str = "auto",
        axis_name: str | tuple[str, ...] | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = zeros,
        gate_kernel_init: Initializer = default_kernel_init,
        gate_bias_init: Initializer = zeros,
        scale_init: Initializer = ones,
        offset_init: Initializer = zeros,
        rngs: nnx.Rngs,
    ) -> None:
        _branch_mix.check_config(
            features,
            num_branches,
            feature_group_count,
            gate_input,
            gate_activation,
            method,
            remat,
            kernel_size=kernel_size,
            strides=strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            momentum=momentum,
            epsilon=epsilon,
        )
        if not _checks.is_int(in_features) or in_features < 1 or in_features % feature_group_count:
            raise ValueError(
                f"`in_features` must be a positive int divisible by `feature_group_count` (={feature_group_count}), "
                f"got {in_features!r}."
            )
        if input_shape is not None:
            input_shape = _checks.canonicalize_ints(tuple(input_shape), len(input_shape), "input_shape")
            if not 1 <= len(input_shape) <= 3:
                raise ValueError(f"`input_shape` must have 1 to 3 spatial dims, got {input_shape!r}.")
        if gate_input == "flatten" and input_shape is None:
            raise ValueError(
                '`input_shape` (the spatial shape, e.g. (32, 32)) is required with `gate_input="flatten"`: the '
                "gate's Dense layer has C_in * prod(input_shape) inputs."
            )
        if _checks.is_int(kernel_size):
            if input_shape is None:
                raise ValueError(
                    f"`kernel_size` {kernel_size!r} is an int, but the number of spatial dims is unknown: pass one "
                    "int per spatial dim (e.g. (3, 3)) or `input_shape`."
                )
            kernel_size = (int(kernel_size),) * len(input_shape)
        rank = len(input_shape) if input_shape is not None else len(tuple(kernel_size))
        kernel_size = _checks.canonicalize_ints(tuple(kernel_size), rank, "kernel_size")
        self.in_features = in_features
        self.input_shape = input_shape
        self.use_running_average = use_running_average
        self.config = _branch_mix.BlockConfig(
            features=features,
            num_branches=num_branches,
            strides=strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            feature_group_count=feature_group_count,
            momentum=momentum,
            epsilon=epsilon,
            unbiased_running_var=unbiased_running_var,
            gate_input=gate_input,
            gate_activation=gate_activation,
            branch_activation=branch_activation,
            remat=remat,
            dtype=dtype,
            precision=precision,
            method=method,
            axis_name=axis_name,
        )
        k = num_branches
        gate_dim = in_features * math.prod(input_shape) if gate_input == "flatten" else in_features
        self.gate_kernel = nnx.Param(gate_kernel_init(rngs.params(), (gate_dim, k), param_dtype))
        self.gate_bias = nnx.Param(gate_bias_init(rngs.params(), (k,), param_dtype))
        bank_shape = (k, *kernel_size, in_features // feature_group_count, features)
        self.kernel = nnx.Param(branch_bank_init(kernel_init)(rngs.params(), bank_shape, param_dtype))
        self.bias = (
            nnx.Param(branch_bank_init(bias_init)(rngs.params(), (k, features), param_dtype)) if use_bias else None
        )
        self.scale = nnx.Param(scale_init(rngs.params(), (k, features), param_dtype))
        self.offset = nnx.Param(offset_init(rngs.params(), (k, features), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((k, features), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((k, features), jnp.float32))

    def __call__(
        self,
        inputs: jax.Array,
        *,
        use_running_average: bool | None = None,
        temperature: float | jax.Array = 1.0,
        gate_weights: jax.Array | None = None,
    ) -> jax.Array:
        """Applies the block: ``(B, *spatial, C_in) -> (B, *out_spatial, features)``.

        The other arguments are :meth:`jdynconv.linen.BranchMixConv.__call__`'s.

        Args:
          use_running_average: BatchNorm mode for this call; None: the attribute (see ``model.eval()``).
        """
        inputs = _checks.as_array("inputs", inputs)
        _checks.check_temperature(temperature)
        _checks.check_layer_inputs(inputs, self.in_features, self.config.feature_group_count)
        if self.input_shape is not None and inputs.ndim - 2 != len(self.input_shape):
            raise ValueError(
                f"`inputs` must have {len(self.input_shape)} spatial dims (`input_shape` {self.input_shape}), "
                f"got shape {inputs.shape}."
            )
        if self.kernel.shape[1:-2] and inputs.ndim - 2 != len(self.kernel.shape[1:-2]):
            raise ValueError(
                f"`inputs` must have {len(self.kernel.shape[1:-2])} spatial dims to match `kernel_size` "
                f"{self.kernel.shape[1:-2]}, got shape {inputs.shape}."
            )
        use_running_average = self.use_running_average if use_running_average is None else use_running_average
        bias = self.bias[...] if self.bias is not None else None
        out, (new_mean, new_var) = _branch_mix.apply_block(
            self.config,
            inputs,
            self.gate_kernel[...],
            self.gate_bias[...],
            _branch_mix.BranchParams(self.kernel[...], bias, self.scale[...], self.offset[...]),
            self.mean[...],
            self.var[...],
            training=not use_running_average,
            temperature=temperature,
            gate_weights=gate_weights,
        )
        if not use_running_average:
            self.mean[...] = new_mean
            self.var[...] = new_var
        return out


def _spatial_kernel_size(kernel_size: Sequence[int]) -> tuple[int, ...]:
    """One int per spatial dim (1 to 3): an NNX layer creates its kernel before it sees an input's rank."""
    if _checks.is_int(kernel_size):
        raise ValueError(
            f"`kernel_size` {kernel_size!r} is an int, but an NNX layer creates its kernel before seeing an input: "
            "pass one int per spatial dim, e.g. (3, 3)."
        )
    kernel_size = _checks.canonicalize_ints(tuple(kernel_size), len(tuple(kernel_size)), "kernel_size")
    if not 1 <= len(kernel_size) <= 3:
        raise ValueError(f"`kernel_size` must have 1 to 3 spatial dims, got {kernel_size!r}.")
    return kernel_size


def _nnx_layer_config(
    in_features: int,
    features: int,
    kernel_size: int | Sequence[int],
    num_experts: int | None,
    *,
    strides: Any,
    padding: Any,
    kernel_dilation: Any,
    feature_group_count: int,
    dtype: Any,
    precision: Any,
    mixing: str,
    method: str,
    input_dilation: Any = 1,
    ratio: float | None = None,
) -> _kernel_mix.LayerConfig:
    _kernel_mix.check_layer(
        features,
        num_experts,
        feature_group_count,
        kernel_size=kernel_size,
        strides=strides,
        padding=padding,
        kernel_dilation=kernel_dilation,
        input_dilation=input_dilation,
        ratio=ratio,
    )
    _kernel_mix.check_mixing(mixing, method)
    if not _checks.is_int(in_features) or in_features < 1 or in_features % feature_group_count:
        raise ValueError(
            f"`in_features` must be a positive int divisible by `feature_group_count` (={feature_group_count}), "
            f"got {in_features!r}."
        )
    kernel_size = _spatial_kernel_size(kernel_size)
    return _kernel_mix.LayerConfig(
        features=features,
        kernel_size=kernel_size,
        num_experts=num_experts,
        strides=strides,
        padding=padding,
        kernel_dilation=kernel_dilation,
        feature_group_count=feature_group_count,
        dtype=dtype,
        precision=precision,
        mixing=mixing,
        method=method,
        input_dilation=input_dilation,
    )


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
        self.config = _nnx_layer_config(
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
        config = _nnx_layer_config(
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
        config = _nnx_layer_config(
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


class ODConv(nnx.Module):
    """The NNX twin of :class:`jdynconv.linen.ODConv` (see it for the maths and every attribute): the same
    variables under the same names, ``nnx.Param`` and ``nnx.BatchStat``. The attention's BatchNorm follows
    ``model.train()`` / ``model.eval()`` (the ``use_running_average`` attribute).

    Every argument not described here is the linen layer's attribute of the same name.

    Args:
      in_features: input channels C_in.
      kernel_size: one int per spatial dim.
      use_running_average: the attention BatchNorm's mode; ``model.train()`` sets it to False,
        ``model.eval()`` to True.
      rngs: ``nnx.Rngs`` for the initialisers.
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        kernel_size: Sequence[int],
        num_experts: int = 4,
        *,
        reduction: float = 0.0625,
        min_channels: int = 16,
        temperature: float = 1.0,
        strides: _checks.IntOrSequence = 1,
        padding: _checks.PaddingLike = "SAME",
        kernel_dilation: _checks.IntOrSequence = 1,
        feature_group_count: int = 1,
        use_bias: bool = False,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        use_running_average: bool = False,
        unbiased_running_var: bool = False,
        attention_placement: str = "auto",
        method: str = "auto",
        axis_name: str | tuple[str, ...] | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = kaiming_normal_fan_out,
        bias_init: Initializer = zeros,
        attention_kernel_init: Initializer = kaiming_normal_fan_out,
        attention_bias_init: Initializer = zeros,
        scale_init: Initializer = ones,
        offset_init: Initializer = zeros,
        rngs: nnx.Rngs,
    ) -> None:
        _odconv.check_config(
            features,
            num_experts,
            feature_group_count,
            reduction,
            min_channels,
            temperature,
            attention_placement,
            method,
            kernel_size=kernel_size,
            strides=strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            momentum=momentum,
            epsilon=epsilon,
        )
        layer = _nnx_layer_config(
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
            mixing="auto",
            method=method,
        )
        self.in_features = in_features
        self.use_running_average = use_running_average
        self.config = _odconv.ODConvConfig(
            features=features,
            kernel_size=layer.kernel_size,
            num_experts=num_experts,
            reduction=reduction,
            min_channels=min_channels,
            temperature=temperature,
            strides=strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            feature_group_count=feature_group_count,
            momentum=momentum,
            epsilon=epsilon,
            unbiased_running_var=unbiased_running_var,
            attention_placement=attention_placement,
            method=method,
            dtype=dtype,
            precision=precision,
            axis_name=axis_name,
        )
        width = _odconv.attention_width(in_features, reduction, min_channels)
        inits = {
            "kernel": branch_bank_init(kernel_init),
            "bias": bias_init,
            "attention_kernel": attention_kernel_init,
            "attention_bias": attention_bias_init,
            "scale": scale_init,
            "offset": offset_init,
        }
        shapes = _odconv.parameter_shapes(
            in_features, features, layer.kernel_size, num_experts, feature_group_count, width, use_bias
        )
        for name in _odconv.ODConvParams._fields:
            if name in shapes:
                shape, role = shapes[name]
                setattr(self, name, nnx.Param(inits[role](rngs.params(), shape, param_dtype)))
            else:
                setattr(self, name, None)
        self.mean = nnx.BatchStat(jnp.zeros((width,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((width,), jnp.float32))

    def __call__(
        self,
        inputs: jax.Array,
        temperature: float | jax.Array | None = None,
        *,
        use_running_average: bool | None = None,
    ) -> jax.Array:
        """Applies the layer: ``(B, *spatial, C_in) -> (B, *out_spatial, features)``.

        The other arguments are :meth:`jdynconv.linen.ODConv.__call__`'s.

        Args:
          use_running_average: the attention BatchNorm's mode for this call; None: the attribute.
        """
        inputs = _checks.as_array("inputs", inputs)
        num_spatial = len(self.config.kernel_size)
        _checks.check_layer_inputs(inputs, self.in_features, self.config.feature_group_count, num_spatial)
        use_running_average = self.use_running_average if use_running_average is None else use_running_average
        values = {name: getattr(self, name) for name in _odconv.ODConvParams._fields}
        params = _odconv.ODConvParams.of({name: value[...] for name, value in values.items() if value is not None})
        out, (new_mean, new_var) = _odconv.od_conv(
            self.config,
            inputs,
            self.config.temperature if temperature is None else temperature,
            params,
            self.mean[...],
            self.var[...],
            training=not use_running_average,
        )
        if not use_running_average:
            self.mean[...] = new_mean
            self.var[...] = new_var
        return out


class NoiseConst(nnx.Variable):
    """A fixed noise image (NVIDIA's ``noise_const`` buffer): stored, never trained; linen keeps it in the
    ``constants`` collection."""

    linen_collection: ClassVar[str] = "constants"


class ModulatedConv(nnx.Module):
    """The NNX twin of :class:`jdynconv.linen.ModulatedConv` (see it for the maths and every attribute): the
    same variables under the same names (``noise_const`` a :class:`NoiseConst`).

    Every argument not described here is the linen layer's attribute of the same name.

    Args:
      in_features: input channels C_in.
      kernel_size: one int per spatial dim.
      latent_features: the latents' width for the affine (required when ``affine``).
      rngs: ``nnx.Rngs`` for the initialisers, and its ``noise`` stream for random noise.
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        kernel_size: Sequence[int],
        *,
        latent_features: int | None = None,
        up: int = 1,
        down: int = 1,
        padding: _checks.PaddingLike | None = None,
        demodulate: bool = True,
        affine: bool = True,
        style_gain: float = 1.0,
        use_noise: bool = False,
        noise_shape: Sequence[int] | None = None,
        use_bias: bool = True,
        activation: str = "lrelu",
        activation_gain: float | None = None,
        clamp: float | None = None,
        resample_filter: Sequence[float] = _modulated.DEFAULT_RESAMPLE_FILTER,
        flip_weight: bool | None = None,
        fused: bool | str = "auto",
        lr_multiplier: float = 1.0,
        data_format: str = "channels_last",
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: Any = None,
        method: str = "auto",
        kernel_init: Initializer = standard_normal,
        bias_init: Initializer = zeros,
        rngs: nnx.Rngs,
    ) -> None:
        if affine and latent_features is None:
            raise ValueError("`latent_features` is required with `affine` (the width of the latents).")
        self.in_features = in_features
        self.dtype = dtype
        self.use_noise = use_noise
        self.rngs = rngs if use_noise else None
        kernel_size = _spatial_kernel_size(kernel_size)
        self.config = _modulated.LayerConfig.of(
            features=features,
            kernel_size=kernel_size,
            num_spatial=len(kernel_size),
            padding=padding,
            activation=activation,
            activation_gain=activation_gain,
            flip_weight=flip_weight,
            up=up,
            down=down,
            demodulate=demodulate,
            style_gain=style_gain,
            clamp=clamp,
            resample_filter=tuple(resample_filter),
            fused=fused,
            lr_multiplier=lr_multiplier,
            data_format=data_format,
            precision=precision,
            method=method,
        )
        shape = _modulated.kernel_shape(self.config, in_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (features,), param_dtype)) if use_bias else None
        if affine:
            normal = standard_normal(rngs.params(), (latent_features, in_features), param_dtype)
            self.affine_kernel = nnx.Param(normal / lr_multiplier)
            self.affine_bias = nnx.Param(jnp.ones((in_features,), param_dtype))
        else:
            self.affine_kernel = self.affine_bias = None
        self.noise_strength = nnx.Param(jnp.zeros((), param_dtype)) if use_noise else None
        const = None
        if use_noise and noise_shape is not None:
            const = NoiseConst(jax.random.normal(rngs.params(), tuple(noise_shape), param_dtype))
        self.noise_const = const

    def __call__(
        self,
        inputs: jax.Array,
        latents: jax.Array,
        *,
        noise: jax.Array | None = None,
        noise_mode: str = "random",
        gain: float | jax.Array = 1.0,
    ) -> jax.Array:
        """Applies the layer, as :meth:`jdynconv.linen.ModulatedConv.__call__`."""
        inputs = _checks.as_array("inputs", inputs)
        latents = _checks.as_array("latents", latents)
        config = self.config
        channels_first = config.data_format == "channels_first"
        _modulated.check_layer_inputs(config, inputs, self.in_features)
        affine = self.affine_kernel is not None
        width = self.affine_kernel.shape[0] if affine else self.in_features
        _modulated.check_latents(latents, inputs.shape[0], width, affine)
        if affine:
            styles = _modulated.affine_styles(
                latents, self.affine_kernel[...], self.affine_bias[...], config.lr_multiplier
            )
        else:
            styles = latents.astype(self.kernel.dtype)
        if not self.use_noise:
            draw = _modulated.no_noise(noise, noise_mode)
        else:
            const = self.noise_const[...] if self.noise_const is not None else None
            draw = _modulated.noise_source(
                noise, noise_mode, self.noise_strength[...], const, channels_first, lambda: self.rngs.noise()
            )
        bias = self.bias[...] if self.bias is not None else None
        inputs = inputs.astype(self.dtype or inputs.dtype)
        return _modulated.layer(config, inputs, self.kernel[...], styles, noise=draw, bias=bias, gain=gain)
