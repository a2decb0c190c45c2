"""flax.linen modules: thin wrappers over jdynconv's functional core (same names and maths as ``nnx``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdynconv import _branch_mix, _checks, _gates, _kernel_mix, _modulated, _odconv

__all__ = [
    "BranchMixConv",
    "CondConv",
    "DynamicConv",
    "ModulatedConv",
    "ODConv",
    "PerSampleConv",
]

Initializer = Callable[..., jax.Array]
Dtype = Any

# Flax's defaults (flax.linen.linear): lecun_normal kernels, zero biases; BatchNorm scale ones.
default_kernel_init: Initializer = nn.initializers.lecun_normal()
zeros: Initializer = nn.initializers.zeros_init()
ones: Initializer = nn.initializers.ones_init()
# NVIDIA StyleGAN2's kernels and affine weights: standard normal (demodulation, or the affine's 1 / sqrt(fan_in)
# gain at run time, sets the scale).
standard_normal: Initializer = nn.initializers.normal(1.0)


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
        _check_inputs_against_bank(self, inputs)
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
    _check_inputs_against_bank(module, inputs)
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


def _check_inputs_against_bank(module: nn.Module, inputs: jax.Array) -> None:
    """``inputs`` of the rank and channels the ``kernel`` bank ``(k, *kernel_size, C_in // G, features)`` was
    built for; checked before ``self.param``, whose shape error would not say what the layer expects."""
    in_features = num_spatial = None
    if module.has_variable("params", "kernel"):
        shape = module.get_variable("params", "kernel").shape
        num_spatial, in_features = len(shape) - 3, shape[-2] * module.feature_group_count
    _checks.check_layer_inputs(inputs, in_features, module.feature_group_count, num_spatial)


# ODConv's initialisation (OSVAI/ODConv modules/odconv.py): ``kaiming_normal_(mode="fan_out",
# nonlinearity="relu")`` for every expert kernel and the attention's 1x1 convs, i.e. N(0, 2 / fan_out),
# untruncated; fan_out = C_out * prod(K) in both layouts.
kaiming_normal_fan_out: Initializer = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ODConv(nn.Module):
    """ODConv (Li et al., ICLR 2022): kernels scaled per sample along taps, input and output channels and experts.

    The maths (``jdynconv._odconv``, after OSVAI/ODConv ``modules/odconv.py``)::

        h = relu(BatchNorm(mean over space of x @ attention_kernel))        (B, A)
        channel, filter, spatial = sigmoid(Dense_c, Dense_f, Dense_s of h / temperature)
        expert = softmax(Dense_e(h) / temperature)
        out[b] = filter[b] * conv(channel[b] * x[b],
                                  spatial[b] * sum_n expert[b, n] * kernel[n])  (+ bias)

    with ``A = max(int(C_in * reduction), min_channels)``. Skipped as in the original (no head, attention 1):
    ``filter`` for a depthwise conv (``C_in == feature_group_count == features``), ``spatial`` for a one-tap
    kernel, ``expert`` for ``num_experts == 1``. N-d (1-D/2-D/3-D) from the input's rank. The temperature is
    a call argument that may be traced (anneal it with :func:`jdynconv.temperature_schedule`, e.g. 30 -> 1 as
    the original's training script), or the ``temperature`` attribute when not given.

    Variables: ``params``: ``kernel (k, *kernel_size, C_in // G, features)``, ``bias (features,)`` (if
    ``use_bias``; the original has none), ``attention_kernel (C_in, A)``, ``scale``, ``offset`` ``(A,)``
    (the attention's BatchNorm), ``channel_kernel (A, C_in)``, ``channel_bias (C_in,)``, ``filter_kernel
    (A, features)``, ``filter_bias (features,)``, ``spatial_kernel (A, prod(kernel_size))``, ``spatial_bias
    (prod(kernel_size),)``, ``expert_kernel (A, k)``, ``expert_bias (k,)``; ``batch_stats``: ``mean``,
    ``var`` ``(A,)``.

    Attributes:
      features: output channels.
      kernel_size: int (same in every spatial dim) or one int per spatial dim.
      num_experts: k >= 1 expert kernels (the original's ``kernel_num``, default 4).
      reduction: the attention's width is ``max(int(C_in * reduction), min_channels)`` (the original's
        default 0.0625).
      min_channels: the attention's smallest width (the original's default 16).
      temperature: the default of the call's ``temperature``; positive.
      strides: an int or one int per spatial dim (as ``flax.linen.Conv``).
      padding: ``"SAME"``, ``"VALID"``, ``"CAUSAL"`` (1-D), an int, one int per spatial dim or one
        ``(low, high)`` per spatial dim (as ``flax.linen.Conv``).
      kernel_dilation: an int or one int per spatial dim (PyTorch's ``dilation``).
      feature_group_count: G; ``C_in`` and ``features`` must be multiples of it (PyTorch's ``groups``).
      use_bias: whether the conv has a bias (the original has none).
      momentum: the attention BatchNorm's, in Flax's convention (PyTorch's ``momentum=0.1`` is 0.9).
      epsilon: the attention BatchNorm's, added to the variance.
      use_running_average: the attention BatchNorm's mode; may instead be given at call time.
      unbiased_running_var: update the running variance with the unbiased batch variance, as PyTorch does.
      attention_placement: ``"auto"``, ``"kernel"`` or ``"activations"``: where the channel and filter
        attentions are applied (same result; see ``jdynconv._odconv``).
      method: the per-sample conv's lowering, as :func:`jdynconv.per_sample_conv`'s.
      axis_name: as :class:`BranchMixConv`'s: the mesh axis (or axes) the batch is split over inside
        ``jax.shard_map``, for the attention BatchNorm's statistics.
      dtype: the computation dtype (None: inferred from the inputs and parameters, as ``flax.linen.Conv``).
      param_dtype: the parameters' dtype.
      precision: passed to ``jax.lax``'s convolutions and matmuls.
      kernel_init: each expert's kernel (default: the original's kaiming normal, fan out).
      bias_init: the conv bias's initialiser.
      attention_kernel_init: the attention Dense layers' kernel initialiser (default: the original's).
      attention_bias_init: the attention Dense layers' bias initialiser.
      scale_init: the attention BatchNorm scale's initialiser.
      offset_init: the attention BatchNorm offset's initialiser.
    """

    features: int
    kernel_size: int | Sequence[int]
    num_experts: int = 4
    reduction: float = 0.0625
    min_channels: int = 16
    temperature: float = 1.0
    strides: _checks.IntOrSequence = 1
    padding: _checks.PaddingLike = "SAME"
    kernel_dilation: _checks.IntOrSequence = 1
    feature_group_count: int = 1
    use_bias: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    use_running_average: bool | None = None
    unbiased_running_var: bool = False
    attention_placement: str = "auto"
    method: str = "auto"
    axis_name: str | tuple[str, ...] | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = kaiming_normal_fan_out
    bias_init: Initializer = zeros
    attention_kernel_init: Initializer = kaiming_normal_fan_out
    attention_bias_init: Initializer = zeros
    scale_init: Initializer = ones
    offset_init: Initializer = zeros

    def __post_init__(self) -> None:
        _odconv.check_config(  # at construction: every attribute error names the attribute
            self.features,
            self.num_experts,
            self.feature_group_count,
            self.reduction,
            self.min_channels,
            self.temperature,
            self.attention_placement,
            self.method,
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
        temperature: float | jax.Array | None = None,
        *,
        use_running_average: bool | None = None,
    ) -> jax.Array:
        """Applies the layer.

        Args:
          inputs: ``(B, *spatial, C_in)``, 1 to 3 spatial dims.
          temperature: positive; divides every attention logit. None: the ``temperature`` attribute. A traced
            value is the caller's to keep positive (checked when concrete).
          use_running_average: the attention's BatchNorm mode, if not set as an attribute.

        Returns:
          ``(B, *out_spatial, features)``.
        """
        inputs = _checks.as_array("inputs", inputs)
        _check_inputs_against_bank(self, inputs)
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        kernel_size = _checks.canonicalize_ints(self.kernel_size, inputs.ndim - 2, "kernel_size")
        in_channels = inputs.shape[-1]
        width = _odconv.attention_width(in_channels, self.reduction, self.min_channels)
        inits = {
            "kernel": branch_bank_init(self.kernel_init),
            "bias": self.bias_init,
            "attention_kernel": self.attention_kernel_init,
            "attention_bias": self.attention_bias_init,
            "scale": self.scale_init,
            "offset": self.offset_init,
        }
        shapes = _odconv.parameter_shapes(
            in_channels, self.features, kernel_size, self.num_experts, self.feature_group_count, width, self.use_bias
        )
        params = {
            name: self.param(name, inits[role], shape, self.param_dtype) for name, (shape, role) in shapes.items()
        }
        mean = self.variable("batch_stats", "mean", jnp.zeros, (width,), jnp.float32)
        var = self.variable("batch_stats", "var", jnp.ones, (width,), jnp.float32)
        out, (new_mean, new_var) = _odconv.od_conv(
            self._config(kernel_size),
            inputs,
            self.temperature if temperature is None else temperature,
            _odconv.ODConvParams.of(params),
            mean.value,
            var.value,
            training=not use_running_average,
        )
        if not use_running_average and not self.is_initializing():
            mean.value, var.value = new_mean, new_var
        return out

    def _config(self, kernel_size: tuple[int, ...]) -> _odconv.ODConvConfig:
        return _odconv.ODConvConfig(
            features=self.features,
            kernel_size=kernel_size,
            num_experts=self.num_experts,
            reduction=self.reduction,
            min_channels=self.min_channels,
            temperature=self.temperature,
            strides=self.strides,
            padding=self.padding,
            kernel_dilation=self.kernel_dilation,
            feature_group_count=self.feature_group_count,
            momentum=self.momentum,
            epsilon=self.epsilon,
            unbiased_running_var=self.unbiased_running_var,
            attention_placement=self.attention_placement,
            method=self.method,
            dtype=self.dtype,
            precision=self.precision,
            # As flax.linen.BatchNorm: no collective while initialising, which runs outside the shard_map.
            axis_name=None if self.is_initializing() else self.axis_name,
        )


class ModulatedConv(nn.Module):
    """StyleGAN2's modulated convolution layer (NVIDIA's ``SynthesisLayer``; ``ToRGBLayer`` with
    ``demodulate=False``, ``style_gain=1 / sqrt(C_in * prod(kernel_size))``, ``padding=0``, no noise, linear).

    ``styles = affine(latents)`` (NVIDIA's ``FullyConnectedLayer``, bias initialised to 1) unless ``affine``
    is False (then the call's second argument is the styles); ``out = act(modulated_conv(x, kernel,
    styles * style_gain) + noise * noise_strength + bias) * activation_gain * gain``, clamped at
    ``clamp * gain``. N-d (1-D/2-D/3-D) from the input's rank. See :func:`jdynconv.modulated_conv`.

    Variables: ``params``: ``kernel`` ``(*kernel_size, C_in, features)`` (``(features, C_in, *kernel_size)``
    for ``"channels_first"``), ``bias (features,)``, ``affine_kernel (latent_dim, C_in)``,
    ``affine_bias (C_in,)``, ``noise_strength ()``; ``constants``: ``noise_const`` (``noise_shape``) for
    ``noise_mode="const"``.

    Attributes:
      features: output channels C_out.
      kernel_size: int (same in every spatial dim) or one int per spatial dim.
      up: up-sampling factor, as :func:`jdynconv.modulated_conv`'s.
      down: down-sampling factor, as :func:`jdynconv.modulated_conv`'s.
      padding: as :func:`jdynconv.modulated_conv`'s; None is ``kernel_size // 2`` (NVIDIA's).
      demodulate: normalise each output channel's per-sample kernel, as :func:`jdynconv.modulated_conv`'s.
      affine: styles from a Dense of the latents (True) or passed in (False).
      style_gain: multiplies the styles (ToRGB's weight gain).
      use_noise: add ``noise_strength`` (initialised to 0) times noise.
      noise_shape: the output's spatial shape, for ``noise_mode="const"``; with it the layer has a
        ``constants`` collection, which every ``apply`` then needs (pass all of ``init``'s variables).
      use_bias: whether the layer adds a bias.
      activation: ``"lrelu"`` (slope 0.2) or ``"linear"``.
      activation_gain: multiplies the activation (None: sqrt(2) for lrelu, 1 for linear).
      clamp: clamps the output to ``[-clamp * gain, clamp * gain]`` (NVIDIA's ``conv_clamp``); None: no clamp.
      resample_filter: the FIR filter of ``up``/``down``, as :func:`jdynconv.modulated_conv`'s.
      flip_weight: as :func:`jdynconv.modulated_conv`'s; None is ``up == 1`` (NVIDIA's).
      fused: per-sample kernels (True), scaled activations around one shared conv (False) or ``"auto"``, as
        :func:`jdynconv.modulated_conv`'s.
      lr_multiplier: the affine's learning-rate multiplier.
      data_format: ``"channels_last"`` or ``"channels_first"`` (PyTorch's layout, for inputs and kernel).
      dtype: the convolution's dtype (the inputs are cast to it; None: the inputs'); the per-sample kernels are
        cast to it too, while styles, modulation and demodulation stay in ``param_dtype`` (NVIDIA's
        ``.to(x.dtype)`` scheme, not Flax's ``promote_dtype``).
      param_dtype: the parameters' dtype.
      precision: passed to the convs, as in ``jax.lax``.
      method: the :func:`jdynconv.per_sample_conv` lowering of the fused path.
      kernel_init: the kernel's initialiser (NVIDIA's: standard normal).
      bias_init: the bias's initialiser.
    """

    features: int
    kernel_size: int | Sequence[int]
    up: int = 1
    down: int = 1
    padding: _checks.PaddingLike | None = None
    demodulate: bool = True
    affine: bool = True
    style_gain: float = 1.0
    use_noise: bool = False
    noise_shape: Sequence[int] | None = None
    use_bias: bool = True
    activation: str = "lrelu"
    activation_gain: float | None = None
    clamp: float | None = None
    resample_filter: Sequence[float] = _modulated.DEFAULT_RESAMPLE_FILTER
    flip_weight: bool | None = None
    fused: bool | str = "auto"
    lr_multiplier: float = 1.0
    data_format: str = "channels_last"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    method: str = "auto"
    kernel_init: Initializer = standard_normal
    bias_init: Initializer = zeros

    def __post_init__(self) -> None:
        _modulated_config(self, _attribute_rank(self))  # at construction: every attribute error names the attribute
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        latents: jax.Array,
        *,
        noise: jax.Array | None = None,
        noise_mode: str = "random",
        gain: float | jax.Array = 1.0,
    ) -> jax.Array:
        """Applies the layer.

        Args:
          inputs: ``(B, *spatial, C_in)``, or ``(B, C_in, *spatial)`` for ``"channels_first"``.
          latents: ``(B, latent_dim)``; without ``affine``, the styles ``(B, C_in)``.
          noise: ``(B, *out_spatial, 1)`` in the output's layout, or the output's shape: replaces the draw
            from the ``"noise"`` rng stream in ``noise_mode="random"``.
          noise_mode: ``"random"``, ``"const"`` (adds ``noise_const``) or ``"none"`` (adds nothing).
          gain: multiplies the output (and the clamp), as NVIDIA's ``gain``.

        Returns:
          ``(B, *out_spatial, features)``, or ``(B, features, *out_spatial)`` for ``"channels_first"``.
        """
        inputs = _checks.as_array("inputs", inputs)
        latents = _checks.as_array("latents", latents)
        channels_first = self.data_format == "channels_first"
        built_for = self.get_variable("params", "kernel").shape if self.has_variable("params", "kernel") else None
        rank = inputs.ndim - 2 if _checks.is_int(self.kernel_size) else len(self.kernel_size)
        rank = len(built_for) - 2 if built_for is not None else rank
        config = _modulated_config(self, rank)
        in_features = None if built_for is None else built_for[1 if channels_first else -2]
        _modulated.check_layer_inputs(config, inputs, in_features)
        in_channels = inputs.shape[1 if channels_first else -1]
        width = in_channels
        if self.affine:
            built = self.has_variable("params", "affine_kernel")
            width = self.get_variable("params", "affine_kernel").shape[0] if built else None
        _modulated.check_latents(latents, inputs.shape[0], width, self.affine)
        kernel = self.param("kernel", self.kernel_init, _modulated.kernel_shape(config, in_channels), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        if self.affine:
            affine_kernel = self.param(
                "affine_kernel",
                _scaled(standard_normal, 1 / self.lr_multiplier),
                (latents.shape[-1], in_channels),
                self.param_dtype,
            )
            affine_bias = self.param("affine_bias", ones, (in_channels,), self.param_dtype)
            styles = _modulated.affine_styles(latents, affine_kernel, affine_bias, self.lr_multiplier)
        else:
            styles = latents.astype(self.param_dtype)
        if not self.use_noise:
            draw = _modulated.no_noise(noise, noise_mode)
        else:
            strength = self.param("noise_strength", zeros, (), self.param_dtype)
            const = None
            if self.noise_shape is not None:
                shape = tuple(self.noise_shape)
                key = self.make_rng("params") if self.is_initializing() else None
                const = self.variable("constants", "noise_const", jax.random.normal, key, shape, self.param_dtype).value
            draw = _modulated.noise_source(
                noise, noise_mode, strength, const, channels_first, lambda: self.make_rng("noise")
            )
        inputs = inputs.astype(self.dtype or inputs.dtype)
        return _modulated.layer(config, inputs, kernel, styles, noise=draw, bias=bias, gain=gain)


def _scaled(init: Initializer, factor: float) -> Initializer:
    def scaled_init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        return init(key, shape, dtype) * jnp.asarray(factor, dtype)

    return scaled_init


def _attribute_rank(module: ModulatedConv) -> int:
    """The number of spatial dims the attributes fix (by ``kernel_size``, ``padding`` or an N-d filter), or 1
    where none does: enough to check them before the inputs come."""
    for value in (module.kernel_size, module.padding):
        if isinstance(value, Sequence) and not isinstance(value, str) and 1 <= len(value) <= 3:
            return len(value)
    try:
        return max(1, min(3, np.ndim(module.resample_filter)))
    except (TypeError, ValueError):  # not an array: setup_filter says so, naming `resample_filter`
        return 1


def _modulated_config(module: ModulatedConv, num_spatial: int) -> _modulated.LayerConfig:
    return _modulated.LayerConfig.of(
        features=module.features,
        kernel_size=module.kernel_size,
        num_spatial=num_spatial,
        padding=module.padding,
        activation=module.activation,
        activation_gain=module.activation_gain,
        flip_weight=module.flip_weight,
        up=module.up,
        down=module.down,
        demodulate=module.demodulate,
        style_gain=module.style_gain,
        clamp=module.clamp,
        resample_filter=tuple(module.resample_filter),
        fused=module.fused,
        lr_multiplier=module.lr_multiplier,
        data_format=module.data_format,
        precision=module.precision,
        method=module.method,
    )
