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

import functools
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
        With ``sum_taps``, ``(B, *points, G, T, N)``: T taps per point and group, summed.
      mask: ``(B, *points, G)`` (``(B, *points, G, T)`` with ``sum_taps``) or None: a factor per sample
        (DCNv2's modulation, DCNv3's softmax).
      sum_taps: sum the samples over the taps inside the gathers, so the per-tap samples are never stored.

    Returns:
      ``(B, *points, G, Cg)``, in ``inputs``' dtype.
    """
    if not sum_taps:
        positions = positions[..., None, :]
        mask = None if mask is None else mask[..., None]
    batch, groups = inputs.shape[0], inputs.shape[-2]
    points = positions.shape[:-2]  # (B, *points, G)
    positions = positions.astype(_compute_dtype(positions.dtype))
    # Every point's own rows: sample b's pixels start at b * prod(padded) * G, group g's channels at g.
    sample_row = jnp.arange(batch, dtype=jnp.int32).reshape((batch,) + (1,) * (len(points) - 1))
    group_row = jnp.arange(groups, dtype=jnp.int32).reshape((1,) * (len(points) - 1) + (groups,))
    row_base = jnp.broadcast_to(sample_row * math.prod(_padded_spatial(inputs.shape)) * groups + group_row, points)
    # Everything goes in as (rows, taps, ...): XLA:CPU's gathers, reductions and scatters are many times
    # faster on these than on the same data with the batch, point and group axes kept apart.
    flat = positions.reshape(-1, *positions.shape[-2:])
    flat_mask = None if mask is None else mask.reshape(flat.shape[:-1]).astype(positions.dtype)
    out = _sample(_table(inputs), flat, flat_mask, row_base.reshape(-1), _Geometry.of(inputs.shape))
    return out.reshape(*points, inputs.shape[-1])


class _Geometry(tuple):
    """The static sizes of a table (hashable: a ``custom_vjp`` non-differentiable argument): the padded map's
    spatial sizes, the number of groups and the row of zeros."""

    @classmethod
    def of(cls, shape: tuple[int, ...]) -> _Geometry:
        batch, groups = shape[0], shape[-2]
        padded = _padded_spatial(shape)
        outside_row = batch * math.prod(padded) * groups  # the table's last row, of zeros
        if outside_row >= 2**31:
            raise ValueError(
                f"`inputs` of shape {tuple(shape[:-2])} with {groups} offset group(s) has {outside_row} pixel "
                "rows after padding, more than int32 row indices address (2**31); split the batch."
            )
        return cls((padded, groups, outside_row))

    @property
    def strides(self) -> list[int]:
        """Rows between neighbours along each spatial dim."""
        padded, groups, _ = self
        return [math.prod(padded[i + 1 :]) * groups for i in range(len(padded))]


def _corners(positions: jax.Array, row_base: jax.Array, geometry: _Geometry):
    """One tap's corners: ``positions (R, N)`` -> the lower corner's row ``(R,)``, the fractions ``(R, N)``
    and ``inside (R,)``.

    The lower corner is ``floor(p)``, which sits at ``floor(p) + 1`` in the padded map; a point whose cube
    fits the padded map (``0 <= floor(p) + 1 <= size``) is inside; others (every corner outside, an infinite
    or NaN coordinate) read the table's row of zeros, with zero weights (NaN for a NaN coordinate: a NaN
    sample, as the definition gives). The weights are the multilinear ones with the corners held at
    ``floor(p)``, so their derivative at an integer coordinate is the one from above.
    """
    padded, _, outside_row = geometry
    lower = jnp.floor(positions)
    limit = jnp.asarray([size - 2 for size in padded], positions.dtype).reshape((1,) * (positions.ndim - 1) + (-1,))
    index = lower + 1
    inside = jnp.all((index >= 0) & (index <= limit), axis=-1)
    start = jnp.clip(index, 0, limit).astype(jnp.int32)
    row = row_base + sum(start[..., i] * stride for i, stride in enumerate(geometry.strides))
    fraction = jnp.where(inside[..., None], positions - lower, 0)  # an infinite point's would be NaN
    return jnp.where(inside, row, outside_row), fraction, inside


def _bits(num_spatial: int) -> list[tuple[int, ...]]:
    """The corners of the ``(2,) * N`` cube, row-major: 0 = the lower corner along a dim, 1 = the upper."""
    return list(itertools.product((0, 1), repeat=num_spatial))


def _weight(fraction: jax.Array, bits: tuple[int, ...], skip: int | None = None) -> jax.Array:
    """``prod_i (fraction_i if bit_i else 1 - fraction_i)`` over the dims (but ``skip``)."""
    factors = [fraction[..., i] if bit else 1 - fraction[..., i] for i, bit in enumerate(bits) if i != skip]
    return math.prod(factors) if factors else jnp.ones(fraction.shape[:-1], fraction.dtype)


def _scale(inside: jax.Array, positions: jax.Array, mask: jax.Array | None) -> jax.Array:
    """A point's factor on its corner weights: its mask (1 without one) inside, 0 outside, NaN for NaN."""
    nan = jnp.any(jnp.isnan(positions), axis=-1)
    one = jnp.ones(inside.shape, positions.dtype) if mask is None else mask
    return jnp.where(inside, one, jnp.where(nan, jnp.nan, 0).astype(positions.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sample(
    table: jax.Array, positions: jax.Array, mask: jax.Array | None, row_base: jax.Array, geometry: _Geometry
) -> jax.Array:
    """``sum_t mask[:, t] * sum_corners weight * table[row]``: ``(R, Cg)`` from a ``(L, Cg)`` table, positions
    ``(R, T, N)``, mask ``(R, T)`` or None and each point's first row ``(R,)``. Taps past the first are added
    in a loop (program size independent of T); the corners of a tap are one fused gather-and-sum, their rows
    and weights computed in it."""
    compute = _compute_dtype(table.dtype)  # half-precision maps are summed in float32
    num_spatial = positions.shape[-1]
    offsets = [sum(b * s for b, s in zip(bits, geometry.strides, strict=True)) for bits in _bits(num_spatial)]

    def tap(positions: jax.Array, mask: jax.Array | None) -> jax.Array:
        row, fraction, inside = _corners(positions, row_base, geometry)
        scale = _scale(inside, positions, mask)
        # Stacked and selected by `inside` (this form XLA:CPU computes once, into arrays: written as single
        # expressions, it fuses their arithmetic into the gathers and redoes it for every channel, which made
        # deform_conv's forward twice as slow).
        rows = jnp.where(inside[:, None], jnp.stack([row + offset for offset in offsets], axis=-1), row[:, None])
        unmasked = jnp.stack([_weight(fraction, bits) for bits in _bits(num_spatial)], axis=-1)
        weights = jnp.where(inside[:, None], unmasked * (1 if mask is None else mask[:, None]), scale[:, None])
        out = None
        for corner in range(len(offsets)):
            term = weights[:, corner, None].astype(compute) * _gather(table, rows[:, corner]).astype(compute)
            out = term if out is None else out + term
        return out

    out = tap(positions[:, 0], None if mask is None else mask[:, 0])
    if positions.shape[1] > 1:
        rest = (jnp.swapaxes(positions[:, 1:], 0, 1), None if mask is None else jnp.swapaxes(mask[:, 1:], 0, 1))
        out, _ = lax.scan(lambda total, args: (total + tap(*args), None), out, rest)
    return out.astype(table.dtype)


def _sample_fwd(table, positions, mask, row_base, geometry):
    return _sample(table, positions, mask, row_base, geometry), (table, positions, mask, row_base)


def _sample_bwd(geometry, residuals, cotangent):
    """The table's cotangent is a scatter-add of whole rows; each corner's dot product of the cotangent with
    its row gives the derivative w.r.t. its weight, from which those w.r.t. the positions and the mask follow
    (the weights' formula differentiated here, rather than by autodiff through every corner's weight).

    One corner of one tap at a time, in a loop over the precomputed rows and weights: XLA:CPU would otherwise
    gather every corner, and make every corner's update, before the first scatter (its scheduler ignores
    optimisation barriers), holding ``2 * T * 2**N`` sample-sized arrays at once (the op's peak memory was 10x
    its sampled columns); and a loop over taps computing each tap's corners in its body ran slower.
    """
    table, positions, mask, row_base = residuals
    compute = _compute_dtype(table.dtype)  # a half-precision map's cotangent is accumulated in float32
    cotangent = cotangent.astype(compute)
    num_spatial = positions.shape[-1]
    corners = _bits(num_spatial)
    offsets = [sum(b * s for b, s in zip(bits, geometry.strides, strict=True)) for bits in corners]
    row, fraction, inside = _corners(positions, row_base[:, None], geometry)  # (R, T), (R, T, N), (R, T)
    scale = _scale(inside, positions, mask)
    unmasked = jnp.stack([_weight(fraction, bits) for bits in corners], axis=-1)  # (R, T, 2**N)
    rows = jnp.stack([jnp.where(inside, row + offset, row) for offset in offsets], axis=-1)
    weights = scale[..., None] * unmasked

    def corner(grad_table: jax.Array, column: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        rows, weights = column
        dot = jnp.sum(cotangent * _gather(table, rows).astype(compute), axis=-1)  # d out / d weight
        updates = weights[:, None].astype(compute) * cotangent
        return grad_table.at[rows].add(updates, mode="promise_in_bounds"), dot.astype(weights.dtype)

    by_column = [a.reshape(a.shape[0], -1).T for a in (rows, weights)]
    grad_table, dots = lax.scan(corner, jnp.zeros_like(table, dtype=compute), by_column)
    dots = dots.T.reshape(weights.shape)  # (R, T, 2**N)

    # d weight / d position: the multilinear weight's slope along each dim, times the point's scale.
    grad_positions = []
    for dim in range(num_spatial):
        slopes = [(1 if bits[dim] else -1) * _weight(fraction, bits, skip=dim) for bits in corners]
        grad_positions.append(jnp.sum(dots * jnp.stack(slopes, axis=-1), axis=-1))
    grad_positions = jnp.stack(grad_positions, axis=-1) * scale[..., None]
    grad_mask = None if mask is None else jnp.where(inside, jnp.sum(dots * unmasked, axis=-1), 0).astype(mask.dtype)
    return grad_table.astype(table.dtype), grad_positions.astype(positions.dtype), grad_mask, None


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


def _gather(table: jax.Array, rows: jax.Array) -> jax.Array:
    return table.at[rows].get(mode="promise_in_bounds")
