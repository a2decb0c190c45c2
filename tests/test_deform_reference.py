"""The N-d deformable-convolution definition (``tests/deform_reference.py``) checked on its own terms.

* Forward, 1-D/2-D/3-D: against a brute-force loop over batch, filter, output position, tap and channel that
  interpolates each point corner by corner, written plainly (small sizes).
* Gradients: against central finite differences at positions away from the integers (where the function is
  smooth), along random directions and entry by entry, for the input, offsets, mask, weight and bias.
* At integer positions (the kinks, including the border points -1, S - 1 and S): the offset gradient is the
  one-sided difference from above, exactly (the function is linear in one coordinate on ``[k, k + 1]``).
* Zero offsets and no mask: a plain convolution, forward and gradients (``tests/reference.py``'s ``conv``).

Its tie to torchvision's kernel is ``parity/test_deform_conv_reference.py``.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Sequence

import numpy as np
import pytest

from tests import deform_reference as dr
from tests import reference

# (spatial, kernel, strides, pads, dilation, groups, offset groups, channels, filters)
GEOMETRIES = {
    "1d": ((11,), (3,), (2,), ((1, 2),), (1,), 2, 2, 4, 4),
    "1d-dilated": ((9,), (2,), (1,), ((0, 0),), (3,), 1, 4, 4, 3),
    "2d": ((6, 5), (3, 2), (1, 2), ((1, 1), (0, 1)), (1, 2), 2, 1, 4, 2),
    "2d-grouped": ((5, 6), (2, 3), (2, 1), ((0, 1), (2, 0)), (2, 1), 1, 2, 2, 3),
    "3d": ((4, 3, 4), (2, 2, 2), (1, 2, 1), ((0, 1), (1, 0), (0, 0)), (1, 1, 2), 2, 2, 2, 2),
}


def _seed(*parts: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(parts).encode()))


def _out_shape(
    spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[tuple[int, int]],
    dilation: Sequence[int],
) -> tuple[int, ...]:
    return tuple(
        (s + lo + hi - d * (k - 1) - 1) // st + 1
        for s, k, st, (lo, hi), d in zip(spatial, kernel, strides, pads, dilation, strict=True)
    )


def _problem(name: str, *, use_mask: bool, use_bias: bool, offsets: str = "fractional") -> dict:
    """Random operands of one geometry; ``offsets`` "fractional" keeps every position 0.1 or more from an integer,
    "integer" puts every position on an integer (inside, on the border and outside)."""
    spatial, kernel, strides, pads, dilation, groups, offset_groups, channels, filters = GEOMETRIES[name]
    rng = _seed(name, use_mask, use_bias, offsets)
    n = len(spatial)
    n_taps = math.prod(kernel)
    out_shape = _out_shape(spatial, kernel, strides, pads, dilation)
    batch = 2
    offset_shape = (batch, n * offset_groups * n_taps, *out_shape)
    whole = rng.integers(-2, 3, offset_shape).astype(np.float64)
    off = whole if offsets == "integer" else whole + rng.uniform(0.1, 0.9, offset_shape)
    return {
        "x": rng.normal(size=(batch, channels, *spatial)),
        "offsets": off,
        "weight": rng.normal(size=(filters, channels // groups, *kernel)),
        "bias": rng.normal(size=filters) if use_bias else None,
        "mask": rng.uniform(-0.5, 1.5, (batch, offset_groups * n_taps, *out_shape)) if use_mask else None,
        "cotangent": rng.normal(size=(batch, filters, *out_shape)),
        "geometry": {"strides": strides, "padding": pads, "dilation": dilation},
    }


def _forward(p: dict, **changes: object) -> np.ndarray:
    args = {k: p[k] for k in ("x", "offsets", "weight", "bias", "mask")} | changes
    return dr.deform_conv(args["x"], args["offsets"], args["weight"], args["bias"], args["mask"], **p["geometry"])


def _vjp(p: dict) -> dict[str, np.ndarray | None]:
    grads = dr.deform_conv_vjp(p["x"], p["offsets"], p["weight"], p["bias"], p["mask"], p["cotangent"], **p["geometry"])
    return dict(zip(("x", "offsets", "mask", "weight", "bias"), grads, strict=True))


def _interpolate(image: np.ndarray, point: Sequence[float]) -> float:
    """Multilinear interpolation of ``image`` at ``point``, zero outside, corner by corner."""
    low = [math.floor(v) for v in point]
    total = 0.0
    for corner in itertools.product((0, 1), repeat=len(point)):
        q = [lo + e for lo, e in zip(low, corner, strict=True)]
        if all(0 <= qi < size for qi, size in zip(q, image.shape, strict=True)):
            weight = 1.0
            for v, lo, e in zip(point, low, corner, strict=True):
                weight *= (v - lo) if e else 1.0 - (v - lo)
            total += weight * image[tuple(q)]
    return total


def _brute_force(
    x: np.ndarray,
    offsets: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    mask: np.ndarray | None,
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    dilation: Sequence[int],
) -> np.ndarray:
    batch, channels, *spatial = x.shape
    filters, per_group, *kernel = weight.shape
    n = len(spatial)
    taps = list(np.ndindex(*kernel))
    groups = channels // per_group
    offset_groups = offsets.shape[1] // (n * len(taps))
    out_shape = _out_shape(spatial, kernel, strides, padding, dilation)
    out = np.zeros((batch, filters, *out_shape))
    for b, f, o in itertools.product(range(batch), range(filters), np.ndindex(*out_shape)):
        g = f // (filters // groups)
        total = 0.0 if bias is None else bias[f]
        for t_index, tap in enumerate(taps):
            for c_in_group in range(per_group):
                c = g * per_group + c_in_group
                og = c // (channels // offset_groups)
                point = [
                    o[i] * strides[i] - padding[i][0] + tap[i] * dilation[i]
                    + offsets[(b, (og * len(taps) + t_index) * n + i, *o)]
                    for i in range(n)
                ]  # fmt: skip
                m = 1.0 if mask is None else mask[(b, og * len(taps) + t_index, *o)]
                total += weight[(f, c_in_group, *tap)] * m * _interpolate(x[b, c], point)
        out[(b, f, *o)] = total
    return out


def _close(actual: object, expected: object, rtol: float, name: str) -> None:
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, name
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_array_less(np.abs(actual - expected).max(initial=0.0), rtol * scale, err_msg=name)


@pytest.mark.parametrize("name", list(GEOMETRIES))
@pytest.mark.parametrize("offsets", ["fractional", "integer"])
def test_forward_matches_brute_force(name: str, offsets: str) -> None:
    for use_mask, use_bias in ((False, False), (True, True)):
        p = _problem(name, use_mask=use_mask, use_bias=use_bias, offsets=offsets)
        expected = _brute_force(p["x"], p["offsets"], p["weight"], p["bias"], p["mask"], **p["geometry"])
        _close(_forward(p), expected, 1e-13, f"{name} mask={use_mask}")


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_vjp_matches_central_differences(name: str) -> None:
    """Directional derivatives along random directions, and single entries, for every argument."""
    p = _problem(name, use_mask=True, use_bias=True)
    grads = _vjp(p)
    rng = _seed("directions", name)
    h = 1e-6  # every position stays >= 0.1 from an integer, so the function is smooth at this scale

    def loss(**changes: object) -> float:
        return float(np.sum(_forward(p, **changes) * p["cotangent"]))

    for arg in ("x", "offsets", "mask", "weight", "bias"):
        value = p[arg]
        directions = [rng.normal(size=value.shape) for _ in range(2)]
        for index in rng.choice(value.size, size=min(4, value.size), replace=False):
            unit = np.zeros(value.size)
            unit[index] = 1.0
            directions.append(unit.reshape(value.shape))
        for v in directions:
            numeric = (loss(**{arg: value + h * v}) - loss(**{arg: value - h * v})) / (2 * h)
            analytic = float(np.sum(grads[arg] * v))
            assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(analytic)), (arg, numeric, analytic)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_offset_gradient_is_one_sided_from_above_at_integers(name: str) -> None:
    """At integer positions the offset gradient is ``(f(p + h) - f(p)) / h`` for any ``0 < h < 1``: exact, as the
    function is linear in one coordinate on ``[k, k + 1]``. Some entries sit on kinks where the difference from
    below differs (else this test would not see the side)."""
    p = _problem(name, use_mask=True, use_bias=False, offsets="integer")
    grad = _vjp(p)["offsets"]
    base = _forward(p)
    rng = _seed("integers", name)
    h = 0.5
    kinks = 0
    for index in rng.choice(p["offsets"].size, size=24, replace=False):
        index = np.unravel_index(index, p["offsets"].shape)
        up = p["offsets"].copy()
        up[index] += h
        down = p["offsets"].copy()
        down[index] -= h
        from_above = float(np.sum((_forward(p, offsets=up) - base) * p["cotangent"])) / h
        from_below = float(np.sum((base - _forward(p, offsets=down)) * p["cotangent"])) / h
        assert abs(grad[index] - from_above) <= 1e-12 * max(1.0, abs(from_above)), (index, grad[index], from_above)
        kinks += abs(from_above - from_below) > 1e-9
    assert kinks >= 6


def test_border_points_one_sided() -> None:
    """One 2-D point on the border, 1x1 kernel: at ``y == -1`` the value is 0 but the y-gradient comes from row 0;
    at ``y == H - 1`` it is the outward difference; at ``y == H`` it is 0 (torchvision's kernel does the same)."""
    height, width = 4, 4
    x = np.arange(1.0, 17.0).reshape(1, 1, height, width)
    weight = np.ones((1, 1, 1, 1))
    cotangent = np.zeros((1, 1, height, width))
    cotangent[0, 0, 0, 0] = 1.0
    cases = {  # (y, x) of output (0, 0): (value, d/dy, d/dx)
        (-1.0, 1.5): (0.0, 2.5, 0.0),
        (3.0, 1.5): (14.5, -14.5, 1.0),
        (4.0, 1.5): (0.0, 0.0, 0.0),
        (2.0, 1.5): (10.5, 4.0, 1.0),
        (1.5, -1.0): (0.0, 0.0, 7.0),
        (1.5, 3.0): (10.0, 4.0, -10.0),
    }
    for (py, px), (value, dy, dx) in cases.items():
        offsets = np.zeros((1, 2, height, width))
        offsets[0, :, 0, 0] = py, px
        out = dr.deform_conv(x, offsets, weight)
        grad_offsets = dr.deform_conv_vjp(x, offsets, weight, None, None, cotangent)[1]
        assert out[0, 0, 0, 0] == value, (py, px)
        assert tuple(grad_offsets[0, :, 0, 0]) == (dy, dx), (py, px)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_zero_offsets_is_plain_convolution(name: str) -> None:
    p = _problem(name, use_mask=False, use_bias=True)
    p["offsets"] = np.zeros_like(p["offsets"])
    spatial, _, strides, pads, dilation, groups, *_ = GEOMETRIES[name]
    geo = reference.Geometry(strides, pads, dilation, (1,) * len(spatial), groups)
    batch = p["x"].shape[0]
    x_last = np.moveaxis(p["x"], 1, -1)  # (B, *S, C)
    kernel_last = np.moveaxis(p["weight"], (0, 1), (-1, -2))  # (*k, C / groups, F)
    w_last = np.broadcast_to(kernel_last, (batch, *kernel_last.shape))  # the same kernel for every sample
    expected = np.moveaxis(reference.conv(x_last, w_last, p["bias"], geo), -1, 1)
    _close(_forward(p), expected, 1e-13, "forward")

    grads = _vjp(p)
    filters = p["weight"].shape[0]
    g_x, g_w, g_b = reference.conv_vjp(x_last, w_last, np.moveaxis(p["cotangent"], 1, -1), geo, (filters,))
    _close(grads["x"], np.moveaxis(g_x, -1, 1), 1e-13, "grad x")
    _close(grads["weight"], np.moveaxis(g_w.sum(axis=0), (-1, -2), (0, 1)), 1e-13, "grad weight")
    _close(grads["bias"], g_b, 1e-13, "grad bias")
