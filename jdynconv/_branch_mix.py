"""The maths of weighted branch mixing, once, for the linen and NNX ``BranchMixConv``.

k branches ``Conv -> BatchNorm -> activation`` share their input, so they run as ONE conv with
``k * features`` output channels, one per-channel BatchNorm over those (exactly k separate
BatchNorms: each channel's statistics are its own), one activation and one mixing reduction. Nothing
loops over branches, so the program does not grow with k.

Per-branch parameters are stored branch-major, ``(k, ...)``: the kernel bank
``(k, *kernel_size, C_in // G, features)`` and ``(k, features)`` for bias, BatchNorm scale, offset and
statistics. The fused conv orders its channels group-major ``(G, k, features // G)`` so that
``lax.conv_general_dilated``'s grouping (output channel o reads input group ``o // (C_out / G)``)
gives every branch its own grouped conv.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax.nnx.nn.dtypes import promote_dtype
from jax import lax

from jdynconv import _checks, _lowerings
from jdynconv.functional import conv_spec, mix_outputs

Activation = Callable[[jax.Array], jax.Array]
GateInput = Literal["flatten", "mean"]
GATE_INPUTS: tuple[str, ...] = ("flatten", "mean")
GATE_ACTIVATIONS: tuple[str, ...] = ("leaky_relu", "softmax", "sigmoid", "identity")


def leaky_relu(x: jax.Array) -> jax.Array:
    """PyTorch's ``nn.LeakyReLU()`` default: negative slope 0.01 (Flax's default too)."""
    return jax.nn.leaky_relu(x, negative_slope=0.01)


class BranchParams(NamedTuple):
    """Branch-major parameters of the k branches (see the module docstring for shapes); a pytree."""

    kernel: jax.Array  # (k, *kernel_size, C_in // G, F)
    bias: jax.Array | None  # (k, F)
    scale: jax.Array  # (k, F)
    offset: jax.Array  # (k, F)


@dataclasses.dataclass(frozen=True)
class NormConfig:
    momentum: float
    epsilon: float
    unbiased_running_var: bool


def _to_fused(per_branch: jax.Array, groups: int) -> jax.Array:
    """``(k, F)`` branch-major -> ``(G * k * F // G,)`` in the fused conv's channel order."""
    k, features = per_branch.shape
    return jnp.swapaxes(per_branch.reshape(k, groups, features // groups), 0, 1).reshape(-1)


def _from_fused(fused: jax.Array, k: int, groups: int) -> jax.Array:
    """Inverse of :func:`_to_fused`."""
    return jnp.swapaxes(fused.reshape(groups, k, -1), 0, 1).reshape(k, -1)


def _per_channel(values: jax.Array, ndim: int) -> jax.Array:
    """``(C,)`` -> ``(1, ..., 1, C)``: explicit broadcasting, no implicit rank promotion."""
    return values.reshape((1,) * (ndim - 1) + (-1,))


def fused_kernel(bank: jax.Array, groups: int) -> jax.Array:
    """``(k, *K, C_in // G, F)`` -> one conv kernel ``(*K, C_in // G, G * k * F // G)``."""
    k, *kernel_size, group_in, features = bank.shape
    split = bank.reshape(k, *kernel_size, group_in, groups, features // groups)
    return jnp.moveaxis(split, 0, -2).reshape(*kernel_size, group_in, k * features)


def gate_features(inputs: jax.Array, gate_input: GateInput) -> jax.Array:
    """What the gate's Dense layer sees: ``(B, C * prod(spatial))`` or ``(B, C)``.

    ``"flatten"`` flattens channel-major, in PyTorch's ``nn.Flatten`` order over ``(C, *spatial)``,
    so a PyTorch ``Linear`` weight ports by a plain transpose.
    """
    if gate_input == "flatten":
        return jnp.moveaxis(inputs, -1, 1).reshape(inputs.shape[0], -1)
    return jnp.mean(inputs, axis=tuple(range(1, inputs.ndim - 1)))


def gate_activation(logits: jax.Array, activation: str | Activation, temperature: float | jax.Array) -> jax.Array:
    """Turns gate logits ``(B, k)`` into mixing weights."""
    if callable(activation):
        return activation(logits)
    if activation == "leaky_relu":
        return leaky_relu(logits)
    if activation == "softmax":
        _checks.check_temperature(temperature)
        return jax.nn.softmax(logits / jnp.asarray(temperature, logits.dtype), axis=-1)
    if activation == "sigmoid":
        return jax.nn.sigmoid(logits)
    return logits


def _batch_norm(
    out: jax.Array,
    scale: jax.Array,
    offset: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    *,
    training: bool,
    norm: NormConfig,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Per-channel BatchNorm of channels-last ``out`` with ``(C,)`` parameters and running statistics.

    Returns the normalised values and the new running ``(mean, var)`` (unchanged unless training).
    """
    # Statistics in at least float32, as Flax's BatchNorm does, whatever the compute dtype.
    stats_dtype = jnp.float32 if jnp.finfo(out.dtype).bits < 32 else out.dtype
    values = out.astype(stats_dtype)
    if training:
        reduce_axes = tuple(range(out.ndim - 1))
        batch_mean = jnp.mean(values, axis=reduce_axes)
        batch_var = jnp.mean(jnp.square(values - _per_channel(batch_mean, out.ndim)), axis=reduce_axes)
        count = out.size // out.shape[-1]
        # PyTorch stores the unbiased variance in running_var (n / (n - 1)); Flax the biased one.
        var_update = batch_var * (count / max(count - 1, 1)) if norm.unbiased_running_var else batch_var
        new_mean = norm.momentum * mean + (1 - norm.momentum) * batch_mean.astype(mean.dtype)
        new_var = norm.momentum * var + (1 - norm.momentum) * var_update.astype(var.dtype)
        use_mean, use_var = batch_mean, batch_var
    else:
        new_mean, new_var = mean, var
        use_mean, use_var = mean.astype(stats_dtype), var.astype(stats_dtype)
    inv_std = lax.rsqrt(use_var + norm.epsilon) * scale.astype(stats_dtype)
    shift = offset.astype(stats_dtype) - use_mean * inv_std
    normalised = values * _per_channel(inv_std, out.ndim) + _per_channel(shift, out.ndim)
    return normalised.astype(out.dtype), (new_mean, new_var)


def branch_mix(
    inputs: jax.Array,
    gate_weights: jax.Array,
    params: BranchParams,
    mean: jax.Array,
    var: jax.Array,
    *,
    spec: _lowerings.ConvSpec,
    training: bool,
    norm: NormConfig,
    activation: Activation,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """``sum_n gate_weights[:, n] * activation(BatchNorm_n(conv_n(inputs)))``, fused.

    Args:
      inputs: ``(B, *spatial, C_in)``.
      gate_weights: ``(B, k)``.
      params: the branches' parameters.
      mean, var: running statistics ``(k, F)``.
      training: normalise with batch statistics and return updated running statistics; else use
        the running statistics and return them unchanged.

    Returns:
      ``(B, *out_spatial, F)`` and the new ``(mean, var)``.
    """
    groups = spec.feature_group_count
    k, features = params.scale.shape
    kernel = fused_kernel(params.kernel, groups)
    out = _lowerings.shared_conv(inputs, kernel, spec, groups)
    if params.bias is not None:
        out = out + _per_channel(_to_fused(params.bias, groups).astype(out.dtype), out.ndim)
    fused = [_to_fused(p, groups) for p in (params.scale, params.offset, mean, var)]
    normalised, (new_mean, new_var) = _batch_norm(out, *fused, training=training, norm=norm)
    activated = activation(normalised)
    # (B, *out, G * k * F/G) -> (B, *out, G, k, F/G): mix over k, then back to F channels.
    split = activated.reshape(*activated.shape[:-1], groups, k, features // groups)
    mixed = mix_outputs(split, gate_weights.astype(split.dtype), axis=split.ndim - 2)
    stats = (_from_fused(new_mean, k, groups), _from_fused(new_var, k, groups))
    return mixed.reshape(*mixed.shape[:-2], features), stats


def branch_mix_rematerialised(
    inputs: jax.Array,
    gate_weights: jax.Array,
    params: BranchParams,
    mean: jax.Array,
    var: jax.Array,
    *,
    spec: _lowerings.ConvSpec,
    training: bool,
    norm: NormConfig,
    activation: Activation,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """:func:`branch_mix` one branch at a time, each recomputed in the backward pass.

    A ``lax.scan`` over the k branches accumulating ``gate_weights[:, n] * branch_n`` with a
    checkpointed body: the backward pass keeps one branch's activations at a time instead of k, so
    training memory does not grow with k (the program does not either). Slower than the fused form:
    k convs of ``features`` channels instead of one of ``k * features``.
    """
    groups = spec.feature_group_count

    @jax.checkpoint
    def add_branch(total: jax.Array, branch: tuple[jax.Array, ...]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        kernel, bias, scale, offset, branch_mean, branch_var, weight = branch
        out = _lowerings.shared_conv_matmul_kernel_grad(inputs, kernel, spec, groups)
        if bias is not None:
            out = out + _per_channel(bias.astype(out.dtype), out.ndim)
        normalised, stats = _batch_norm(out, scale, offset, branch_mean, branch_var, training=training, norm=norm)
        weight = weight.astype(total.dtype).reshape((-1,) + (1,) * (total.ndim - 1))
        return total + weight * activation(normalised).astype(total.dtype), stats

    out_spatial = _lowerings.output_spatial_shape(inputs.shape[1:-1], params.kernel.shape[1:-2], spec)
    out_dtype = spec.preferred_element_type or inputs.dtype
    total = jnp.zeros((inputs.shape[0], *out_spatial, params.scale.shape[1]), out_dtype)
    branches = (*params, mean, var, gate_weights.T)
    return lax.scan(add_branch, total, branches)


def check_gate_weights(gate_weights: Any, batch: int, k: int) -> None:
    """Caller-supplied mixing weights must be ``(B, k)``."""
    shape = tuple(getattr(gate_weights, "shape", ()))
    if shape != (batch, k):
        raise ValueError(f"`gate_weights` must have shape ({batch}, {k}) (batch, num_branches), got shape {shape}.")


def check_config(features: int, num_branches: int, feature_group_count: int, gate_input: str, gate_act: Any) -> None:
    """Module attributes that are wrong whatever the input."""
    for name, value in (
        ("features", features),
        ("num_branches", num_branches),
        ("feature_group_count", feature_group_count),
    ):
        if not _checks.is_int(value) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    if features % feature_group_count:
        raise ValueError(
            f"`features` (={features}) must be divisible by `feature_group_count` (={feature_group_count})."
        )
    if gate_input not in GATE_INPUTS:
        raise ValueError(f"`gate_input` must be one of {GATE_INPUTS}, got {gate_input!r}.")
    if not callable(gate_act) and gate_act not in GATE_ACTIVATIONS:
        raise ValueError(f"`gate_activation` must be one of {GATE_ACTIVATIONS} or a callable, got {gate_act!r}.")


def check_gate_size(got: int, expected: int, inputs_shape: tuple[int, ...]) -> None:
    """The flatten gate's Dense was built for one input size; say which when another comes."""
    if got != expected:
        raise ValueError(
            f"`inputs` of shape {inputs_shape} give {got} gate features (C * prod(spatial) for "
            f'`gate_input="flatten"`), but the gate was built for {expected}; use inputs of the original size '
            'or `gate_input="mean"` for size-independent gating.'
        )


def kernel_size_for(kernel_size: Any, num_spatial: int) -> tuple[int, ...]:
    """An int means the same size in every spatial dim; a sequence must have one entry per dim."""
    return _checks.canonicalize_ints(kernel_size, num_spatial, "kernel_size")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """A BranchMixConv's attributes that the maths needs (the same in linen and NNX)."""

    features: int
    num_branches: int
    strides: Any
    padding: Any
    kernel_dilation: Any
    feature_group_count: int
    momentum: float
    epsilon: float
    unbiased_running_var: bool
    gate_input: GateInput
    gate_activation: str | Activation
    branch_activation: Activation
    remat: bool
    dtype: Any
    precision: Any


def apply_block(
    config: BlockConfig,
    inputs: jax.Array,
    gate_kernel: jax.Array,
    gate_bias: jax.Array,
    params: BranchParams,
    mean: jax.Array,
    var: jax.Array,
    *,
    training: bool,
    temperature: float | jax.Array,
    gate_weights: jax.Array | None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The whole block: gate (unless ``gate_weights`` is given), then the fused branches."""
    if gate_weights is None:
        gate_in = gate_features(inputs, config.gate_input)
        check_gate_size(gate_in.shape[-1], gate_kernel.shape[0], inputs.shape)
        gate_in, gate_kernel, gate_bias = promote_dtype((gate_in, gate_kernel, gate_bias), dtype=config.dtype)
        logits = jnp.matmul(gate_in, gate_kernel, precision=config.precision) + gate_bias[None, :]
        gate_weights = gate_activation(logits, config.gate_activation, temperature)
    else:
        check_gate_weights(gate_weights, inputs.shape[0], config.num_branches)
    inputs, *promoted = promote_dtype((inputs, *params), dtype=config.dtype)
    spec = conv_spec(
        inputs.shape[1:-1],
        params.kernel.shape[1:-2],
        strides=config.strides,
        padding=config.padding,
        kernel_dilation=config.kernel_dilation,
        input_dilation=1,
        feature_group_count=config.feature_group_count,
        precision=config.precision,
    )
    forward = functools.partial(
        branch_mix_rematerialised if config.remat else branch_mix,
        spec=spec,
        training=training,
        norm=NormConfig(config.momentum, config.epsilon, config.unbiased_running_var),
        activation=config.branch_activation,
    )
    return forward(inputs, gate_weights, BranchParams(*promoted), mean, var)
