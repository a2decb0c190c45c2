"""Parity of ``jdynconv.deform_conv`` (float32, channels-first) with torchvision's ``deform_conv2d``.

The reference is ``parity/deform_conv_reference.py``, torchvision's CPU kernel line by line in float64, itself held
to torchvision (``parity/check_against_torchvision.py``, 1248 cases, float64 differences <= 1.4e-14). It reads
the same float32 arrays jdynconv gets, widened to float64, so the only differences are jdynconv's float32
arithmetic. Compared: the forward and the gradients w.r.t. input, offsets, mask, weight and bias
(``jax.vjp`` of a random cotangent against the kernel's backward), at ``parity/conftest.py``'s tolerance:
``|got - expected| <= 1e-5 |expected| + 1e-5 max(1, max |expected|)``.

Cases: ``make_case`` of the check script, on six geometries covering groups 1/2, offset groups 1/2/4, stride 1/2
(also per axis), dilation 1/2, padding 0 and ``k // 2``, kernels 1x1/3x3/2x3 and mask on/off. Each geometry runs
all four offset kinds (``normal``, ``large``: mostly outside the image, ``integer``: on pixel rows/columns,
``border``: exactly at -2, -1, 0, H - 1, H, H + 1) with one compilation: the same seed gives ``make_case`` the
same shapes, then different offsets.

Why 1e-5 holds with no exception: every quantity is a sum
of at most a few hundred float32 products (``K * C / G <= 72`` for the output; ``B * H_out * W_out <= 162``
for the weight and bias gradients), whose rounding is ~sqrt(n) 2^-24 ~ 1e-6 relative at worst. Sampling
positions add one float32 rounding of ``grid + offset`` (``|p| < 32``: at most 2^-20 = 1e-6 pixel), which moves
a bilinear sample by at most that times its slope, again ~1e-6 relative. An integer position is exact in
float32 (integer offsets plus an integer grid); a generic one is within one rounding of an integer with
probability ~1e-6 per point, where the other one-sided offset derivative would apply -- none does with these
seeds. Measured (Intel Xeon, jax 0.10.2): at most 5.5e-7 of ``max(1, max |expected|)`` (an offset gradient), over
the 24 cases and six quantities; 18x inside 1e-5.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np
import pytest

import jdynconv as jdc
from parity.check_against_torchvision import OFFSET_KINDS, DeformCase, make_case, reference_results

# (groups, offset groups, stride, dilation, padding, kernel, mask): each pair of options meets at least once.
GEOMETRIES = [
    (1, 1, (1, 1), (1, 1), (0, 0), (3, 3), True),
    (2, 2, (2, 2), (1, 1), (1, 1), (3, 3), False),
    (1, 4, (1, 1), (2, 2), (1, 1), (3, 3), True),
    (2, 1, (2, 2), (2, 2), (0, 0), (2, 3), True),
    (1, 2, (2, 1), (1, 2), (1, 1), (2, 3), False),
    (2, 4, (1, 2), (2, 1), (0, 0), (1, 1), True),
]


def _name(geometry: tuple) -> str:
    groups, offset_groups, stride, dilation, padding, kernel, mask = geometry
    return f"g{groups}-og{offset_groups}-s{stride}-d{dilation}-p{padding}-k{kernel}-{'mask' if mask else 'nomask'}"


def _float32(case: DeformCase) -> tuple[DeformCase, dict[str, np.ndarray | None]]:
    """The case's arrays rounded to float32, and the same numbers in float64 for the reference."""
    arrays = {f: getattr(case, f) for f in ("x", "offset", "weight", "bias", "mask", "grad_out")}
    rounded = {k: None if v is None else v.astype(np.float32) for k, v in arrays.items()}
    widened = {k: None if v is None else v.astype(np.float64) for k, v in rounded.items()}
    return dataclasses.replace(case, **widened), rounded


@functools.cache
def _value_and_grads(stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int):
    def value_and_grads(x, offset, weight, bias, mask, grad_out):
        def call(x, offset, weight, bias, mask):
            return jdc.deform_conv(
                x, offset, weight, bias, mask=mask, strides=stride, padding=padding, kernel_dilation=dilation,
                feature_group_count=groups, data_format="channels_first",
            )  # fmt: skip

        out, vjp = jax.vjp(call, x, offset, weight, bias, mask)
        grad_x, grad_offset, grad_weight, grad_bias, grad_mask = vjp(grad_out)
        results = {"output": out, "grad_input": grad_x, "grad_weight": grad_weight, "grad_offset": grad_offset}
        if mask is not None:
            results["grad_mask"] = grad_mask
        if bias is not None:
            results["grad_bias"] = grad_bias
        return results

    return jax.jit(value_and_grads)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_name)
def test_matches_torchvision_kernel(geometry: tuple, assert_close: Callable[[object, object, str], None]) -> None:
    groups, offset_groups, stride, dilation, padding, kernel, use_mask = geometry
    seed = GEOMETRIES.index(geometry)
    shapes = set()
    for kind in OFFSET_KINDS:
        case = make_case(
            np.random.default_rng(seed), groups=groups, offset_groups=offset_groups, stride=stride,
            dilation=dilation, padding=padding, kernel=kernel, use_mask=use_mask, offsets=kind, max_batch=2,
        )  # fmt: skip
        reference_case, arrays = _float32(case)
        expected = reference_results(reference_case)
        fn = _value_and_grads(stride, padding, dilation, groups)
        got = fn(arrays["x"], arrays["offset"], arrays["weight"], arrays["bias"], arrays["mask"], arrays["grad_out"])
        assert got.keys() == expected.keys(), case.name
        for quantity, value in expected.items():
            assert got[quantity].dtype == np.float32, (case.name, quantity)
            assert_close(np.asarray(got[quantity], np.float64), value, f"{case.name} {quantity}")
        shapes.add(tuple(a.shape for a in jax.tree.leaves(arrays)))
    assert len(shapes) == 1  # one compilation served the four kinds
