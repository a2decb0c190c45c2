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


def leaky_relu(x: np.ndarray, slope: float = 0.01) -> np.ndarray:
    return np.where(x >= 0, x, slope * x)


def branch_mix(
    x: np.ndarray,
    params: dict[str, np.ndarray],
    mean: np.ndarray,
    var: np.ndarray,
    geo: Geometry,
    *,
    training: bool,
    gate: str = "leaky_relu",
    gate_input: str = "flatten",
    temperature: float = 1.0,
    epsilon: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The seed's block written out branch by branch: returns (output, batch mean, batch variance).

    ``x`` is channels-last; the flatten gate flattens channel-major (PyTorch's order).
    """
    x = np.asarray(x, np.float64)
    batch = x.shape[0]
    k = params["kernel"].shape[0]
    gate_in = (
        np.moveaxis(x, -1, 1).reshape(batch, -1)
        if gate_input == "flatten"
        else x.mean(axis=tuple(range(1, x.ndim - 1)))
    )
    logits = gate_in @ np.asarray(params["gate_kernel"], np.float64) + params["gate_bias"]
    weights = {
        "leaky_relu": leaky_relu(logits),
        "softmax": np.exp(logits / temperature - (logits / temperature).max(1, keepdims=True)),
        "sigmoid": 1 / (1 + np.exp(-logits)),
        "identity": logits,
    }[gate]
    if gate == "softmax":
        weights = weights / weights.sum(1, keepdims=True)
    out = 0.0
    batch_means, batch_vars = [], []
    for n in range(k):
        kernel = np.broadcast_to(params["kernel"][n], (batch, *params["kernel"].shape[1:]))
        bias = params["bias"][n] if "bias" in params else None
        y = conv(x, kernel, bias, geo)
        axes = tuple(range(y.ndim - 1))
        batch_means.append(y.mean(axis=axes))
        batch_vars.append(y.var(axis=axes))
        mu, sigma2 = (batch_means[n], batch_vars[n]) if training else (mean[n], var[n])
        y = (y - mu) / np.sqrt(sigma2 + epsilon) * params["scale"][n] + params["offset"][n]
        out = out + weights[:, n].reshape((batch,) + (1,) * (y.ndim - 1)) * leaky_relu(y)
    return out, np.stack(batch_means), np.stack(batch_vars)


def conv_transpose(
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None,
    strides: Sequence[int],
    padding: Sequence[int],
    output_padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> np.ndarray:
    """PyTorch's ``conv_transposeNd`` per sample, as a scatter: input position ``i`` adds ``x[i] * w[tap]`` at
    ``i * stride + tap * dilation - padding``. ``w`` is ``(B, *kernel_size, C_out // G, C_in)``."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    batch, *spatial, in_channels = x.shape
    *kernel_size, group_out, _ = w.shape[1:]
    group_in = in_channels // groups
    out_shape = [
        (n - 1) * s - 2 * p + d * (k - 1) + op + 1
        for n, s, p, d, k, op in zip(spatial, strides, padding, dilation, kernel_size, output_padding, strict=True)
    ]
    out = np.zeros((batch, *out_shape, groups * group_out))
    for b in range(batch):
        for position in np.ndindex(*spatial):
            for tap in np.ndindex(*kernel_size):
                target = [
                    i * s + t * d - p for i, t, s, d, p in zip(position, tap, strides, dilation, padding, strict=True)
                ]
                if any(not 0 <= j < n for j, n in zip(target, out_shape, strict=True)):
                    continue
                for g in range(groups):
                    xs = x[(b, *position, slice(g * group_in, (g + 1) * group_in))]
                    ws = w[(b, *tap, slice(None), slice(g * group_in, (g + 1) * group_in))]
                    out[(b, *target, slice(g * group_out, (g + 1) * group_out))] += ws @ xs
    if bias is not None:
        bias = np.asarray(bias, np.float64)
        out += bias.reshape((batch if bias.ndim == 2 else 1,) + (1,) * len(out_shape) + (-1,))
    return out


def upfirdn(
    x: np.ndarray, taps: np.ndarray, up: int, down: int, pads: Sequence[tuple[int, int]], gain: float = 1.0
) -> np.ndarray:
    """NVIDIA's ``upfirdn2d`` semantics in N-d, channels-last: insert ``up - 1`` zeros after every sample, pad
    (negative crops), convolve with the N-d filter (flipped: a true convolution), keep every ``down``-th."""
    x = np.asarray(x, np.float64)
    num_spatial = x.ndim - 2
    f = np.asarray(taps, np.float64)
    if f.ndim == 1:
        f = np.einsum(",".join("abc"[:num_spatial]) + "->" + "abc"[:num_spatial], *([f] * num_spatial))
    f = f * gain
    upsampled = np.zeros((x.shape[0], *(n * up for n in x.shape[1:-1]), x.shape[-1]))
    upsampled[(slice(None), *(slice(None, None, up) for _ in range(num_spatial)), slice(None))] = x
    padded = np.pad(upsampled, [(0, 0), *((max(lo, 0), max(hi, 0)) for lo, hi in pads), (0, 0)])
    crop = tuple(slice(max(-lo, 0), padded.shape[1 + i] - max(-hi, 0)) for i, (lo, hi) in enumerate(pads))
    padded = padded[(slice(None), *crop, slice(None))]
    flipped = f[(slice(None, None, -1),) * num_spatial]
    out_shape = [n - k + 1 for n, k in zip(padded.shape[1:-1], f.shape, strict=True)]
    out = np.zeros((x.shape[0], *out_shape, x.shape[-1]))
    for tap in np.ndindex(*f.shape):
        window = tuple(slice(t, t + n) for t, n in zip(tap, out_shape, strict=True))
        out += flipped[tap] * padded[(slice(None), *window, slice(None))]
    return out[(slice(None), *(slice(None, None, down) for _ in range(num_spatial)), slice(None))]


def modulated_conv(
    x: np.ndarray,
    kernel: np.ndarray,
    styles: np.ndarray,
    *,
    demodulate: bool,
    up: int,
    down: int,
    padding: int,
    taps: np.ndarray,
    flip_weight: bool,
    epsilon: float = 1e-8,
) -> np.ndarray:
    """StyleGAN2's modulated convolution by its definition (NVIDIA's generic ``conv2d_resample`` path), N-d,
    channels-last: per-sample weights ``kernel * styles`` (demodulated), then zero-insertion and FIR filter
    (gain ``up ** N``) with the padding, a valid conv (the kernel flipped unless ``flip_weight``), then the
    FIR filter and every ``down``-th sample. ``kernel`` is ``(*kernel_size, C_in, C_out)``."""
    kernel = np.asarray(kernel, np.float64)
    styles = np.asarray(styles, np.float64)
    num_spatial = x.ndim - 2
    weights = kernel[None] * styles.reshape(styles.shape[0], *(1,) * num_spatial, -1, 1)
    if demodulate:
        norms = np.sum(weights**2, axis=tuple(range(1, num_spatial + 2)), keepdims=True)
        weights = weights / np.sqrt(norms + epsilon)
    if not flip_weight:
        weights = weights[(slice(None), *(slice(None, None, -1),) * num_spatial)]
    f_size = len(taps) if np.ndim(taps) == 1 else np.shape(taps)[0]
    low = high = padding
    if up > 1:
        low, high = low + (f_size + up - 1) // 2, high + (f_size - up) // 2
    if down > 1:
        low, high = low + (f_size - down + 1) // 2, high + (f_size - down) // 2
    identity = np.ones((1,) * num_spatial)
    resampled = upfirdn(x, taps if up > 1 else identity, up, 1, [(low, high)] * num_spatial, gain=up**num_spatial)
    out = conv(resampled, weights, None, Geometry.simple(num_spatial))
    return upfirdn(out, taps, 1, down, [(0, 0)] * num_spatial) if down > 1 else out
