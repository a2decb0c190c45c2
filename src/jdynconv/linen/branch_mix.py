"""flax.linen BranchMixConv: k parallel ``Conv -> BatchNorm -> activation`` branches mixed per sample by a gate."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdynconv import _branch_mix, _checks, _gates
from jdynconv.linen._common import (
    Dtype,
    Initializer,
    branch_bank_init,
    check_inputs_against_bank,
    default_kernel_init,
    ones,
    zeros,
)


class BranchMixConv(nn.Module):
    """k parallel ``Conv -> BatchNorm -> activation`` branches mixed per sample by a learned gate.

    ``out = sum_n gate(x)[:, n] * act(BatchNorm_n(Conv_n(x)))``, with the defaults of the :term:`seed model`:
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
      strides: an int or one int per spatial dim (as ``flax.linen.Conv``).
      padding: ``"SAME"``, ``"VALID"``, ``"CAUSAL"`` (1-D), an int, one int per spatial dim or one ``(low, high)``
        per spatial dim (as ``flax.linen.Conv``).
      kernel_dilation: an int or one int per spatial dim (PyTorch's ``dilation``).
      feature_group_count: G; ``C_in`` and ``features`` must be multiples of it (PyTorch's ``groups``).
      use_bias: whether each branch conv has a bias.
      momentum: BatchNorm's, in Flax's convention: ``running = momentum * running + (1 - momentum) * batch``
        (PyTorch's ``momentum=0.1`` is 0.9).
      epsilon: BatchNorm's, added to the variance.
      use_running_average: BatchNorm mode; may instead be given at call time.
      unbiased_running_var: update the running variance with the unbiased batch variance, as PyTorch does.
      gate_input: ``"flatten"`` (the seed model's) or ``"mean"``.
      gate_activation: ``"leaky_relu"`` (the seed model's), ``"softmax"`` (with the call's ``temperature``),
        ``"sigmoid"``, ``"identity"`` or a callable on the ``(B, k)`` logits.
      branch_activation: applied after each BatchNorm.
      remat: recompute the branch activations in the backward pass, one branch at a time (a checkpointed
        scan over the branches: training memory flat in k). Its own lowering: needs ``method="auto"``.
      method: ``"fused"`` (one conv over the whole batch), ``"chunked"`` (the same over cache-sized
        chunks of the batch, recomputed in the backward pass) or ``"auto"`` (chunked on CPU, fused
        elsewhere); all compute the same function.
      axis_name: as ``flax.linen.BatchNorm``'s: inside ``jax.shard_map``, the mesh axis (or axes) over which
        the batch is split, so that the statistics are the whole batch's. Not needed under ``jax.jit``.
      dtype: the computation dtype (None: inferred from the inputs and parameters, as ``flax.linen.Conv``).
      param_dtype: the parameters' dtype.
      precision: passed to ``jax.lax``'s convolutions and matmuls.
      kernel_init: each branch kernel's initialiser (applied to each branch on its own).
      bias_init: each branch bias's initialiser.
      gate_kernel_init: the gate Dense's kernel initialiser.
      gate_bias_init: the gate Dense's bias initialiser.
      scale_init: the BatchNorm scales' initialiser.
      offset_init: the BatchNorm offsets' initialiser.
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
    gate_input: _gates.GateInput = "flatten"
    gate_activation: str | Callable[[jax.Array], jax.Array] = "leaky_relu"
    branch_activation: Callable[[jax.Array], jax.Array] = _gates.leaky_relu
    remat: bool = False
    method: str = "auto"
    axis_name: str | tuple[str, ...] | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = zeros
    gate_kernel_init: Initializer = default_kernel_init
    gate_bias_init: Initializer = zeros
    scale_init: Initializer = ones
    offset_init: Initializer = zeros

    def __post_init__(self) -> None:
        _branch_mix.check_config(  # at construction: every attribute error names the attribute
            self.features,
            self.num_branches,
            self.feature_group_count,
            self.gate_input,
            self.gate_activation,
            self.method,
            self.remat,
            kernel_size=self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            kernel_dilation=self.kernel_dilation,
            momentum=self.momentum,
            epsilon=self.epsilon,
        )
        super().__post_init__()

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
        inputs = _checks.as_array("inputs", inputs)
        check_inputs_against_bank(self, inputs)
        _checks.check_temperature(temperature)
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
            method=self.method,
            # As flax.linen.BatchNorm: no collective while initialising, which runs outside the shard_map.
            axis_name=None if self.is_initializing() else self.axis_name,
        )
