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

The BatchNorm is :mod:`jdynconv._batch_norm`'s, the gate's input features and activation
:mod:`jdynconv._gates`'; this module holds
the three lowerings of the branches (fused, chunked, rematerialised), the rule between them, the block's
argument checks and :func:`apply_block`, the whole block.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdynconv import _batch_norm, _checks, _gates, _platform
from jdynconv._dtypes import promote_dtype
from jdynconv._lowering import batch_parallel, canonical, im2col
from jdynconv.functional import conv_spec, mix_outputs

METHODS: tuple[str, ...] = ("auto", "fused", "chunked")


class BranchParams(NamedTuple):
    """Branch-major parameters of the k branches (see the module docstring for shapes); a pytree."""

    kernel: jax.Array  # (k, *kernel_size, C_in // G, F)
    bias: jax.Array | None  # (k, F)
    scale: jax.Array  # (k, F)
    offset: jax.Array  # (k, F)


def _to_fused(per_branch: jax.Array, groups: int) -> jax.Array:
    """``(k, F)`` branch-major -> ``(G * k * F // G,)`` in the fused conv's channel order."""
    k, features = per_branch.shape
    return jnp.swapaxes(per_branch.reshape(k, groups, features // groups), 0, 1).reshape(-1)


def _from_fused(fused: jax.Array, k: int, groups: int) -> jax.Array:
    """Inverse of :func:`_to_fused`."""
    return jnp.swapaxes(fused.reshape(groups, k, -1), 0, 1).reshape(k, -1)


def fused_kernel(bank: jax.Array, groups: int) -> jax.Array:
    """``(k, *K, C_in // G, F)`` -> one conv kernel ``(*K, C_in // G, G * k * F // G)``."""
    k, *kernel_size, group_in, features = bank.shape
    split = bank.reshape(k, *kernel_size, group_in, groups, features // groups)
    return jnp.moveaxis(split, 0, -2).reshape(*kernel_size, group_in, k * features)


def _mix_branches(activated: jax.Array, gate_weights: jax.Array, k: int, groups: int) -> jax.Array:
    """``(B, *out, G * k * F/G)`` fused channels -> ``(B, *out, F)``: the gate-weighted sum over k."""
    features = activated.shape[-1] // k
    split = activated.reshape(*activated.shape[:-1], groups, k, features // groups)
    mixed = mix_outputs(split, gate_weights.astype(split.dtype), axis=split.ndim - 2)
    return mixed.reshape(*mixed.shape[:-2], features)


def branch_mix(
    inputs: jax.Array,
    gate_weights: jax.Array,
    params: BranchParams,
    mean: jax.Array,
    var: jax.Array,
    *,
    spec: canonical.ConvSpec,
    training: bool,
    norm: _batch_norm.NormConfig,
    activation: _gates.Activation,
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
    k = params.scale.shape[0]
    kernel = fused_kernel(params.kernel, groups)
    out = canonical.shared_conv(inputs, kernel, spec, groups)
    if params.bias is not None:
        out = out + _batch_norm.per_channel(_to_fused(params.bias, groups).astype(out.dtype), out.ndim)
    fused = [_to_fused(p, groups) for p in (params.scale, params.offset, mean, var)]
    normalised, (new_mean, new_var) = _batch_norm.batch_norm(out, *fused, training=training, norm=norm)
    mixed = _mix_branches(activation(normalised), gate_weights, k, groups)
    return mixed, (_from_fused(new_mean, k, groups), _from_fused(new_var, k, groups))


def _map_chunks(fn: Callable[..., Any], xs: tuple[jax.Array, ...], shared: tuple[Any, ...], chunk: int) -> Any:
    """``fn(*x_chunks, *shared)`` (batched: it takes ``(c, ...)`` chunks of ``xs``) over chunks of ``chunk``
    samples, results concatenated along the batch; a last, smaller chunk takes the remainder.

    Not ``lax.map(..., batch_size=)``: that vmaps a per-sample function, whose size-1 batch axes put
    XLA:CPU's fusions on a slow path (several times slower in a one-process probe). Under SPMD each device
    loops over its own shard of the batch (:func:`batch_parallel.map_batch_shards`); ``shared``
    (parameters, statistics) is every device's whole.
    """
    return batch_parallel.map_batch_shards(
        lambda *args: _map_local_chunks(fn, args[: len(xs)], args[len(xs) :], chunk), xs, shared
    )


def _map_local_chunks(fn: Callable[..., Any], xs: tuple[jax.Array, ...], shared: tuple[Any, ...], chunk: int) -> Any:
    batch = xs[0].shape[0]
    full = batch // chunk * chunk
    parts = []
    if full:
        chunks = tuple(x[:full].reshape(-1, chunk, *x.shape[1:]) for x in xs)
        chunked = lax.map(lambda args: fn(*args, *shared), chunks)
        parts.append(jax.tree.map(lambda y: y.reshape(full, *y.shape[2:]), chunked))
    if full < batch:
        parts.append(fn(*(x[full:] for x in xs), *shared))
    return parts[0] if len(parts) == 1 else jax.tree.map(lambda *ys: jnp.concatenate(ys), *parts)


def branch_mix_chunked(
    inputs: jax.Array,
    gate_weights: jax.Array,
    params: BranchParams,
    mean: jax.Array,
    var: jax.Array,
    *,
    spec: canonical.ConvSpec,
    training: bool,
    norm: _batch_norm.NormConfig,
    activation: _gates.Activation,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """:func:`branch_mix` over chunks of the batch small enough to stay in cache.

    The fused form writes the ``(B, *out, k * F)`` branch outputs to memory and reads them back for
    the statistics, the normalisation and the mix: on a CPU that memory traffic, not the conv, is
    most of the time. Here each chunk of about :data:`im2col._CHUNK_BYTES` of branch outputs is computed,
    reduced and discarded: one pass over the chunks for the batch statistics (per-sample moments, combined
    exactly with Chan's formula), one for the output; both checkpointed, so the backward pass
    recomputes the chunks instead of storing them. The conv runs twice (three times with the
    backward pass), but from cache. When one chunk would hold the whole batch this is
    :func:`branch_mix` itself. Same maths and signature as :func:`branch_mix`.
    """
    groups = spec.feature_group_count
    k = params.scale.shape[0]
    batch = inputs.shape[0]
    positions = math.prod(canonical.output_spatial_shape(inputs.shape[1:-1], params.kernel.shape[1:-2], spec))
    stats_dtype = _batch_norm.statistics_dtype(inputs.dtype)
    chunk = chunk_samples(inputs, params, spec)
    if chunk >= batch:
        # One chunk (or an empty batch): no cache to gain, only recomputation; the fused form is faster.
        return branch_mix(
            inputs, gate_weights, params, mean, var, spec=spec, training=training, norm=norm, activation=activation
        )
    # Parameters enter the chunk loops in the statistics dtype (float32 for bfloat16/float16) and are cast
    # inside, so their gradients add up across chunks in float32, as the fused form's one reduction does.
    kernel = fused_kernel(params.kernel, groups).astype(stats_dtype)
    bias = None if params.bias is None else _to_fused(params.bias, groups).astype(stats_dtype)
    scale, offset = (_to_fused(p, groups).astype(stats_dtype) for p in (params.scale, params.offset))
    run_mean, run_var = (_to_fused(p, groups) for p in (mean, var))

    def branch_outputs(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
        """The chunk's fused conv, ``(c, *out, k * F)``; its kernel gradient is a matmul (fast in a loop)."""
        out = im2col.shared_conv_matmul_kernel_grad(x, kernel.astype(x.dtype), spec, groups)
        return out if bias is None else out + _batch_norm.per_channel(bias.astype(out.dtype), out.ndim)

    if training:

        @jax.checkpoint
        def moments(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> tuple[jax.Array, jax.Array]:
            """Per-sample means ``(c, C)`` and sums of squared deviations from them ``(c, C)``."""
            values = branch_outputs(x, kernel, bias).astype(stats_dtype)
            axes = tuple(range(1, values.ndim - 1))
            sample_mean = jnp.mean(values, axis=axes)
            deviation = values - sample_mean.reshape(x.shape[0], *([1] * (values.ndim - 2)), -1)
            return sample_mean, jnp.sum(jnp.square(deviation), axis=axes)

        sample_means, sample_m2 = _map_chunks(moments, (inputs,), (kernel, bias), chunk)
        # Chan et al.: every sample has `positions` values per channel, so the batch mean is the mean of
        # the sample means and the squared deviations add up with a between-sample term.
        use_mean = _batch_norm.device_mean(jnp.mean(sample_means, axis=0), norm)
        spread = _batch_norm.device_sum(jnp.sum(jnp.square(sample_means - use_mean[None]), axis=0), norm)
        count = _batch_norm.global_count(positions * inputs.shape[0], norm)
        use_var = (_batch_norm.device_sum(jnp.sum(sample_m2, axis=0), norm) + positions * spread) / count
        new_mean, new_var = _batch_norm.running_update(run_mean, run_var, use_mean, use_var, count, norm)
    else:
        use_mean, use_var = run_mean, run_var
        new_mean, new_var = run_mean, run_var

    @jax.checkpoint
    def mixed_output(x: jax.Array, weights: jax.Array, *shared: Any) -> jax.Array:
        kernel, bias, scale, offset, use_mean, use_var = shared
        normalised = _batch_norm.normalise(
            branch_outputs(x, kernel, bias), scale, offset, use_mean, use_var, norm.epsilon
        )
        return _mix_branches(activation(normalised), weights, k, groups)

    shared = (kernel, bias, scale, offset, use_mean, use_var)
    mixed = _map_chunks(mixed_output, (inputs, gate_weights), shared, chunk)
    return mixed, (_from_fused(new_mean, k, groups), _from_fused(new_var, k, groups))


def branch_mix_rematerialised(
    inputs: jax.Array,
    gate_weights: jax.Array,
    params: BranchParams,
    mean: jax.Array,
    var: jax.Array,
    *,
    spec: canonical.ConvSpec,
    training: bool,
    norm: _batch_norm.NormConfig,
    activation: _gates.Activation,
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
        out = im2col.shared_conv_matmul_kernel_grad(inputs, kernel, spec, groups)
        if bias is not None:
            out = out + _batch_norm.per_channel(bias.astype(out.dtype), out.ndim)
        normalised, stats = _batch_norm.batch_norm(
            out, scale, offset, branch_mean, branch_var, training=training, norm=norm
        )
        weight = weight.astype(total.dtype).reshape((-1,) + (1,) * (total.ndim - 1))
        return total + weight * activation(normalised).astype(total.dtype), stats

    out_spatial = canonical.output_spatial_shape(inputs.shape[1:-1], params.kernel.shape[1:-2], spec)
    out_dtype = spec.preferred_element_type or inputs.dtype
    # zeros_like: inside a shard_map the carry then varies over the same mesh axes as the inputs.
    total = jnp.zeros_like(inputs, shape=(inputs.shape[0], *out_spatial, params.scale.shape[1]), dtype=out_dtype)
    branches = (*params, mean, var, gate_weights.T)
    return lax.scan(add_branch, total, branches)


def check_config(
    features: int,
    num_branches: int,
    feature_group_count: int,
    gate_input: str,
    gate_act: Any,
    method: str = "auto",
    remat: bool = False,
    *,
    kernel_size: Any = 1,
    strides: Any = 1,
    padding: Any = "VALID",
    kernel_dilation: Any = 1,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
) -> None:
    """Module attributes that are wrong whatever the input, checked at construction (the number of spatial dims
    at the call)."""
    _checks.check_conv_attributes(
        features=features,
        kernel_size=kernel_size,
        strides=strides,
        padding=padding,
        kernel_dilation=kernel_dilation,
        feature_group_count=feature_group_count,
    )
    _checks.check_positive_int("num_branches", num_branches)
    _checks.check_batch_norm_attributes(momentum, epsilon)
    if gate_input not in _gates.GATE_INPUTS:
        raise ValueError(f"`gate_input` must be one of {_gates.GATE_INPUTS}, got {gate_input!r}.")
    if not callable(gate_act) and gate_act not in _gates.GATE_ACTIVATIONS:
        raise ValueError(f"`gate_activation` must be one of {_gates.GATE_ACTIVATIONS} or a callable, got {gate_act!r}.")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if remat and method != "auto":
        raise ValueError(
            f'`remat=True` runs its own lowering (a checkpointed scan over the branches): leave `method` at "auto", '
            f"got {method!r}."
        )


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
    gate_input: _gates.GateInput
    gate_activation: str | _gates.Activation
    branch_activation: _gates.Activation
    remat: bool
    dtype: Any
    precision: Any
    method: str = "auto"
    axis_name: str | tuple[str, ...] | None = None


def chunk_samples(inputs: jax.Array, params: BranchParams, spec: canonical.ConvSpec) -> int:
    """The samples in one chunk of :func:`branch_mix_chunked` (the whole batch: no chunking)."""
    k, features = params.scale.shape
    batch = inputs.shape[0]
    out_spatial = canonical.output_spatial_shape(inputs.shape[1:-1], params.kernel.shape[1:-2], spec)
    positions = int(np.prod(out_spatial))
    stats_dtype = _batch_norm.statistics_dtype(inputs.dtype)
    # A chunk holds its branch outputs and, for the kernel gradient, its im2col patches: size it by the
    # larger (many input channels and few outputs make the patches the larger).
    outputs_bytes = positions * k * features * jnp.dtype(stats_dtype).itemsize
    patch_bytes = positions * int(np.prod(params.kernel.shape[1:-2])) * inputs.shape[-1] * inputs.dtype.itemsize
    chunk = im2col.chunk_size(batch, max(outputs_bytes, patch_bytes))
    # At least 2 samples when there are 2: chunks of one sample differentiate into other primitives
    # (size-1 axes), so the program would change with k (at the seed's shape, k = 32 -> 1 sample).
    return min(batch, max(chunk, 2))


def choose_method(method: str, remat: bool, platform: str) -> Callable[..., Any]:
    """The lowering of the branches on ``platform`` (the one lowered for: ``"cpu"`` or any other; see
    :func:`jdynconv._platform.by_platform`). ``"auto"``: ``remat=True`` -> the scan over branches; else on CPU
    ``"chunked"`` (the fused form is memory-bound there: several times slower to train and in eval at the
    seed's shape; ``benchmarks/branch_mix.py``, ``docs/results/branch_mix_cpu.md``, jdynconv and
    jdynconv fused columns), elsewhere ``"fused"`` (one large conv suits an accelerator; not yet measured on
    one)."""
    if remat:
        return branch_mix_rematerialised
    if method == "auto":
        method = "chunked" if platform == "cpu" else "fused"
    return branch_mix_chunked if method == "chunked" else branch_mix


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
        gate_in = _gates.gate_features(inputs, config.gate_input)
        check_gate_size(gate_in.shape[-1], gate_kernel.shape[0], inputs.shape)
        gate_in, gate_kernel, gate_bias = promote_dtype((gate_in, gate_kernel, gate_bias), dtype=config.dtype)
        logits = jnp.matmul(gate_in, gate_kernel, precision=config.precision) + gate_bias[None, :]
        gate_weights = _gates.gate_activation(logits, config.gate_activation, temperature)
    else:
        gate_weights = _checks.mixing_weights(
            "gate_weights", gate_weights, inputs.shape[0], config.num_branches, "num_branches"
        )
    # An empty batch has no statistics to normalise by or learn from: its (empty) output is the running
    # statistics' and they stay as they were, as PyTorch's BatchNorm does for a batch of size 0.
    training = training and inputs.shape[0] > 0
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
    params = BranchParams(*promoted)

    def rule(platform: str) -> Callable[..., Any]:
        method = choose_method(config.method, config.remat, platform)
        # One chunk holding the whole batch is the fused form itself: then every platform agrees (traced once).
        if method is branch_mix_chunked and chunk_samples(inputs, params, spec) >= inputs.shape[0]:
            return branch_mix
        return method

    # Chosen for the platform the program is lowered for, not the host's default backend.
    forward = _platform.by_platform(
        rule,
        lambda method: functools.partial(
            method,
            spec=spec,
            training=training,
            norm=_batch_norm.NormConfig(config.momentum, config.epsilon, config.unbiased_running_var, config.axis_name),
            activation=config.branch_activation,
        ),
    )
    return forward(inputs, gate_weights, params, mean, var)
