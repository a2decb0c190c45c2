"""float64 NumPy definition of per-position convolution and of its two gradients, written from the formula
``out[b, o, c] = sum_t kernels[b, o, g(c), t] * pad(x)[b, o * s + t * d, c]`` with loops over output positions
and taps (channels-last; ``kernels (B, *out, G, *K)``), independent of jdynconv's slicing."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

Pads = Sequence[tuple[int, int]]


def _positions(out_spatial: Sequence[int], kernel_size: Sequence[int]):
    for o in itertools.product(*(range(n) for n in out_spatial)):
        for t in itertools.product(*(range(k) for k in kernel_size)):
            yield o, t


def _read(o: tuple[int, ...], t: tuple[int, ...], strides: Sequence[int], dilation: Sequence[int]) -> tuple:
    return tuple(oo * s + tt * d for oo, s, tt, d in zip(o, strides, t, dilation, strict=True))


def _geometry(x: np.ndarray, kernels: np.ndarray) -> tuple[int, tuple[int, ...], int, tuple[int, ...]]:
    num_spatial = x.ndim - 2
    out_spatial = kernels.shape[1 : 1 + num_spatial]
    groups = kernels.shape[1 + num_spatial]
    return num_spatial, out_spatial, groups, kernels.shape[2 + num_spatial :]


def forward(
    x: np.ndarray, kernels: np.ndarray, strides: Sequence[int], pads: Pads, dilation: Sequence[int]
) -> np.ndarray:
    """``(B, *spatial, C)``, ``(B, *out, G, *K)`` -> ``(B, *out, C)``, float64."""
    x, kernels = np.asarray(x, np.float64), np.asarray(kernels, np.float64)
    _, out_spatial, groups, kernel_size = _geometry(x, kernels)
    padded = np.pad(x, ((0, 0), *pads, (0, 0)))
    channels = x.shape[-1]
    group_of = np.arange(channels) // (channels // groups)
    out = np.zeros((x.shape[0], *out_spatial, channels))
    for o, t in _positions(out_spatial, kernel_size):
        weight = kernels[(slice(None), *o, slice(None), *t)][:, group_of]  # (B, C)
        out[(slice(None), *o)] += weight * padded[(slice(None), *_read(o, t, strides, dilation))]
    return out


def gradients(
    x: np.ndarray,
    kernels: np.ndarray,
    cotangent: np.ndarray,
    strides: Sequence[int],
    pads: Pads,
    dilation: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """``d sum(out * cotangent) / d x`` and ``/ d kernels``, float64, from the same loops."""
    x, kernels, cotangent = (np.asarray(a, np.float64) for a in (x, kernels, cotangent))
    _, out_spatial, groups, kernel_size = _geometry(x, kernels)
    padded = np.pad(x, ((0, 0), *pads, (0, 0)))
    channels = x.shape[-1]
    group_of = np.arange(channels) // (channels // groups)
    grad_padded = np.zeros_like(padded)
    grad_kernels = np.zeros_like(kernels)
    for o, t in _positions(out_spatial, kernel_size):
        read = (slice(None), *_read(o, t, strides, dilation))
        g = cotangent[(slice(None), *o)]  # (B, C)
        weight = kernels[(slice(None), *o, slice(None), *t)][:, group_of]
        grad_padded[read] += g * weight
        products = g * padded[read]
        for group in range(groups):
            grad_kernels[(slice(None), *o, group, *t)] += products[:, group_of == group].sum(axis=1)
    crop = tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, x.shape[1:-1], strict=True))
    return grad_padded[(slice(None), *crop)], grad_kernels
