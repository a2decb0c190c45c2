"""flax.linen modules: thin wrappers over jdynconv's functional core (same names and maths as ``nnx``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdynconv import _branch_mix, _checks

Initializer = Callable[..., jax.Array]
Dtype = Any

# Flax's defaults (flax.linen.linear): lecun_normal kernels, zero biases; BatchNorm scale ones.
default_kernel_init: Initializer = nn.initializers.lecun_normal()
zeros: Initializer = nn.initializers.zeros_init()
ones: Initializer = nn.initializers.ones_init()


def branch_bank_init(init: Initializer) -> Initializer:
    """Initialises a ``(k, *shape)`` bank as k independent draws of ``init(shape)``.

    So each branch's fan-in is its own kernel's, not k times it (as a plain initializer on the stacked
    shape would compute).
    """

    def bank_init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        keys = jax.random.split(key, shape[0])
        return jax.vmap(lambda k: init(k, tuple(shape[1:]), dtype))(keys)

    return bank_init


class BranchMixConv(nn.Module):
    """k parallel ``Conv -> BatchNorm -> activation`` branches mixed per sample by a learned gate.

    ``out = sum_n gate(x)[:, n] * act(BatchNorm_n(Conv_n(x)))``, with the defaults of the seed model:
    gate = flatten -> Dense(k) -> leaky_relu(0.01), branch activation leaky_relu(0.01), PyTorch's
    BatchNorm momentum (0.1, i.e. Flax ``momentum=0.9``) and epsilon (1e-5). The k branches run as one
    fused conv, so cost and program size do not grow with a Python loop over k.

    ``gate_input="flatten"`` flattens channel-major (PyTorch's ``nn.Flatten`` order over ``(C, *spatial)``)
    so PyTorch ``Linear`` weights port directly; ``"mean"`` pools over space (any input size).

    Variables: ``params``: ``gate_kernel (D, k)``, ``gate_bias (k,)``, ``kernel (k, *kernel_size,
    C_in // G, features)``, ``bias (k, features)`` (if ``use_bias``), ``scale``, ``offset`` ``(k,
    features)``; ``batch_stats``: ``mean``, ``var`` ``(k, features)``.

    Attributes:
      features: output channels of every branch (and of the block).
      kernel_size: int (same in every spatial dim) or one int per spatial dim.
      num_branches: k >= 1.
      strides, padding, kernel_dilation, feature_group_count: as ``flax.linen.Conv``.
      use_bias: whether each branch conv has a bias.
      momentum, epsilon: BatchNorm's (Flax convention: ``running = momentum * running + (1 - momentum) * batch``).
      use_running_average: BatchNorm mode; may instead be given at call time.
      unbiased_running_var: update the running variance with the unbiased batch variance, as PyTorch does.
      gate_input: ``"flatten"`` (seed) or ``"mean"``.
      gate_activation: ``"leaky_relu"`` (seed), ``"softmax"`` (with the call's ``temperature``),
        ``"sigmoid"``, ``"identity"`` or a callable on the ``(B, k)`` logits.
      branch_activation: applied after each BatchNorm.
      remat: recompute the branch activations in the backward pass (training memory flat in k).
      dtype, param_dtype, precision, kernel_init, bias_init: as ``flax.linen.Conv``.
      gate_kernel_init, gate_bias_init, scale_init, offset_init: the gate Dense's and BatchNorm's.
    """

    features: int
    kernel_size: int | Sequence[int]
    num_branches: int
    strides: _checks.IntOrSequence = 1
    padding: _checks.PaddingLike = "SAME"
    kernel_dilation: _checks.IntOrSequence = 1
    feature_group_count: int = 1
    use_bias: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-5
    use_running_average: bool | None = None
    unbiased_running_var: bool = False
    gate_input: _branch_mix.GateInput = "flatten"
    gate_activation: str | Callable[[jax.Array], jax.Array] = "leaky_relu"
    branch_activation: Callable[[jax.Array], jax.Array] = _branch_mix.leaky_relu
    remat: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = zeros
    gate_kernel_init: Initializer = default_kernel_init
    gate_bias_init: Initializer = zeros
    scale_init: Initializer = ones
    offset_init: Initializer = zeros

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        *,
        use_running_average: bool | None = None,
        temperature: float | jax.Array = 1.0,
        gate_weights: jax.Array | None = None,
    ) -> jax.Array:
        """Applies the block.

        Args:
          inputs: ``(B, *spatial, C_in)``, 1 to 3 spatial dims.
          use_running_average: BatchNorm mode, if not set as an attribute.
          temperature: divides the logits of a ``"softmax"`` gate; may be traced.
          gate_weights: ``(B, k)`` mixing weights to use instead of the gate's.

        Returns:
          ``(B, *out_spatial, features)``.
        """
        _branch_mix.check_config(
            self.features, self.num_branches, self.feature_group_count, self.gate_input, self.gate_activation
        )
        inputs = jnp.asarray(inputs)
        _branch_mix.check_inputs(inputs, None, self.feature_group_count)
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        k, groups, features = self.num_branches, self.feature_group_count, self.features
        kernel_size = _branch_mix.kernel_size_for(self.kernel_size, inputs.ndim - 2)
        in_channels = inputs.shape[-1]

        gate_dim = in_channels * math.prod(inputs.shape[1:-1]) if self.gate_input == "flatten" else in_channels
        if self.has_variable("params", "gate_kernel"):
            # Before self.param, whose own shape error would not say what the gate was built for.
            built_for = self.get_variable("params", "gate_kernel").shape[0]
            _branch_mix.check_gate_size(gate_dim, built_for, inputs.shape)
        gate_kernel = self.param("gate_kernel", self.gate_kernel_init, (gate_dim, k), self.param_dtype)
        gate_bias = self.param("gate_bias", self.gate_bias_init, (k,), self.param_dtype)
        kernel = self.param(
            "kernel",
            branch_bank_init(self.kernel_init),
            (k, *kernel_size, in_channels // groups, features),
            self.param_dtype,
        )
        bias = (
            self.param("bias", branch_bank_init(self.bias_init), (k, features), self.param_dtype)
            if self.use_bias
            else None
        )
        scale = self.param("scale", self.scale_init, (k, features), self.param_dtype)
        offset = self.param("offset", self.offset_init, (k, features), self.param_dtype)
        mean = self.variable("batch_stats", "mean", jnp.zeros, (k, features), jnp.float32)
        var = self.variable("batch_stats", "var", jnp.ones, (k, features), jnp.float32)

        out, (new_mean, new_var) = _branch_mix.apply_block(
            self._block_config(),
            inputs,
            gate_kernel,
            gate_bias,
            _branch_mix.BranchParams(kernel, bias, scale, offset),
            mean.value,
            var.value,
            training=not use_running_average,
            temperature=temperature,
            gate_weights=gate_weights,
        )
        if not use_running_average and not self.is_initializing():
            mean.value, var.value = new_mean, new_var
        return out

    def _block_config(self) -> _branch_mix.BlockConfig:
        return _branch_mix.BlockConfig(
            features=self.features,
            num_branches=self.num_branches,
            strides=self.strides,
            padding=self.padding,
            kernel_dilation=self.kernel_dilation,
            feature_group_count=self.feature_group_count,
            momentum=self.momentum,
            epsilon=self.epsilon,
            unbiased_running_var=self.unbiased_running_var,
            gate_input=self.gate_input,
            gate_activation=self.gate_activation,
            branch_activation=self.branch_activation,
            remat=self.remat,
            dtype=self.dtype,
            precision=self.precision,
        )
