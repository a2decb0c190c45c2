"""FIR resampling, N-d: NVIDIA's ``upfirdn2d`` (up-sample by zero insertion, pad or crop, FIR filter,
down-sample) for 1 to 3 spatial dims, on channels-last arrays.

The filter is shared by every sample and channel, so the programs are plain depthwise convs over the
batch, which XLA's SPMD partitioner splits along a sharded batch by itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike


def setup_filter(taps: ArrayLike, *, num_spatial: int, normalize: bool = True) -> np.ndarray:
    """A FIR filter as NumPy float32, as NVIDIA's ``setup_filter``: 1-D taps (applied along every spatial dim,
    separably: NVIDIA's outer product for 2-D) or an N-d array, divided by its sum when ``normalize``.
    """
    if taps is None or isinstance(taps, str):
        raise TypeError(f"`resample_filter` must be a sequence of numbers (FIR taps) or an array, got {taps!r}.")
    try:
        taps = np.asarray(taps, np.float32)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"`resample_filter` must be a sequence of numbers (FIR taps) or an array, got {taps!r} ({error})."
        ) from None
    if taps.ndim not in (1, num_spatial) or taps.size == 0 or not np.all(np.isfinite(taps)):
        raise ValueError(
            f"`resample_filter` must be finite 1-D taps or a {num_spatial}-D array for {num_spatial}-D inputs, "
            f"got shape {taps.shape}."
        )
    if normalize:
        if taps.sum() == 0:
            raise ValueError(f"`resample_filter` {taps.tolist()} sums to 0 and cannot be normalised.")
        taps = taps / taps.sum()
    return taps


def filter_size(taps: np.ndarray, num_spatial: int) -> tuple[int, ...]:
    """The filter's length along each spatial dim."""
    return (taps.shape[0],) * num_spatial if taps.ndim == 1 else tuple(taps.shape)


def upfirdn(
    inputs: jax.Array,
    taps: np.ndarray,
    *,
    up: int = 1,
    down: int = 1,
    padding: Sequence[tuple[int, int]],
    flip_filter: bool = False,
    gain: float = 1.0,
) -> jax.Array:
    """NVIDIA's ``upfirdn2d`` in N-d, channels-last: ``(B, *spatial, C)`` -> ``(B, *out_spatial, C)``.

    Zero insertion (``up - 1`` zeros after every sample), then ``padding`` ``(low, high)`` per dim
    (negative crops), then the FIR filter (a true convolution unless ``flip_filter``), then keeping every
    ``down``-th sample. ``taps`` is a :func:`setup_filter` result; ``gain`` scales it (``up ** N`` keeps
    the mean after zero insertion).
    """
    num_spatial = inputs.ndim - 2
    zero = jnp.zeros((), inputs.dtype)
    config = [(0, 0, 0), *((lo, hi + up - 1, up - 1) for lo, hi in padding), (0, 0, 0)]
    x = lax.pad(inputs, zero, config)
    taps = taps * np.float32(gain ** (taps.ndim / num_spatial))
    if not flip_filter:
        taps = np.flip(taps)
    if taps.ndim == num_spatial:
        return _fir(x, taps, tuple(range(num_spatial)), down)
    for axis in range(num_spatial):
        x = _fir(x, taps, (axis,), down)
    return x


def _fir(x: jax.Array, taps: np.ndarray, axes: tuple[int, ...], down: int) -> jax.Array:
    """Cross-correlation of ``x`` with ``taps`` over spatial ``axes`` (0-based), keeping every ``down``-th output:
    ``out[i] = sum_t taps[t] * x[i * down + t]``, a multiply-add per tap (XLA fuses them into one loop)."""
    sizes = [x.shape[1 + axis] - n + 1 for axis, n in zip(axes, taps.shape, strict=True)]
    if any(size < 1 for size in sizes):
        raise ValueError(
            f"The padded signal (spatial shape {x.shape[1:-1]}) is shorter than the filter {taps.shape} "
            f"along spatial axes {axes}."
        )
    out = None
    for tap in np.ndindex(*taps.shape):
        if taps[tap] == 0:
            continue
        start = [0] * x.ndim
        limit = list(x.shape)
        strides = [1] * x.ndim
        for axis, t, size in zip(axes, tap, sizes, strict=True):
            start[1 + axis] = t
            limit[1 + axis] = t + (size - 1) + 1
            strides[1 + axis] = down
        term = lax.slice(x, start, limit, strides) * jnp.asarray(taps[tap], x.dtype)
        out = term if out is None else out + term
    if out is None:
        raise ValueError("`resample_filter` is all zeros.")
    return out
