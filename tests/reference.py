"""Float64 NumPy references written as the direct definitions, independent of jdynconv's lowerings.

Loops over batch, output positions, kernel taps and groups: slow, obvious, and only for small shapes.
Layout is channels-last: inputs ``(B, *spatial, C_in)``, kernels ``(B, *kernel_size, C_in // G, C_out)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Explicit convolution hyper-parameters (padding already resolved to (low, high) pairs)."""

    strides: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    kernel_dilation: tuple[int, ...]
    input_dilation: tuple[int, ...]
    groups: int

    @classmethod
    def simple(cls, num_spatial: int, padding: int = 0, stride: int = 1, groups: int = 1) -> Geometry:
        return cls(
            (stride,) * num_spatial, ((padding, padding),) * num_spatial, (1,) * num_spatial, (1,) * num_spatial, groups
        )


def _dilate_and_pad(x: np.ndarray, geo: Geometry) -> np.ndarray:
    batch, *spatial, channels = x.shape
    dilated_shape = [(s - 1) * d + 1 for s, d in zip(spatial, geo.input_dilation, strict=True)]
    dilated = np.zeros((batch, *dilated_shape, channels), np.float64)
    dilated[(slice(None), *(slice(None, None, d) for d in geo.input_dilation), slice(None))] = x
    return np.pad(dilated, [(0, 0), *geo.pads, (0, 0)])


def _output_shape(padded_spatial: Sequence[int], kernel_size: Sequence[int], geo: Geometry) -> tuple[int, ...]:
    return tuple(
        (p - (k - 1) * kd - 1) // s + 1
        for p, k, kd, s in zip(padded_spatial, kernel_size, geo.kernel_dilation, geo.strides, strict=True)
    )


def _window_index(position: tuple[int, ...], tap: tuple[int, ...], geo: Geometry) -> tuple[int, ...]:
    return tuple(p * s + t * kd for p, t, s, kd in zip(position, tap, geo.strides, geo.kernel_dilation, strict=True))


def conv(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, geo: Geometry) -> np.ndarray:
    """``out[b, p, o] = bias + sum_{tap, c} x_pad[b, p * stride + tap * dilation, g(o) * Cg + c] * w[b, tap, c, o]``."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    padded = _dilate_and_pad(x, geo)
    batch = x.shape[0]
    kernel_size = w.shape[1:-2]
    group_in, out_channels = w.shape[-2:]
    group_out = out_channels // geo.groups
    out_shape = _output_shape(padded.shape[1:-1], kernel_size, geo)
    out = np.zeros((batch, *out_shape, out_channels))
    for b in range(batch):
        for position in np.ndindex(*out_shape):
            for tap in np.ndindex(*kernel_size):
                window = _window_index(position, tap, geo)
                for g in range(geo.groups):
                    xs = padded[(b, *window, slice(g * group_in, (g + 1) * group_in))]
                    ws = w[(b, *tap, slice(None), slice(g * group_out, (g + 1) * group_out))]
                    out[(b, *position, slice(g * group_out, (g + 1) * group_out))] += xs @ ws
    if bias is not None:
        bias = np.asarray(bias, np.float64)
        out += bias.reshape((batch if bias.ndim == 2 else 1,) + (1,) * len(out_shape) + (out_channels,))
    return out


def conv_vjp(
    x: np.ndarray, w: np.ndarray, cotangent: np.ndarray, geo: Geometry, bias_shape: tuple[int, ...] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Gradients of ``sum(conv(x, w, bias) * cotangent)`` w.r.t. x, w and bias, by the chain rule by hand."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    cotangent = np.asarray(cotangent, np.float64)
    padded = _dilate_and_pad(x, geo)
    d_padded = np.zeros_like(padded)
    d_w = np.zeros_like(w)
    batch = x.shape[0]
    kernel_size = w.shape[1:-2]
    group_in, out_channels = w.shape[-2:]
    group_out = out_channels // geo.groups
    out_shape = cotangent.shape[1:-1]
    for b in range(batch):
        for position in np.ndindex(*out_shape):
            for tap in np.ndindex(*kernel_size):
                window = _window_index(position, tap, geo)
                for g in range(geo.groups):
                    in_index = (b, *window, slice(g * group_in, (g + 1) * group_in))
                    w_index = (b, *tap, slice(None), slice(g * group_out, (g + 1) * group_out))
                    g_out = cotangent[(b, *position, slice(g * group_out, (g + 1) * group_out))]
                    d_padded[in_index] += w[w_index] @ g_out
                    d_w[w_index] += np.outer(padded[in_index], g_out)
    crop = tuple(slice(lo, d_padded.shape[i + 1] - hi) for i, (lo, hi) in enumerate(geo.pads))
    d_dilated = d_padded[(slice(None), *crop, slice(None))]
    d_x = d_dilated[(slice(None), *(slice(None, None, d) for d in geo.input_dilation), slice(None))]
    d_bias = None
    if bias_shape is not None:
        spatial_axes = tuple(range(1, cotangent.ndim - 1))
        d_bias = cotangent.sum(axis=spatial_axes)
        if len(bias_shape) == 1:
            d_bias = d_bias.sum(axis=0)
    return d_x, d_w, d_bias
