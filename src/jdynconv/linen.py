"""flax.linen modules: thin wrappers over jdynconv's functional core (same names and maths as ``nnx``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdynconv import _branch_mix, _checks, _gates, _kernel_mix, _modulated, _odconv

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
      remat: recompute the branch activations in the backward pass, one branch at a time (a checkpointed
        scan over the branches: training memory flat in k). Its own lowering: needs ``method="auto"``.
      method: ``"fused"`` (one conv over the whole batch), ``"chunked"`` (the same over cache-sized
        chunks of the batch, recomputed in the backward pass) or ``"auto"`` (chunked on CPU, fused
        elsewhere); all compute the same function.
      axis_name: as ``flax.linen.BatchNorm``'s: inside ``jax.shard_map``, the mesh axis (or axes) over which
        the batch is split, so that the statistics are the whole batch's. Not needed under ``jax.jit``.
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
            self.features,
            self.num_branches,
            self.feature_group_count,
            self.gate_input,
            self.gate_activation,
            self.method,
            self.remat,
        )
        inputs = jnp.asarray(inputs)
        _checks.check_layer_inputs(inputs, None, self.feature_group_count)
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
      strides, padding, kernel_dilation, input_dilation, feature_group_count: as
        :func:`jdynconv.per_sample_conv`.
      dtype: computation dtype (inputs, kernels and bias are promoted to it).
      precision, method: as :func:`jdynconv.per_sample_conv`.
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

    def __call__(self, inputs: jax.Array, kernels: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        """``(B, *spatial, C_in)`` with kernels ``(B, *kernel_size, C_in // G, features)`` and bias
        ``(B, features)`` or ``(features,)`` -> ``(B, *out_spatial, features)``."""
        return _kernel_mix.per_sample_layer(_layer_config(self, None), inputs, kernels, bias)


class CondConv(nn.Module):
    """CondConv (Yang et al. 2019; timm ``CondConv2d``): per-sample kernels mixed from k experts.

    ``routing = sigmoid(Dense(mean over space of x))`` unless ``routing_weights`` ``(B, k)`` are passed
    (as timm's layer takes them); ``out = conv(x, sum_n routing[:, n] * kernel[n]) + sum_n routing[:,
    n] * bias[n]``. N-d (1-D/2-D/3-D) from the input's rank.

    Variables (``params``): ``kernel (k, *kernel_size, C_in // G, features)``, ``bias (k, features)``
    (if ``use_bias``), ``routing_kernel (C_in, k)``, ``routing_bias (k,)``.

    Attributes:
      features, kernel_size, strides, padding, kernel_dilation, feature_group_count, use_bias, dtype,
        param_dtype, precision, kernel_init, bias_init: as ``flax.linen.Conv``.
      num_experts: k >= 1.
      mixing: ``"auto"``, ``"mix_kernels"`` or ``"mix_outputs"`` (see ``jdynconv._kernel_mix``).
      method: the per-sample conv's lowering when kernels are mixed.
      routing_kernel_init, routing_bias_init: the routing Dense's.
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

    @nn.compact
    def __call__(self, inputs: jax.Array, routing_weights: jax.Array | None = None) -> jax.Array:
        """``(B, *spatial, C_in)`` -> ``(B, *out_spatial, features)``; ``routing_weights`` ``(B, k)``."""
        inputs, bank, bias_bank = _expert_bank(self, inputs)
        k, in_channels = self.num_experts, inputs.shape[-1]
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

    Attributes: as :class:`CondConv`, plus ``ratio`` (hidden width) and the attention initialisers.
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

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        temperature: float | jax.Array = 1.0,
        attention_weights: jax.Array | None = None,
    ) -> jax.Array:
        """``(B, *spatial, C_in)`` -> ``(B, *out_spatial, features)``.

        Args:
          temperature: positive; divides the attention logits (checked when concrete; a traced value
            is the caller's responsibility, as a non-positive one gives NaN or a one-hot argmax).
          attention_weights: ``(B, k)`` weights to use instead of the attention branch's.
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
            temperature,
            attention_weights,
            hidden_kernel,
            attention_kernel,
            attention_bias,
            bank,
            bias_bank,
        )


def _layer_config(module: PerSampleConv | CondConv | DynamicConv, num_experts: int | None) -> _kernel_mix.LayerConfig:
    _kernel_mix.check_layer(module.features, num_experts, module.feature_group_count)
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
    """Validates the inputs and creates the expert kernel and bias banks ``(k, ...)``."""
    _layer_config(module, module.num_experts)
    inputs = jnp.asarray(inputs)
    _checks.check_layer_inputs(inputs, None, module.feature_group_count)
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
        out[b] = filter[b] * conv(channel[b] * x[b], spatial[b] * sum_n expert[b, n] * kernel[n]) (+ bias)

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
      features, kernel_size, strides, padding, kernel_dilation, feature_group_count, use_bias, dtype,
        param_dtype, precision: as ``flax.linen.Conv``.
      num_experts: k >= 1 expert kernels (the original's ``kernel_num``, default 4).
      reduction, min_channels: the attention's width ``max(int(C_in * reduction), min_channels)``
        (the original's defaults 0.0625 and 16).
      temperature: the default of the call's ``temperature``; positive.
      momentum, epsilon, use_running_average, unbiased_running_var, axis_name: the attention's BatchNorm, as
        :class:`BranchMixConv`'s (PyTorch's momentum 0.1 is ``momentum=0.9``; ``unbiased_running_var=True``
        stores PyTorch's running variance).
      attention_placement: ``"auto"``, ``"kernel"`` or ``"activations"``: where the channel and filter
        attentions are applied (same result; see ``jdynconv._odconv``).
      method: the per-sample conv's lowering, as :func:`jdynconv.per_sample_conv`'s.
      kernel_init: each expert's kernel (default: the original's kaiming normal, fan out).
      bias_init, attention_kernel_init, attention_bias_init, scale_init, offset_init: the bias's, the
        attention Dense layers' and its BatchNorm's (defaults: the original's).
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
        _odconv.check_config(
            self.features,
            self.num_experts,
            self.feature_group_count,
            self.reduction,
            self.min_channels,
            self.temperature,
            self.attention_placement,
            self.method,
        )
        inputs = jnp.asarray(inputs)
        _checks.check_layer_inputs(inputs, None, self.feature_group_count)
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
      features: C_out. kernel_size: int or one int per spatial dim.
      up, down, demodulate, resample_filter, flip_weight, fused, data_format, precision, method: as
        :func:`jdynconv.modulated_conv`; ``padding`` None is ``kernel_size // 2`` and ``flip_weight`` None
        is ``up == 1`` (NVIDIA's).
      affine: styles from a Dense of the latents (True) or passed in (False).
      style_gain: multiplies the styles (ToRGB's weight gain).
      use_noise: add ``noise_strength`` (initialised to 0) times noise; noise_shape: the output's spatial
        shape, for ``noise_mode="const"``; with it the layer has a ``constants`` collection, which every
        ``apply`` then needs (pass all of ``init``'s variables).
      use_bias, activation (``"lrelu"``, slope 0.2, or ``"linear"``), activation_gain (None: sqrt(2) for
        lrelu, 1 for linear), clamp (NVIDIA's ``conv_clamp``).
      lr_multiplier: the affine's learning-rate multiplier.
      dtype: the convolution's dtype (the inputs are cast to it; None: the inputs'); the per-sample kernels are
        cast to it too, while styles, modulation and demodulation stay in ``param_dtype`` (NVIDIA's
        ``.to(x.dtype)`` scheme, not Flax's ``promote_dtype``).
      param_dtype, kernel_init (NVIDIA's: standard normal), bias_init: as Flax.
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
        """``(B, *spatial, C_in)`` (or ``(B, C_in, *spatial)``) and latents ``(B, latent_dim)`` (styles
        ``(B, C_in)`` without ``affine``) -> ``(B, *out_spatial, features)`` (or channels first).

        ``noise`` (``(B, *out_spatial, 1)`` in the output's layout, or the output's shape) replaces the draw
        from the ``"noise"`` rng stream in ``noise_mode="random"``; ``"const"`` adds ``noise_const``,
        ``"none"`` nothing.
        """
        inputs = jnp.asarray(inputs)
        channels_first = self.data_format == "channels_first"
        rank = inputs.ndim - 2 if _checks.is_int(self.kernel_size) else len(self.kernel_size)
        config = _modulated_config(self, rank)
        _modulated.check_layer_inputs(config, inputs, None)
        in_channels = inputs.shape[1 if channels_first else -1]
        kernel = self.param("kernel", self.kernel_init, _modulated.kernel_shape(config, in_channels), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        if self.affine:
            latents = jnp.asarray(latents)
            affine_kernel = self.param(
                "affine_kernel",
                _scaled(standard_normal, 1 / self.lr_multiplier),
                (latents.shape[-1], in_channels),
                self.param_dtype,
            )
            affine_bias = self.param("affine_bias", ones, (in_channels,), self.param_dtype)
            styles = _modulated.affine_styles(latents, affine_kernel, affine_bias, self.lr_multiplier)
        else:
            styles = jnp.asarray(latents).astype(self.param_dtype)
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
