"""flax.nnx BranchMixConv: the NNX twin of :class:`jdynconv.linen.BranchMixConv`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdynconv import _branch_mix, _checks, _gates
from jdynconv.linen._common import Dtype, Initializer, branch_bank_init, default_kernel_init, ones, zeros


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
