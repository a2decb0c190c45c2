"""Float64 NumPy definition of N-d deformable convolution (v1, and v2 with a modulation mask), and its VJP.

Written from the definition (Dai et al. 2017, "Deformable Convolutional Networks"; Zhu et al. 2019, "Deformable
ConvNets v2"), not from any implementation; ``parity/test_deform_conv_reference.py`` ties it, in 2-D, to
torchvision's kernel (``parity/deform_conv_reference.py``).

Layout is channels-first, for ``N`` spatial dims (1, 2 or 3), kernel ``k = (k_0, ..., k_{N-1})``, ``K = prod(k)``:

* input ``x``: ``(B, C, *S)``;
* offsets: ``(B, N * G_off * K, *S_out)``, channel order ``[offset group][tap][coordinate]``, taps row-major over
  the kernel dims, coordinate 0 first (in 2-D: ``(dy, dx)`` per tap, torchvision's order);
* mask: ``(B, G_off * K, *S_out)``, order ``[offset group][tap]``, or None (every tap times 1, no mask gradient);
* weight: ``(F, C / groups, *k)``; bias ``(F,)`` or None.

``groups = C / weight.shape[1]`` and ``G_off = offsets.shape[1] / (N * K)``, read off the shapes. Input channel
``c`` uses offset group ``c // (C / G_off)``; output channel ``f`` sees the input channels of weight group
``f // (F / groups)``.

Output position ``o`` and tap ``t`` sample along dim ``i`` at ``p_i = o_i * stride_i - pad_low_i + t_i *
dilation_i + offset_i``: the multilinear interpolation over the ``2^N`` corners ``floor(p) + e``, ``e`` in
``{0, 1}^N``, of the input extended by zeros (corners outside the input count 0), with weight
``prod_i (p_i - floor(p_i) if e_i else 1 - (p_i - floor(p_i)))``. The output is
``bias[f] + sum_{c, t} weight[f, c, t] * mask[t] * sample(x[c], p)``. Output size per dim:
``(S + low + high - dilation * (k - 1) - 1) // stride + 1``.

Derivatives: the function is linear in the input, the weight, the mask and the bias. In a position it is
piecewise multilinear, with kinks at the integers; the derivative w.r.t. ``p_i`` here is that of the multilinear
formula with the corners held at ``floor(p)``: the one-sided derivative from above at integer ``p_i`` (this is
what torchvision's kernel computes in 2-D).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

Pads = Sequence[tuple[int, int]]


def _geometry(
    x_shape: Sequence[int],
    weight_shape: Sequence[int],
    strides: Sequence[int] | None,
    padding: Pads | None,
    dilation: Sequence[int] | None,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[int, int], ...], tuple[int, ...], tuple[int, ...]]:
    """``(kernel, strides, pads, dilation, out_shape)``, defaults filled in and checked."""
    n = len(x_shape) - 2
    if n not in (1, 2, 3) or len(weight_shape) != n + 2:
        raise ValueError(f"x must be (B, C, *S) with 1-3 spatial dims and weight (F, C/groups, *k): {x_shape}")
    kernel = tuple(int(k) for k in weight_shape[2:])
    strides = tuple(strides) if strides is not None else (1,) * n
    pads = tuple((int(lo), int(hi)) for lo, hi in padding) if padding is not None else ((0, 0),) * n
    dilation = tuple(dilation) if dilation is not None else (1,) * n
    if not len(strides) == len(pads) == len(dilation) == n:
        raise ValueError("strides, padding and dilation need one entry per spatial dim")
    out_shape = tuple(
        (s + lo + hi - d * (k - 1) - 1) // st + 1
        for s, (lo, hi), d, k, st in zip(x_shape[2:], pads, dilation, kernel, strides, strict=True)
    )
    if min(out_shape) <= 0:
        raise ValueError(f"empty output {out_shape}")
    return kernel, strides, pads, dilation, out_shape


def _positions(
    offsets: np.ndarray,
    kernel: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[tuple[int, int]],
    dilation: Sequence[int],
    out_shape: Sequence[int],
) -> np.ndarray:
    """Sampling positions ``(B, G_off, K, N, O)`` (``O = prod(out_shape)``) from offsets ``(B, N*G_off*K, *S_out)``."""
    n = len(kernel)
    n_taps = int(np.prod(kernel))
    batch = offsets.shape[0]
    n_out = int(np.prod(out_shape))
    if offsets.shape[1] % (n * n_taps) or offsets.shape[2:] != tuple(out_shape):
        raise ValueError(f"offsets must be (B, {n}*G_off*{n_taps}, *{tuple(out_shape)}), got {offsets.shape}")
    off = offsets.reshape(batch, -1, n_taps, n, n_out)
    taps = np.array(list(np.ndindex(*kernel))).T  # (N, K)
    outs = np.array(list(np.ndindex(*out_shape))).T  # (N, O)
    st = np.array(strides)[:, None]
    lo = np.array([p[0] for p in pads])[:, None]
    dil = np.array(dilation)[:, None]
    base = (outs * st - lo)[None, :, :] + (taps * dil).T[:, :, None]  # (K, N, O), exact integers
    return base + off


Corner = tuple[tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]


def _corners(positions: np.ndarray, spatial: Sequence[int]) -> list[Corner]:
    """Per corner ``e`` in ``{0, 1}^N``: ``(e, flat index, in-input flag, per-dim weights)``; the index and flag
    are ``positions.shape`` without the ``N`` axis (axis 3), the weights keep it."""
    n = len(spatial)
    low = np.floor(positions)
    frac = positions - low
    low = low.astype(np.int64)
    size = np.array(spatial).reshape(1, 1, 1, n, 1)
    corners = []
    for bits in itertools.product((0, 1), repeat=n):
        e = np.array(bits).reshape(1, 1, 1, n, 1)
        index = low + e
        valid = np.all((index >= 0) & (index < size), axis=3)
        clipped = np.clip(index, 0, size - 1)
        flat = np.zeros(valid.shape, np.int64)
        for i in range(n):
            flat = flat * spatial[i] + clipped[:, :, :, i]
        weights = np.where(e == 1, frac, 1 - frac)
        corners.append((bits, flat, valid, weights))
    return corners


def _gather(x_groups: np.ndarray, flat: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``x_groups`` ``(B, G, Cg, prod(S))``, ``flat``/``valid`` ``(B, G, K, O)`` -> values ``(B, G, Cg, K, O)``."""
    b, g, k, o = flat.shape
    values = np.take_along_axis(x_groups, flat.reshape(b, g, 1, k * o), axis=3).reshape(b, g, -1, k, o)
    return values * valid[:, :, None]


def _prepare(
    x: np.ndarray,
    offsets: np.ndarray,
    weight: np.ndarray,
    mask: np.ndarray | None,
    strides: Sequence[int] | None,
    padding: Pads | None,
    dilation: Sequence[int] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, list[Corner], tuple[int, ...], int, int]:
    x = np.asarray(x, np.float64)
    offsets = np.asarray(offsets, np.float64)
    weight = np.asarray(weight, np.float64)
    kernel, strides, pads, dilation, out_shape = _geometry(x.shape, weight.shape, strides, padding, dilation)
    batch, channels, *spatial = x.shape
    n = len(kernel)
    n_taps = int(np.prod(kernel))
    positions = _positions(offsets, kernel, strides, pads, dilation, out_shape)
    offset_groups = positions.shape[1]
    if channels % offset_groups or channels % weight.shape[1] or weight.shape[0] % (channels // weight.shape[1]):
        raise ValueError("channels must divide into the offset groups and the weight groups")
    if mask is not None:
        mask = np.asarray(mask, np.float64)
        if mask.shape != (batch, offset_groups * n_taps, *out_shape):
            raise ValueError(f"mask must be {(batch, offset_groups * n_taps, *out_shape)}, got {mask.shape}")
        mask = mask.reshape(batch, offset_groups, 1, n_taps, -1)
    x_groups = x.reshape(batch, offset_groups, channels // offset_groups, -1)
    corners = _corners(positions, spatial)
    return x, x_groups, weight, mask, corners, out_shape, n, n_taps


def _columns(x_groups: np.ndarray, corners: list[Corner]) -> np.ndarray:
    """Sampled values ``(B, G_off, C / G_off, K, O)``, before the mask."""
    sampled = np.zeros(())
    for _, flat, valid, weights in corners:
        sampled = sampled + np.prod(weights, axis=3)[:, :, None] * _gather(x_groups, flat, valid)
    return sampled


def _conv(columns: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``columns`` ``(B, C, K, O)`` times ``weight`` ``(F, C/groups, *k)`` -> ``(B, F, O)``."""
    batch, channels, n_taps, n_out = columns.shape
    groups = channels // weight.shape[1]
    cols = columns.reshape(batch, groups, channels // groups, n_taps, n_out)
    w = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], n_taps)
    return np.einsum("bgcko,gfck->bgfo", cols, w).reshape(batch, weight.shape[0], n_out)


def deform_conv(
    x: np.ndarray,
    offsets: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    *,
    strides: Sequence[int] | None = None,
    padding: Pads | None = None,
    dilation: Sequence[int] | None = None,
) -> np.ndarray:
    """Deformable convolution, ``(B, F, *S_out)``; ``padding`` is ``(low, high)`` per spatial dim."""
    x, x_groups, weight, mask, corners, out_shape, _, n_taps = _prepare(
        x, offsets, weight, mask, strides, padding, dilation
    )
    sampled = _columns(x_groups, corners)
    if mask is not None:
        sampled = sampled * mask
    out = _conv(sampled.reshape(x.shape[0], x.shape[1], n_taps, -1), weight)
    if bias is not None:
        out = out + np.asarray(bias, np.float64)[None, :, None]
    return out.reshape(x.shape[0], weight.shape[0], *out_shape)


def deform_conv_vjp(
    x: np.ndarray,
    offsets: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    mask: np.ndarray | None,
    cotangent: np.ndarray,
    *,
    strides: Sequence[int] | None = None,
    padding: Pads | None = None,
    dilation: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
    """Gradients of ``sum(deform_conv(...) * cotangent)`` w.r.t. ``(x, offsets, mask, weight, bias)``; None for a
    mask or bias that is None. Position derivatives are one-sided from above at integers (see the module doc)."""
    x, x_groups, weight, mask, corners, out_shape, n, n_taps = _prepare(
        x, offsets, weight, mask, strides, padding, dilation
    )
    batch, channels, *spatial = x.shape
    offset_groups, per_group = x_groups.shape[1], x_groups.shape[2]
    n_out = int(np.prod(out_shape))
    filters, per_weight_group = weight.shape[0], weight.shape[1]
    groups = channels // per_weight_group
    gy = np.asarray(cotangent, np.float64).reshape(batch, groups, filters // groups, n_out)

    sampled = _columns(x_groups, corners)  # (B, G_off, Cg, K, O)
    columns = sampled * mask if mask is not None else sampled
    cols = columns.reshape(batch, groups, per_weight_group, n_taps, n_out)
    w = weight.reshape(groups, filters // groups, per_weight_group, n_taps)

    grad_weight = np.einsum("bgfo,bgcko->gfck", gy, cols).reshape(weight.shape)
    grad_bias = gy.sum(axis=(0, 3)).reshape(filters) if bias is not None else None
    grad_columns = np.einsum("gfck,bgfo->bgcko", w, gy).reshape(batch, offset_groups, per_group, n_taps, n_out)

    grad_mask = None
    if mask is not None:
        grad_mask = (grad_columns * sampled).sum(axis=2).reshape(batch, offset_groups * n_taps, *out_shape)
        grad_sampled = grad_columns * mask
    else:
        grad_sampled = grad_columns

    size = int(np.prod(spatial))
    grad_x = np.zeros(batch * channels * size)
    grad_positions = np.zeros((batch, offset_groups, n_taps, n, n_out))
    bc = np.arange(batch * channels).reshape(batch, offset_groups, per_group, 1, 1)
    for bits, flat, valid, weights in corners:
        # input: the corner's weight times the cotangent, scattered to the corner
        corner_weight = np.prod(weights, axis=3)[:, :, None]  # (B, G_off, 1, K, O)
        contribution = np.broadcast_to(grad_sampled * corner_weight * valid[:, :, None], grad_sampled.shape)
        index = np.broadcast_to(bc * size + flat[:, :, None], grad_sampled.shape)
        grad_x += np.bincount(index.ravel(), weights=contribution.ravel(), minlength=grad_x.size)
        # positions: d(corner weight)/dp_i = +-prod_{j != i} weights_j (+ for e_i = 1), times the corner value
        values = (grad_sampled * _gather(x_groups, flat, valid)).sum(axis=2)  # (B, G_off, K, O)
        for i in range(n):
            others = np.prod(np.delete(weights, i, axis=3), axis=3)
            grad_positions[:, :, :, i] += (1.0 if bits[i] else -1.0) * others * values
    grad_offsets = grad_positions.reshape(batch, offset_groups * n_taps * n, *out_shape)
    return grad_x.reshape(x.shape), grad_offsets, grad_mask, grad_weight, grad_bias
