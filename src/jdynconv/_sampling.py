"""Multilinear sampling of channels-last feature maps at arbitrary positions, with its own derivatives.

The one primitive under every deformable convolution (:func:`jdynconv.deform_conv`, DCNv3): for each
sampling point, the ``2**N`` corners ``floor(p)`` and ``floor(p) + 1`` of an N-d position ``p`` are read as one
``(2,) * N`` window of a copy of the map padded by one zero on every side, so corners outside the map read
zeros (bilinear sampling with zero padding, as torchvision's ``deform_conv2d`` and ``grid_sample(...,
padding_mode="zeros")``). Points whose window would leave the padded map (every corner outside) get zero
weights.

Derivatives (:func:`jax.custom_vjp`): the map's is one scatter-add of the same windows; the positions' is the
derivative of the multilinear formula with the corners held at ``floor(p)``, so at an integer coordinate it
is the derivative from above, and a point exactly on the border (``p == -1``: value 0) still gets the
derivative from the corner inside. That is torchvision's CPU and CUDA kernels' choice (their
``get_coordinate_weight`` has no border check) and what autodiff of the floor-based formula gives.
Autodiff would save and scatter one ``(..., Cg)`` array per corner; here nothing sample-sized is saved (the
windows are gathered again in the backward pass) and the map's cotangent is one scatter of whole windows.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax


def sample(
    inputs: jax.Array, positions: jax.Array, mask: jax.Array | None = None, *, sum_taps: bool = False
) -> jax.Array:
    """``mask * inputs`` sampled multilinearly at ``positions``, per group.

    Args:
      inputs: ``(B, *spatial, G, Cg)``: a channels-last map whose channels are split into G groups.
      positions: ``(B, *points, G, N)`` float, N = ``len(spatial)``: for every point and group, the position
        in pixel coordinates of ``inputs`` (``0`` is the first pixel's centre, ``spatial[i] - 1`` the last).
      mask: ``(B, *points, G)`` or None: a factor per point and group (DCNv2's modulation).
      sum_taps: sum the samples over the last of ``points`` (DCNv3's taps), inside the gathers, so the
        per-tap samples are never stored.

    Returns:
      ``(B, *points, G, Cg)`` (without the last of ``points`` if ``sum_taps``), in ``inputs``' dtype.
    """
    rows, weights = _corners(positions, inputs.shape)
    if mask is not None:
        weights = weights * mask[..., None].astype(weights.dtype)
    if sum_taps:  # (B, *points, T, G, 2**N) -> (B, *points, G, T, 2**N)
        rows, weights = (jnp.moveaxis(a, -3, -2) for a in (rows, weights))
    else:
        rows, weights = (a[..., None, :] for a in (rows, weights))
    points = rows.shape[:-2]
    # Everything goes in as (rows, taps, corners): XLA:CPU's gathers, reductions and scatters are many
    # times faster on these than on the same data with the batch, point and group axes kept apart.
    out = _sample(_table(inputs), rows.reshape(-1, *rows.shape[-2:]), weights.reshape(-1, *rows.shape[-2:]))
    return out.reshape(*points, inputs.shape[-1])


@jax.custom_vjp
def _sample(table: jax.Array, rows: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum_{t,w} weights[:, t, w] * table[rows[:, t, w]]``: ``(R, Cg)`` from a ``(L, Cg)`` table and
    ``(R, T, 2**N)`` rows and weights. Taps past the first are added in a loop (program size independent of
    T); the ``2**N`` corners of a tap are one fused gather-and-sum."""

    compute = _compute_dtype(table.dtype)  # half-precision maps are summed in float32

    def tap(rows: jax.Array, weights: jax.Array) -> jax.Array:
        weights = weights.astype(compute)
        out = weights[:, 0, None] * _gather(table, rows[:, 0]).astype(compute)
        for corner in range(1, rows.shape[-1]):
            out = out + weights[:, corner, None] * _gather(table, rows[:, corner]).astype(compute)
        return out

    out = tap(rows[:, 0], weights[:, 0])
    if rows.shape[1] > 1:
        out, _ = lax.scan(
            lambda total, tap_args: (total + tap(*tap_args), None),
            out,
            (jnp.swapaxes(rows[:, 1:], 0, 1), jnp.swapaxes(weights[:, 1:], 0, 1)),
        )
    return out.astype(table.dtype)


def _sample_fwd(table, rows, weights):
    return _sample(table, rows, weights), (table, rows, weights)


def _sample_bwd(residuals, cotangent):
    """The table's cotangent is a scatter-add of whole rows; the weights' (from which autodiff goes on to
    the positions and the mask) are the cotangent's dot products with each corner's values.

    One corner of one tap at a time, in a loop: XLA:CPU would otherwise gather every corner, and make every
    corner's update, before the first scatter (its scheduler ignores optimisation barriers), holding
    ``2 * T * 2**N`` sample-sized arrays at once (the op's peak memory was 10x its sampled columns).
    """
    table, rows, weights = residuals
    columns = rows.shape[1] * rows.shape[2]
    compute = _compute_dtype(table.dtype)  # a half-precision map's cotangent is accumulated in float32
    cotangent = cotangent.astype(compute)

    def corner(grad_table: jax.Array, column: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        rows, weights = column
        grad_weights = jnp.sum(cotangent * _gather(table, rows).astype(compute), axis=-1)
        updates = weights[:, None].astype(compute) * cotangent
        return grad_table.at[rows].add(updates, mode="promise_in_bounds"), grad_weights.astype(weights.dtype)

    by_column = [a.reshape(a.shape[0], columns).T for a in (rows, weights)]
    grad_table, grad_weights = lax.scan(corner, jnp.zeros_like(table, dtype=compute), by_column)
    return grad_table.astype(table.dtype), None, grad_weights.T.reshape(weights.shape)


_sample.defvjp(_sample_fwd, _sample_bwd)


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Positions and corner weights in at least float32: a half-precision coordinate past 256 is not exact."""
    return jnp.dtype(dtype) if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def _padded_spatial(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(size + 2 for size in shape[1:-2])


def _table(inputs: jax.Array) -> jax.Array:
    """``(B * prod(padded spatial) * G + 1, Cg)``: the zero-padded map, one row per pixel and group, and a
    last row of zeros.

    Row ``(b * L + l) * G + g`` holds pixel ``l`` (row-major over the padded map) of sample ``b``, group ``g``.
    Points outside the map read the last row, so they read no pixel (an infinite pixel times a zero weight
    would be NaN). A plain row gather/scatter on this table is many times faster on XLA:CPU than the same
    one with batch dimensions.
    """
    num_spatial = inputs.ndim - 3
    padded = jnp.pad(inputs, ((0, 0), *((1, 1),) * num_spatial, (0, 0), (0, 0)))
    return jnp.pad(padded.reshape(-1, inputs.shape[-1]), ((0, 1), (0, 0)))


def _untable(table: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    padded = table[:-1].reshape(shape[0], *_padded_spatial(shape), *shape[-2:])
    return padded[(slice(None), *(slice(1, -1) for _ in shape[1:-2]))]


def _gather(table: jax.Array, rows: jax.Array) -> jax.Array:
    return table.at[rows].get(mode="promise_in_bounds")


def _corners(positions: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The ``2**N`` corners of every position: their rows in :func:`_table` and their weights.

    Args:
      positions: ``(B, *points, G, N)``.
      shape: the shape of the map, ``(B, *spatial, G, Cg)``.

    Returns:
      rows ``(B, *points, G, 2**N)`` int32 and weights ``(B, *points, G, 2**N)`` in at least float32,
      corners in row-major order of the ``(2,) * N`` cube. The weights are the multilinear ones with the
      corners held at ``floor(p)`` (their derivative is the one from above at an integer coordinate). A
      point whose cube leaves the padded map (every corner outside the map, or an infinite coordinate) reads
      the table's row of zeros with zero weights; a NaN coordinate reads it with NaN weights (a NaN sample,
      as the definition gives).
    """
    batch, groups = shape[0], shape[-2]
    padded = _padded_spatial(shape)
    num_spatial = len(padded)
    outside_row = batch * math.prod(padded) * groups  # the table's last row, of zeros
    if outside_row >= 2**31:
        raise ValueError(
            f"`inputs` of shape {tuple(shape[:-2])} with {groups} offset group(s) has {outside_row} pixel rows "
            "after padding, more than int32 row indices address (2**31); split the batch."
        )
    positions = positions.astype(_compute_dtype(positions.dtype))
    lower = lax.stop_gradient(jnp.floor(positions))
    fraction = positions - lower
    # The lower corner's index in the padded map is floor(p) + 1; its cube fits where that is in [0, size].
    lower_index = lower + 1
    limit = jnp.asarray([size - 2 for size in padded], positions.dtype)[(None,) * (positions.ndim - 1)]
    inside = jnp.all((lower_index >= 0) & (lower_index <= limit), axis=-1)
    starts = jnp.clip(lower_index, 0, limit).astype(jnp.int32)
    strides = [math.prod(padded[i + 1 :]) for i in range(num_spatial)]
    pixel = sum(starts[..., i] * strides[i] for i in range(num_spatial))
    sample_index = jnp.arange(batch, dtype=jnp.int32).reshape((batch,) + (1,) * (positions.ndim - 2))
    group_index = jnp.arange(groups, dtype=jnp.int32)[(None,) * (positions.ndim - 2)]
    base = (sample_index * math.prod(padded) + pixel) * groups + group_index
    factors = (1 - fraction, fraction)  # weight of the lower / upper corner along each dim
    rows, weights = [], []
    for bits in itertools.product((0, 1), repeat=num_spatial):
        rows.append(base + sum(bit * stride for bit, stride in zip(bits, strides, strict=True)) * groups)
        weights.append(math.prod(factors[bit][..., i] for i, bit in enumerate(bits)))
    weights = jnp.stack(weights, axis=-1)
    not_a_number = jnp.any(jnp.isnan(positions), axis=-1)
    weights = jnp.where(inside[..., None], weights, jnp.where(not_a_number[..., None], jnp.nan, 0))
    rows = jnp.where(inside[..., None], jnp.stack(rows, axis=-1), outside_row)
    return rows, weights
