"""InternImage's DCNv3 operator (Wang et al., CVPR 2023), N-d: :func:`dcnv3`.

Depthwise deformable aggregation: every channel group samples the input at its own offset taps and sums the
samples with softmax-normalised weights (the mask); no kernel contracts them (the layer's Linear projections
mix channels). The arithmetic is ``dcnv3_core_pytorch`` of InternImage (``ops_dcnv3/functions/
dcnv3_func.py``), with its sampling positions written in pixel coordinates instead of ``grid_sample``'s
normalised ones: the same points, with the rounding of one float32 formula.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jdynconv import _checks, _sampling
from jdynconv._lowering import batch_parallel


def dcnv3(
    inputs: ArrayLike,
    offsets: ArrayLike,
    mask: ArrayLike,
    *,
    kernel_size: _checks.IntOrSequence,
    strides: _checks.IntOrSequence = 1,
    padding: _checks.IntOrSequence = 0,
    kernel_dilation: _checks.IntOrSequence = 1,
    groups: int = 1,
    offset_scale: float = 1.0,
    remove_center: bool = False,
) -> jax.Array:
    """InternImage's DCNv3 core (``dcnv3_core_pytorch``), channels-last, 1-D to 3-D.

    For output position ``o``, group ``g`` and tap ``t`` (kernel index ``k_t``), channel ``c`` of group ``g``
    (``g = c // (C / groups)``) is read at ``o * strides + center - padding + offset_scale * (k_t *
    kernel_dilation - center + offset[o, g, t])``, ``center = kernel_dilation * (kernel_size - 1) // 2``,
    bilinearly with zeros outside the input, and the taps are summed weighted by ``mask[o, g, t]``.

    The layout follows InternImage's, which lists coordinates x before y: along the last axis of
    ``offsets``, group ``g``, tap ``t`` and coordinate ``n`` are at ``(g * T + t) * N + n`` where the
    coordinates run over the spatial dims from the last to the first (``(dx, dy)`` in 2-D) and the taps
    enumerate the kernel with the last spatial dim slowest (2-D: ``t = kx * kernel_size + ky``). With
    ``remove_center`` the centre tap (odd kernel sizes only) is left out: ``T = prod(kernel_size) - 1``.

    Args:
      inputs: ``(B, *spatial, C)``.
      offsets: ``(B, *out_spatial, groups * T * N)``.
      mask: ``(B, *out_spatial, groups * T)``, used as given (the layer passes a softmax over each group's
        taps).
      kernel_size: an int or one int per spatial dim.
      strides: an int or one int per spatial dim.
      padding: an int or one int per spatial dim (zeros on both sides, as InternImage's ``pad``).
      kernel_dilation: an int or one int per spatial dim (InternImage's ``dilation``).
      groups: the number of channel groups, each with its own offsets and mask; divides ``C``.
      offset_scale: scales the offsets and the regular grid about the centre tap.
      remove_center: leave out the centre tap (odd kernel sizes).

    Returns:
      ``(B, *out_spatial, C)``, ``out_spatial = (spatial + 2 * padding - kernel_dilation * (kernel_size - 1)
      - 1) // strides + 1``.

    At an integer sampling coordinate (zero offsets with ``offset_scale=1``, the layer's initial state, put
    every tap on a pixel) the derivative w.r.t. the offset is the one from above, as
    :func:`jdynconv.deform_conv`'s. InternImage's ``dcnv3_core_pytorch`` computes the positions in
    ``grid_sample``'s normalised coordinates on a float32 grid, whose rounding puts such a point on either side
    of the pixel, so its offset gradient there can be either one-sided derivative; the outputs agree, and the
    parity tests draw their offsets off the integers.

    Derivatives are reverse mode (``jax.grad``, ``jax.vjp``, ``jax.jacrev``, grad of grad): the sampling is a
    ``jax.custom_vjp``, so forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) w.r.t. ``inputs``,
    ``offsets`` or ``mask`` is a TypeError; take their Hessian as ``jax.jacrev(jax.jacrev(f))``.
    """
    inputs = _checks.as_array("inputs", inputs)
    offsets = _checks.as_array("offsets", offsets)
    mask = _checks.as_array("mask", mask)
    for name, array in (("inputs", inputs), ("offsets", offsets), ("mask", mask)):
        _checks.check_float_dtype(name, array)
    _checks.check_rank("inputs", inputs.shape, (3, 4, 5), "(B, *spatial, C) with 1 to 3 spatial dims")
    for name, array in (("offsets", offsets), ("mask", mask)):
        if array.dtype != inputs.dtype:
            raise TypeError(f"`{name}` must have the dtype of `inputs` ({inputs.dtype}), got {array.dtype}.")
    batch, *spatial, channels = inputs.shape
    num_spatial = len(spatial)
    kernel_t = _checks.canonicalize_ints(kernel_size, num_spatial, "kernel_size")
    strides_t = _checks.canonicalize_ints(strides, num_spatial, "strides")
    pads_t = _checks.canonicalize_ints(padding, num_spatial, "padding", minimum=0)
    dilation_t = _checks.canonicalize_ints(kernel_dilation, num_spatial, "kernel_dilation")
    if channels == 0:
        raise ValueError(f"`inputs` (B, *spatial, C) must have C >= 1 channels, got shape {tuple(inputs.shape)}.")
    _checks.check_positive_int("groups", groups)
    if channels % groups:
        raise ValueError(f"`inputs` channels (={channels}) must be divisible by `groups` (={groups}).")
    _checks.check_positive_number("offset_scale", offset_scale)
    if not isinstance(remove_center, bool | np.bool_):
        raise TypeError(f"`remove_center` must be a bool, got {remove_center!r}.")
    if remove_center and any(k % 2 == 0 for k in kernel_t):
        raise ValueError(f"`remove_center` needs odd kernel sizes (a centre tap), got `kernel_size` {kernel_t}.")
    out_spatial = _checks.conv_output_shape(
        spatial,
        kernel_t,
        strides=strides_t,
        pads=tuple((p, p) for p in pads_t),
        kernel_dilation=dilation_t,
        input_dilation=(1,) * num_spatial,
    )
    taps = math.prod(kernel_t) - int(remove_center)
    for name, array, per_group in (("offsets", offsets, taps * num_spatial), ("mask", mask, taps)):
        expected = (batch, *out_spatial, groups * per_group)
        if tuple(array.shape) != expected:
            raise ValueError(
                f"`{name}` must have shape (B, *out_spatial, groups * {per_group}) = {expected} for these "
                f"`inputs` {tuple(inputs.shape)}, `kernel_size` {kernel_t}, `groups` {groups} and "
                f"`remove_center` {remove_center}, got shape {tuple(array.shape)}."
            )
    if batch == 0:
        return jnp.zeros((0, *out_spatial, channels), inputs.dtype)
    grid = _tap_grid(out_spatial, kernel_t, strides_t, pads_t, dilation_t, remove_center)

    def local(inputs: jax.Array, offsets: jax.Array, mask: jax.Array) -> jax.Array:
        return _aggregate(inputs, offsets, mask, grid, groups, offset_scale)

    return batch_parallel.map_batch_shards(local, (inputs, offsets, mask))


def _tap_grid(
    out_spatial: tuple[int, ...],
    kernel_size: tuple[int, ...],
    strides: tuple[int, ...],
    pads: tuple[int, ...],
    dilation: tuple[int, ...],
    remove_center: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The centres ``o * s + center - pad`` ``(*out_spatial, 1, N)`` and the taps ``k * d - center``
    ``(T, N)``, both with coordinates in spatial-dim order and taps in InternImage's order."""
    centers = [d * (k - 1) // 2 for k, d in zip(kernel_size, dilation, strict=True)]
    axes = [np.arange(n) * s + c - p for n, s, c, p in zip(out_spatial, strides, centers, pads, strict=True)]
    origin = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(*out_spatial, 1, len(axes))
    # Taps with the last spatial dim slowest: enumerate the reversed dims row-major, then un-reverse.
    reversed_taps = np.stack(np.meshgrid(*(np.arange(k) for k in kernel_size[::-1]), indexing="ij"), axis=-1).reshape(
        -1, len(kernel_size)
    )
    taps = reversed_taps[:, ::-1] * np.asarray(dilation) - np.asarray(centers)
    if remove_center:
        taps = np.delete(taps, len(taps) // 2, axis=0)
    return origin, taps


def _aggregate(
    inputs: jax.Array,
    offsets: jax.Array,
    mask: jax.Array,
    grid: tuple[np.ndarray, np.ndarray],
    groups: int,
    offset_scale: Any,
) -> jax.Array:
    batch, *spatial, channels = inputs.shape
    origin, taps = grid
    out_spatial = origin.shape[:-2]
    num_spatial = len(spatial)
    compute = _sampling._compute_dtype(inputs.dtype)
    num_taps = len(taps)
    offsets = offsets.reshape(batch, *out_spatial, groups, num_taps, num_spatial)[..., ::-1]  # x, y -> y, x
    offsets = jnp.swapaxes(offsets, -3, -2).astype(compute)  # (B, *out, T, G, N)
    scale = jnp.asarray(offset_scale, compute)
    # Explicit ranks and dtypes: the result is the same under strict promotion and rank promotion "raise".
    origin = jnp.asarray(origin[None, ..., None, :], compute)  # (1, *out, 1, 1, N)
    taps = jnp.asarray(taps[(None,) * (1 + len(out_spatial)) + (slice(None), None)], compute)  # (1, .., T, 1, N)
    positions = origin + scale * (taps + offsets)
    mask = jnp.swapaxes(mask.reshape(batch, *out_spatial, groups, num_taps), -2, -1)
    grouped = inputs.reshape(batch, *spatial, groups, channels // groups)
    out = _sampling.sample(grouped, positions, mask, sum_taps=True)  # (B, *out, G, Cg)
    return out.reshape(batch, *out_spatial, channels)
