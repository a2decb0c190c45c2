"""Per-channel BatchNorm of channels-last arrays, with PyTorch's or Flax's running statistics.

A functional BatchNorm for ``BranchMixConv``'s lowerings: parameters and running statistics come in as
``(C,)`` arrays and the new running statistics go out. The fused form normalises all k branches' channels
in one call (each channel's statistics are its own), the rematerialised form one branch at a time, and the
chunked form combines its own batch statistics and calls :func:`running_update` and :func:`normalise`.
Statistics are kept in at least float32 whatever the compute dtype, as Flax's ``BatchNorm`` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class NormConfig:
    """BatchNorm's hyperparameters: Flax's ``momentum`` (weight of the old running value), ``epsilon``,
    whether the running variance is PyTorch's unbiased one, and Flax's ``axis_name``: inside
    ``jax.shard_map``, the mesh axes whose devices hold the rest of the batch (statistics over all of it)."""

    momentum: float
    epsilon: float
    unbiased_running_var: bool
    axis_name: str | tuple[str, ...] | None = None


def device_mean(value: jax.Array, norm: NormConfig) -> jax.Array:
    """The mean of a per-device statistic over the devices of ``norm.axis_name`` (equal shards)."""
    return value if norm.axis_name is None else lax.pmean(value, norm.axis_name)


def device_sum(value: jax.Array, norm: NormConfig) -> jax.Array:
    """The sum of a per-device statistic over the devices of ``norm.axis_name``."""
    return value if norm.axis_name is None else lax.psum(value, norm.axis_name)


def global_count(count: int, norm: NormConfig) -> int:
    """Values per channel over the whole batch, from a device's ``count``."""
    return count if norm.axis_name is None else count * lax.axis_size(norm.axis_name)


def per_channel(values: jax.Array, ndim: int) -> jax.Array:
    """``(C,)`` -> ``(1, ..., 1, C)``: explicit broadcasting, no implicit rank promotion."""
    return values.reshape((1,) * (ndim - 1) + (-1,))


def statistics_dtype(dtype: Any) -> Any:
    """Statistics in at least float32, as Flax's BatchNorm does, whatever the compute dtype."""
    return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


def running_update(
    mean: jax.Array, var: jax.Array, batch_mean: jax.Array, batch_var: jax.Array, count: int, norm: NormConfig
) -> tuple[jax.Array, jax.Array]:
    """The new running ``(mean, var)`` after a training step over ``count`` values per channel."""
    # PyTorch stores the unbiased variance in running_var (n / (n - 1)); Flax the biased one.
    var_update = batch_var * (count / max(count - 1, 1)) if norm.unbiased_running_var else batch_var
    new_mean = norm.momentum * mean + (1 - norm.momentum) * batch_mean.astype(mean.dtype)
    new_var = norm.momentum * var + (1 - norm.momentum) * var_update.astype(var.dtype)
    return new_mean, new_var


def normalise(
    out: jax.Array, scale: jax.Array, offset: jax.Array, use_mean: jax.Array, use_var: jax.Array, epsilon: float
) -> jax.Array:
    """``(out - mean) / sqrt(var + eps) * scale + offset`` per channel, computed in the statistics dtype."""
    stats_dtype = statistics_dtype(out.dtype)
    inv_std = lax.rsqrt(use_var.astype(stats_dtype) + epsilon) * scale.astype(stats_dtype)
    shift = offset.astype(stats_dtype) - use_mean.astype(stats_dtype) * inv_std
    normalised = out.astype(stats_dtype) * per_channel(inv_std, out.ndim) + per_channel(shift, out.ndim)
    return normalised.astype(out.dtype)


def batch_norm(
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
    if not training:
        return normalise(out, scale, offset, mean, var, norm.epsilon), (mean, var)
    values = out.astype(statistics_dtype(out.dtype))
    reduce_axes = tuple(range(out.ndim - 1))
    # Two passes (mean, then squared deviations from it), each combined over the devices: exact, where
    # a mean of squares minus a squared mean cancels.
    batch_mean = device_mean(jnp.mean(values, axis=reduce_axes), norm)
    deviation = values - per_channel(batch_mean, out.ndim)
    batch_var = device_mean(jnp.mean(jnp.square(deviation), axis=reduce_axes), norm)
    new_stats = running_update(mean, var, batch_mean, batch_var, global_count(out.size // out.shape[-1], norm), norm)
    return normalise(out, scale, offset, batch_mean, batch_var, norm.epsilon), new_stats
