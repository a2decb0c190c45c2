"""The maths of kernel mixing (CondConv, Dynamic Convolution), once, for the linen and NNX modules.

A per-sample kernel is a weighted sum of k expert kernels, ``W_b = sum_n r[b, n] * W_n`` (and the same
for biases). Convolution is linear in the kernel, so there are two exact ways to compute it:

* ``"mix_kernels"``: mix the bank into B kernels, then one :func:`per_sample_conv`.
  Cost ~ ``B * k * |W|`` (mixing) + one per-sample conv of ``B * P * |W|`` multiply-adds.
* ``"mix_outputs"``: one ordinary conv with all ``k * C_out`` expert channels, then
  :func:`mix_outputs`. Cost ~ ``k * B * P * |W|`` multiply-adds, but in XLA's fast shared-kernel conv.

(``|W|`` = kernel size x C_in / G x C_out; P = output positions.) See :func:`choose_mixing`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jdynconv import _checks, _gates, _platform
from jdynconv._dtypes import promote_dtype
from jdynconv._lowering import canonical
from jdynconv.functional import METHODS, conv_spec, mix_kernels, mix_outputs, per_sample_conv

Mixing = Literal["auto", "mix_kernels", "mix_outputs"]
MIXINGS: tuple[str, ...] = ("auto", "mix_kernels", "mix_outputs")

# The per-sample conv's cost relative to XLA's shared-kernel conv of the same multiply-adds: mixing outputs
# pays k times the arithmetic, mixing kernels pays this factor. The CPU value came from a one-process probe
# against PyTorch's oneDNN, where the im2col per-sample forward was a few times slower and XLA's shared conv
# less so; benchmarks/xla_floor.py times the ratio itself (docs/results/xla_floor_cpu.md, auto / floor
# column), and benchmarks/kernel_mixing.py the choice (kernel_mixing_cpu.md, mix_kernels and mix_outputs).
_PER_SAMPLE_OVERHEAD = {"cpu": 2.5}
_DEFAULT_OVERHEAD = 1.5


def choose_mixing(platform: str, num_experts: int, batch: int, out_positions: int) -> str:
    """The ``mixing="auto"`` rule: the cheaper of the two by the cost model in the module docstring, for the
    platform the program is lowered for (``"cpu"`` or any other; see :func:`jdynconv._platform.by_platform`).

    ``mix_outputs`` costs ``k * B * P`` units (one unit = one output position's worth of ``|W|``
    multiply-adds in a shared conv); ``mix_kernels`` costs ``overhead * B * P + B * k`` (the per-sample
    conv at its overhead, :data:`_PER_SAMPLE_OVERHEAD`, plus mixing the bank). So ``mix_outputs`` wins only
    for k below the overhead (k = 1, or k = 2 on CPU) or when P is tiny.
    """
    overhead = _PER_SAMPLE_OVERHEAD.get(platform, _DEFAULT_OVERHEAD)
    shared_cost = num_experts * batch * out_positions
    per_sample_cost = overhead * batch * out_positions + batch * num_experts
    return "mix_outputs" if shared_cost <= per_sample_cost else "mix_kernels"


@dataclasses.dataclass(frozen=True)
class ConvConfig:
    """Convolution attributes shared by PerSampleConv, CondConv and DynamicConv."""

    strides: Any
    padding: Any
    kernel_dilation: Any
    feature_group_count: int
    precision: Any
    method: str


def mixed_conv(
    inputs: jax.Array,
    routing: jax.Array,
    bank: jax.Array,
    bias_bank: jax.Array | None,
    config: ConvConfig,
    mixing: str,
) -> jax.Array:
    """``conv(inputs[b], sum_n routing[b, n] * bank[n]) + sum_n routing[b, n] * bias_bank[n]``.

    Args:
      inputs: ``(B, *spatial, C_in)``.
      routing: ``(B, k)`` mixing weights.
      bank: ``(k, *kernel_size, C_in // G, C_out)``.
      bias_bank: ``(k, C_out)`` or None.
      mixing: ``"auto"``, ``"mix_kernels"`` or ``"mix_outputs"`` (same result).

    Returns:
      ``(B, *out_spatial, C_out)``.
    """
    k, *kernel_size, _, out_channels = bank.shape
    groups = config.feature_group_count
    spec = conv_spec(
        inputs.shape[1:-1],
        kernel_size,
        strides=config.strides,
        padding=config.padding,
        kernel_dilation=config.kernel_dilation,
        input_dilation=1,
        feature_group_count=groups,
        precision=config.precision,
    )
    if mixing == "auto":
        # Chosen for the platform the program is lowered for; traced once where every platform chooses the same.
        out_positions = math.prod(canonical.output_spatial_shape(inputs.shape[1:-1], kernel_size, spec))
        return _platform.by_platform(
            lambda platform: choose_mixing(platform, k, inputs.shape[0], out_positions),
            lambda chosen: lambda *arrays: mixed_conv(*arrays, config, chosen),
        )(inputs, routing, bank, bias_bank)
    mixed_bias = mix_kernels(bias_bank, routing, precision=config.precision) if bias_bank is not None else None
    if mixing == "mix_kernels":
        kernels = mix_kernels(bank, routing, precision=config.precision)
        return per_sample_conv(
            inputs,
            kernels,
            mixed_bias,
            strides=spec.strides,
            padding=spec.pads,
            kernel_dilation=spec.kernel_dilation,
            feature_group_count=groups,
            precision=config.precision,
            method=config.method,
        )
    # One conv over all experts' channels, ordered group-major (G, k, C_out / G) so that lax's
    # grouping gives each expert its own grouped conv, then a per-sample weighted sum over k.
    split = bank.reshape(k, *kernel_size, bank.shape[-2], groups, out_channels // groups)
    fused = jnp.moveaxis(split, 0, -2).reshape(*kernel_size, bank.shape[-2], k * out_channels)
    out = canonical.shared_conv(inputs, fused, spec, groups)
    out = out.reshape(*out.shape[:-1], groups, k, out_channels // groups)
    out = mix_outputs(out, routing.astype(out.dtype), axis=out.ndim - 2).reshape(*out.shape[:-3], out_channels)
    if mixed_bias is not None:
        out = out + mixed_bias.reshape((out.shape[0],) + (1,) * (out.ndim - 2) + (out_channels,))
    return out


def check_mixing(mixing: str, method: str) -> None:
    """Both are checked up front: ``method`` is used only on the ``mix_kernels`` path."""
    if mixing not in MIXINGS:
        raise ValueError(f"`mixing` must be one of {MIXINGS}, got {mixing!r}.")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")


def check_layer(
    features: int,
    num_experts: int | None,
    feature_group_count: int,
    *,
    kernel_size: Any = 1,
    strides: Any = 1,
    padding: Any = "VALID",
    kernel_dilation: Any = 1,
    input_dilation: Any = 1,
    ratio: float | None = None,
) -> None:
    """The attributes of PerSampleConv, CondConv and DynamicConv that are wrong whatever the inputs, at
    construction (the number of spatial dims is checked at the call)."""
    _checks.check_conv_attributes(
        features=features,
        kernel_size=kernel_size,
        strides=strides,
        padding=padding,
        kernel_dilation=kernel_dilation,
        feature_group_count=feature_group_count,
    )
    _checks.check_spatial_ints("input_dilation", input_dilation)
    if num_experts is not None:
        _checks.check_positive_int("num_experts", num_experts)
    if ratio is not None:
        _checks.check_positive_number("ratio", ratio)


def temperature_schedule(
    step: int | jax.Array, *, start: float = 30.0, end: float = 1.0, anneal_steps: int
) -> jax.Array:
    """Dynamic Convolution's temperature: linear from ``start`` to ``end`` over ``anneal_steps``, then ``end``.

    Chen et al. (CVPR 2020) anneal from 30 to 1 over the first epochs. A plain function of the step
    (traceable), so one jitted training step serves the whole schedule.

    Args:
      step: the training step, a scalar (int or float; may be traced).
      start: the temperature at step 0; positive and finite, so that every temperature of the schedule is (the
        layers need that). Checked when concrete; a traced one is the caller's to keep positive.
      end: the temperature from ``anneal_steps`` on; as ``start``.
      anneal_steps: the steps from ``start`` to ``end``, >= 1.

    Returns:
      A float32 scalar.
    """
    _checks.check_positive_number("anneal_steps", anneal_steps)
    if not isinstance(anneal_steps, jax.core.Tracer) and anneal_steps < 1:
        raise ValueError(f"`anneal_steps` must be >= 1, got {anneal_steps!r}.")
    for name, value in (("start", start), ("end", end)):  # may be traced (a schedule swept under vmap)
        if np.ndim(value) != 0:
            raise ValueError(f"`{name}` must be a positive finite scalar, got shape {np.shape(value)}.")
        _checks.check_positive_number(name, value)
    step = _checks.as_array("step", step)
    if step.ndim != 0:
        raise ValueError(f"`step` must be a scalar, got shape {tuple(step.shape)}.")
    if not (jnp.issubdtype(step.dtype, jnp.integer) or jnp.issubdtype(step.dtype, jnp.floating)):
        raise TypeError(f"`step` must be an int or float scalar, got dtype {step.dtype}.")
    progress = jnp.clip(step.astype(jnp.float32) / anneal_steps, 0.0, 1.0)
    return jnp.float32(start) + (jnp.float32(end) - jnp.float32(start)) * progress


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """Attributes of PerSampleConv, CondConv and DynamicConv that the maths needs (linen and NNX alike)."""

    features: int
    kernel_size: Any
    num_experts: int | None
    strides: Any
    padding: Any
    kernel_dilation: Any
    feature_group_count: int
    dtype: Any
    precision: Any
    mixing: str
    method: str
    input_dilation: Any = 1

    @property
    def conv(self) -> ConvConfig:
        return ConvConfig(
            self.strides, self.padding, self.kernel_dilation, self.feature_group_count, self.precision, self.method
        )


def hidden_width(in_channels: int, ratio: float) -> int:
    """Dynamic Convolution's attention width: ``int(C_in * ratio) + 1`` (never zero)."""
    return int(in_channels * ratio) + 1


def _dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, precision: Any) -> jax.Array:
    out = jnp.matmul(x, kernel, precision=precision)
    return out if bias is None else out + bias[None, :]


def cond_conv(
    config: LayerConfig,
    inputs: jax.Array,
    routing_weights: jax.Array | None,
    routing_kernel: jax.Array | None,
    routing_bias: jax.Array | None,
    bank: jax.Array,
    bias_bank: jax.Array | None,
) -> jax.Array:
    """CondConv: sigmoid routing from the pooled input (or the given weights), then mixed conv. Without a routing
    Dense (``routing_kernel`` None) the weights must be given."""
    if routing_weights is None and routing_kernel is None:
        raise ValueError(
            f"`routing_weights` ({inputs.shape[0]}, {bank.shape[0]}) (batch, num_experts) are required: this CondConv "
            "has no routing of its own (`use_routing=False`, as timm's CondConv2d)."
        )
    if routing_weights is None:
        pooled, routing_kernel, routing_bias = promote_dtype(
            (_gates.spatial_mean(inputs), routing_kernel, routing_bias), dtype=config.dtype
        )
        routing = jax.nn.sigmoid(_dense(pooled, routing_kernel, routing_bias, config.precision))
    else:
        routing = _checks.mixing_weights(
            "routing_weights", routing_weights, inputs.shape[0], bank.shape[0], "num_experts"
        )
    inputs, routing, bank, bias_bank = promote_dtype((inputs, routing, bank, bias_bank), dtype=config.dtype)
    return mixed_conv(inputs, routing, bank, bias_bank, config.conv, config.mixing)


def dynamic_conv(
    config: LayerConfig,
    inputs: jax.Array,
    temperature: Any,
    attention_weights: jax.Array | None,
    hidden_kernel: jax.Array,
    attention_kernel: jax.Array,
    attention_bias: jax.Array,
    bank: jax.Array,
    bias_bank: jax.Array | None,
) -> jax.Array:
    """Dynamic Convolution: softmax(attention logits / temperature) (or the given weights), then mixed conv."""
    if attention_weights is None:
        _checks.check_temperature(temperature)
        pooled, hidden_kernel, attention_kernel, attention_bias = promote_dtype(
            (_gates.spatial_mean(inputs), hidden_kernel, attention_kernel, attention_bias), dtype=config.dtype
        )
        hidden = jax.nn.relu(_dense(pooled, hidden_kernel, None, config.precision))
        logits = _dense(hidden, attention_kernel, attention_bias, config.precision)
        attention = jax.nn.softmax(logits / jnp.asarray(temperature, logits.dtype), axis=-1)
    else:
        attention = _checks.mixing_weights(
            "attention_weights", attention_weights, inputs.shape[0], bank.shape[0], "num_experts"
        )
    inputs, attention, bank, bias_bank = promote_dtype((inputs, attention, bank, bias_bank), dtype=config.dtype)
    return mixed_conv(inputs, attention, bank, bias_bank, config.conv, config.mixing)


def per_sample_layer(config: LayerConfig, inputs: jax.Array, kernels: jax.Array, bias: jax.Array | None) -> jax.Array:
    """PerSampleConv: check the kernels against the layer's attributes, then :func:`per_sample_conv`."""
    inputs = _checks.as_array("inputs", inputs)
    kernels = _checks.as_array("kernels", kernels)
    num_spatial = None if _checks.is_int(config.kernel_size) else len(config.kernel_size)
    fixed_by = f"`kernel_size` {config.kernel_size!r} says"
    _checks.check_layer_inputs(inputs, None, config.feature_group_count, num_spatial, fixed_by)
    batch, in_channels = inputs.shape[0], inputs.shape[-1]
    kernel_size = _checks.canonicalize_ints(config.kernel_size, inputs.ndim - 2, "kernel_size")
    expected = (batch, *kernel_size, in_channels // config.feature_group_count, config.features)
    if tuple(getattr(kernels, "shape", ())) != expected:
        raise ValueError(
            f"`kernels` must have shape {expected} (B, *kernel_size, C_in // G, features) for this layer and "
            f"`inputs` of shape {inputs.shape}, got shape {tuple(getattr(kernels, 'shape', ()))}."
        )
    bias = None if bias is None else _checks.as_array("bias", bias)
    if bias is not None and tuple(bias.shape) not in ((batch, config.features), (config.features,)):
        raise ValueError(
            f"`bias` must have shape ({batch}, {config.features}) or ({config.features},), "
            f"got shape {tuple(bias.shape)}."
        )
    inputs, kernels, bias = promote_dtype((inputs, kernels, bias), dtype=config.dtype)
    return per_sample_conv(
        inputs,
        kernels,
        bias,
        strides=config.strides,
        padding=config.padding,
        kernel_dilation=config.kernel_dilation,
        input_dilation=config.input_dilation,
        feature_group_count=config.feature_group_count,
        precision=config.precision,
        method=config.method,
    )
