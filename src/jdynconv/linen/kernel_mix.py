"""flax.linen kernel-mixing layers: PerSampleConv (kernels passed per call), CondConv and DynamicConv (kernels
mixed per sample from k experts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdynconv import _checks, _kernel_mix
from jdynconv.linen._common import (
    Dtype,
    Initializer,
    branch_bank_init,
    check_inputs_against_bank,
    default_kernel_init,
    zeros,
)


class PerSampleConv(nn.Module):
    """A convolution whose kernels (and bias) are passed per call, one per sample: no parameters.

    For hypernetworks and other user-generated kernels; ``flax.linen.Conv``'s attributes, with the
    kernels' shape checked against them.

    Attributes:
      features: output channels C_out.
      kernel_size: int (same in every spatial dim) or one int per spatial dim.
      strides: an int or one int per spatial dim.
      padding: ``"SAME"``, ``"VALID"``, ``"CAUSAL"`` (1-D), an int, one int per spatial dim or one ``(low, high)``
        per spatial dim (as :func:`jdynconv.per_sample_conv`).
      kernel_dilation: an int or one int per spatial dim (PyTorch's ``dilation``).
      input_dilation: an int or one int per spatial dim (transposed-conv style; needs explicit or
        ``"VALID"`` padding).
      feature_group_count: G; ``C_in`` and ``features`` must be multiples of it (PyTorch's ``groups``).
      dtype: computation dtype (inputs, kernels and bias are promoted to it).
      precision: passed to the underlying conv or matmul, as in ``jax.lax``.
      method: the lowering, as :func:`jdynconv.per_sample_conv`'s (``"auto"``: the fastest measured).
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: _checks.IntOrSequence = 1
    padding: _checks.PaddingLike = "SAME"
    kernel_dilation: _checks.IntOrSequence = 1
    input_dilation: _checks.IntOrSequence = 1
    feature_group_count: int = 1
    dtype: Dtype | None = None
    precision: Any = None
    method: str = "auto"

    def __post_init__(self) -> None:
        _layer_config(self, None)  # at construction: every attribute error names the attribute
        super().__post_init__()

    def __call__(self, inputs: jax.Array, kernels: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        """Convolves each sample with its own kernel.

        Args:
          inputs: ``(B, *spatial, C_in)``, 1 to 3 spatial dims.
          kernels: ``(B, *kernel_size, C_in // G, features)``, one kernel per sample.
          bias: ``(B, features)`` per sample, ``(features,)`` shared, or None.

        Returns:
          ``(B, *out_spatial, features)``.
        """
        return _kernel_mix.per_sample_layer(_layer_config(self, None), inputs, kernels, bias)


class CondConv(nn.Module):
    """CondConv (Yang et al. 2019; timm ``CondConv2d``): per-sample kernels mixed from k experts.

    ``routing = sigmoid(Dense(mean over space of x))`` unless ``routing_weights`` ``(B, k)`` are passed
    (as timm's layer takes them); ``out = conv(x, sum_n routing[:, n] * kernel[n]) + sum_n routing[:,
    n] * bias[n]``. N-d (1-D/2-D/3-D) from the input's rank.

    Variables (``params``): ``kernel (k, *kernel_size, C_in // G, features)``, ``bias (k, features)``
    (if ``use_bias``), ``routing_kernel (C_in, k)``, ``routing_bias (k,)`` (if ``use_routing``).

    Attributes:
      features: output channels.
      kernel_size: int (same in every spatial dim) or one int per spatial dim.
      num_experts: k >= 1.
      strides: an int or one int per spatial dim (as ``flax.linen.Conv``).
      padding: ``"SAME"``, ``"VALID"``, ``"CAUSAL"`` (1-D), an int, one int per spatial dim or one
        ``(low, high)`` per spatial dim (as ``flax.linen.Conv``).
      kernel_dilation: an int or one int per spatial dim (PyTorch's ``dilation``).
      feature_group_count: G; ``C_in`` and ``features`` must be multiples of it (PyTorch's ``groups``).
      use_bias: whether each expert has a bias.
      dtype: the computation dtype (None: inferred from the inputs and parameters, as ``flax.linen.Conv``).
      param_dtype: the parameters' dtype.
      precision: passed to ``jax.lax``'s convolutions and matmuls.
      mixing: ``"mix_kernels"`` (the experts' kernels mixed per sample, then a per-sample conv),
        ``"mix_outputs"`` (one shared conv with every expert's output channels, then the outputs mixed) or
        ``"auto"`` (the cheaper for the shapes); all compute the same function.
      method: the per-sample conv's lowering when kernels are mixed, as :func:`jdynconv.per_sample_conv`'s.
      kernel_init: each expert kernel's initialiser (applied to each expert on its own).
      bias_init: each expert bias's initialiser.
      routing_kernel_init: the routing Dense's kernel initialiser.
      routing_bias_init: the routing Dense's bias initialiser.
      use_routing: whether the layer has its routing Dense; without it (timm's ``CondConv2d`` alone) every call
        passes ``routing_weights``.
    """

    features: int
    kernel_size: int | Sequence[int]
    num_experts: int
    strides: _checks.IntOrSequence = 1
    padding: _checks.PaddingLike = "SAME"
    kernel_dilation: _checks.IntOrSequence = 1
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    mixing: str = "auto"
    method: str = "auto"
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = zeros
    routing_kernel_init: Initializer = default_kernel_init
    routing_bias_init: Initializer = zeros
    use_routing: bool = True  # the newest attribute, last: the earlier ones keep their positions

    def __post_init__(self) -> None:
        _layer_config(self, self.num_experts)  # at construction: every attribute error names the attribute
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: jax.Array, routing_weights: jax.Array | None = None) -> jax.Array:
        """Applies the layer.

        Args:
          inputs: ``(B, *spatial, C_in)``, 1 to 3 spatial dims.
          routing_weights: ``(B, k)`` mixing weights to use instead of the routing Dense's (as timm's
            ``CondConv2d`` takes them); required without ``use_routing``.

        Returns:
          ``(B, *out_spatial, features)``.
        """
        inputs, bank, bias_bank = _expert_bank(self, inputs)
        k, in_channels = self.num_experts, inputs.shape[-1]
        routing_kernel = routing_bias = None
        if self.use_routing:
            routing_kernel = self.param("routing_kernel", self.routing_kernel_init, (in_channels, k), self.param_dtype)
            routing_bias = self.param("routing_bias", self.routing_bias_init, (k,), self.param_dtype)
        config = _layer_config(self, k)
        return _kernel_mix.cond_conv(config, inputs, routing_weights, routing_kernel, routing_bias, bank, bias_bank)


class DynamicConv(nn.Module):
    """Dynamic Convolution (Chen et al., CVPR 2020): kernels mixed by softmax attention with a temperature.

    ``attention = softmax(Dense(relu(Dense_nobias(mean over space of x))) / temperature)`` with
    ``hidden = int(C_in * ratio) + 1``; ``out = conv(x, sum_n attention[:, n] * kernel[n]) + sum_n
    attention[:, n] * bias[n]``. ``temperature`` is a call argument that may be traced, so one jitted
    training step serves the whole annealing schedule (see :func:`temperature_schedule`).

    Variables (``params``): ``kernel (k, *kernel_size, C_in // G, features)``, ``bias (k, features)``
    (if ``use_bias``), ``attention_hidden_kernel (C_in, hidden)``, ``attention_kernel (hidden, k)``,
    ``attention_bias (k,)``.

    Attributes:
      features: output channels.
      kernel_size: int (same in every spatial dim) or one int per spatial dim.
      num_experts: k >= 1.
      ratio: the attention's hidden width is ``int(C_in * ratio) + 1``; positive.
      temperature: the default of the call's ``temperature``; positive (the original code stores 34 and anneals
        it; :func:`jdynconv.interop.from_torch` sets the ported layer's).
      strides: an int or one int per spatial dim (as ``flax.linen.Conv``).
      padding: ``"SAME"``, ``"VALID"``, ``"CAUSAL"`` (1-D), an int, one int per spatial dim or one
        ``(low, high)`` per spatial dim (as ``flax.linen.Conv``).
      kernel_dilation: an int or one int per spatial dim (PyTorch's ``dilation``).
      feature_group_count: G; ``C_in`` and ``features`` must be multiples of it (PyTorch's ``groups``).
      use_bias: whether each expert has a bias.
      dtype: the computation dtype (None: inferred from the inputs and parameters, as ``flax.linen.Conv``).
      param_dtype: the parameters' dtype.
      precision: passed to ``jax.lax``'s convolutions and matmuls.
      mixing: ``"auto"``, ``"mix_kernels"`` or ``"mix_outputs"``, as :class:`CondConv`'s.
      method: the per-sample conv's lowering when kernels are mixed, as :func:`jdynconv.per_sample_conv`'s.
      kernel_init: each expert kernel's initialiser (applied to each expert on its own).
      bias_init: each expert bias's initialiser.
      attention_kernel_init: the attention Dense layers' kernel initialiser.
      attention_bias_init: the attention output Dense's bias initialiser.
    """

    features: int
    kernel_size: int | Sequence[int]
    num_experts: int
    ratio: float = 0.25
    strides: _checks.IntOrSequence = 1
    padding: _checks.PaddingLike = "SAME"
    kernel_dilation: _checks.IntOrSequence = 1
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    mixing: str = "auto"
    method: str = "auto"
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = zeros
    attention_kernel_init: Initializer = default_kernel_init
    attention_bias_init: Initializer = zeros
    temperature: float = 1.0  # the newest attribute, last: the earlier ones keep their positions

    def __post_init__(self) -> None:
        _layer_config(self, self.num_experts)  # at construction: every attribute error names the attribute
        _checks.check_temperature(self.temperature)
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        temperature: float | jax.Array | None = None,
        attention_weights: jax.Array | None = None,
    ) -> jax.Array:
        """Applies the layer.

        Args:
          inputs: ``(B, *spatial, C_in)``, 1 to 3 spatial dims.
          temperature: positive; divides the attention logits; None: the ``temperature`` attribute. Checked
            when concrete; a traced value (an annealing schedule under ``jit``) is the caller's to keep
            positive, as a non-positive one gives NaN or a one-hot argmax.
          attention_weights: ``(B, k)`` weights to use instead of the attention branch's.

        Returns:
          ``(B, *out_spatial, features)``.
        """
        inputs, bank, bias_bank = _expert_bank(self, inputs)
        k, in_channels = self.num_experts, inputs.shape[-1]
        hidden = _kernel_mix.hidden_width(in_channels, self.ratio)
        hidden_kernel = self.param(
            "attention_hidden_kernel", self.attention_kernel_init, (in_channels, hidden), self.param_dtype
        )
        attention_kernel = self.param("attention_kernel", self.attention_kernel_init, (hidden, k), self.param_dtype)
        attention_bias = self.param("attention_bias", self.attention_bias_init, (k,), self.param_dtype)
        return _kernel_mix.dynamic_conv(
            _layer_config(self, k),
            inputs,
            self.temperature if temperature is None else temperature,
            attention_weights,
            hidden_kernel,
            attention_kernel,
            attention_bias,
            bank,
            bias_bank,
        )


def _layer_config(module: PerSampleConv | CondConv | DynamicConv, num_experts: int | None) -> _kernel_mix.LayerConfig:
    _kernel_mix.check_layer(
        module.features,
        num_experts,
        module.feature_group_count,
        kernel_size=module.kernel_size,
        strides=module.strides,
        padding=module.padding,
        kernel_dilation=module.kernel_dilation,
        input_dilation=getattr(module, "input_dilation", 1),
        ratio=getattr(module, "ratio", None),
    )
    mixing = getattr(module, "mixing", "auto")
    _kernel_mix.check_mixing(mixing, module.method)
    return _kernel_mix.LayerConfig(
        features=module.features,
        kernel_size=module.kernel_size,
        num_experts=num_experts,
        strides=module.strides,
        padding=module.padding,
        kernel_dilation=module.kernel_dilation,
        feature_group_count=module.feature_group_count,
        dtype=module.dtype,
        precision=module.precision,
        mixing=mixing,
        method=module.method,
        input_dilation=getattr(module, "input_dilation", 1),
    )


def _expert_bank(module: CondConv | DynamicConv, inputs: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Validates the inputs (against the bank when it exists) and creates the expert kernel and bias banks
    ``(k, ...)``."""
    inputs = _checks.as_array("inputs", inputs)
    check_inputs_against_bank(module, inputs)
    kernel_size = _checks.canonicalize_ints(module.kernel_size, inputs.ndim - 2, "kernel_size")
    k, groups = module.num_experts, module.feature_group_count
    shape = (k, *kernel_size, inputs.shape[-1] // groups, module.features)
    bank = module.param("kernel", branch_bank_init(module.kernel_init), shape, module.param_dtype)
    bias_bank = (
        module.param("bias", branch_bank_init(module.bias_init), (k, module.features), module.param_dtype)
        if module.use_bias
        else None
    )
    return inputs, bank, bias_bank
