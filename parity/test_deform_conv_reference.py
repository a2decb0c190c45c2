"""Ties the N-d deformable-convolution definition (``tests/deform_reference.py``) to torchvision's semantics.

``parity/deform_conv_reference.py`` is torchvision's CPU kernel line by line; ``parity/check_against_torchvision.py``
holds it to torchvision itself (outside CI: torchvision's compiled ops need another environment; the recorded
result is ``parity/results/deform_conv_torchvision_check.txt``). Here, in CI, the 2-D definition must equal that
reference -- forward, and the gradients w.r.t. input, offsets, mask, weight and bias -- in float64 to 1e-12 of the
largest magnitude, on the check script's kinds of cases: every offset kind (``normal``, ``large`` with points far
outside, ``integer`` with points exactly on pixel rows/columns, ``border`` with points exactly at -2, -1, 0,
H - 1, H, H + 1), mask on and off, kernels 1x1, 3x3 and 2x3, and random groups, offset groups, stride, dilation
and padding. The integer and border kinds pin the one-sided (from above) offset gradient at the kinks.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from parity import deform_conv_reference as ref
from parity.check_against_torchvision import (
    KERNELS,
    OFFSET_KINDS,
    QUANTITIES,
    definition_results,
    make_case,
    reference_results,
)

TOL = 1e-12
DRAWS = 3  # random geometries per (offset kind, mask, kernel)


def _assert_equal(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], name: str) -> None:
    assert got.keys() == expected.keys(), name
    for quantity in QUANTITIES:
        if quantity not in expected:
            continue
        value = expected[quantity]
        assert got[quantity].shape == value.shape, (name, quantity)
        diff = float(np.abs(got[quantity] - value).max(initial=0.0))
        assert diff <= TOL * max(1.0, float(np.abs(value).max(initial=0.0))), f"{name} {quantity}: {diff:.3g}"


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"{k[0]}x{k[1]}")
@pytest.mark.parametrize("use_mask", [False, True], ids=["v1", "v2-mask"])
@pytest.mark.parametrize("offsets", OFFSET_KINDS)
def test_definition_equals_torchvision_kernel(offsets: str, use_mask: bool, kernel: tuple[int, int]) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{offsets} {use_mask} {kernel}".encode()))
    for _ in range(DRAWS):
        kh, kw = kernel
        half = bool(rng.random() < 0.5)
        case = make_case(
            rng,
            groups=int(rng.choice([1, 2])),
            offset_groups=int(rng.choice([1, 2, 4])),
            stride=(int(rng.integers(1, 3)), int(rng.integers(1, 3))),
            dilation=(int(rng.integers(1, 3)), int(rng.integers(1, 3))),
            padding=(kh // 2, kw // 2) if half else (int(rng.integers(0, 2)), int(rng.integers(0, 2))),
            kernel=kernel,
            use_mask=use_mask,
            offsets=offsets,
            max_batch=2,
        )
        _assert_equal(definition_results(case), reference_results(case), case.name)


def test_border_semantics_of_the_kernel() -> None:
    """The kernel's choices at the border, as torchvision computes them (values recorded from torchvision 0.28.0):
    a 1x1 kernel sampling a 4x4 image ``1..16`` at one point. At ``y == -1`` the value is 0 (``bilinear_interpolate``
    returns 0 for ``y <= -1``) but the y-gradient is row 0's (``get_coordinate_weight`` has no border test); at
    ``y == H - 1`` it is the outward difference; at ``y == H`` it is 0."""
    height = width = 4
    x = np.arange(1.0, 17.0).reshape(1, 1, height, width)
    weight = np.ones((1, 1, 1, 1))
    grad_out = np.zeros((1, 1, height, width))
    grad_out[0, 0, 0, 0] = 1.0
    cases = {  # (y, x) sampled by output (0, 0): (value, d/d offset_y, d/d offset_x)
        (-1.0, 1.5): (0.0, 2.5, 0.0),
        (-1.5, 1.5): (0.0, 0.0, 0.0),
        (3.0, 1.5): (14.5, -14.5, 1.0),
        (4.0, 1.5): (0.0, 0.0, 0.0),
        (2.0, 1.5): (10.5, 4.0, 1.0),
        (1.5, -1.0): (0.0, 0.0, 7.0),
        (1.5, 0.0): (7.0, 4.0, 1.0),
        (1.5, 3.0): (10.0, 4.0, -10.0),
        (-1.0, -1.0): (0.0, 0.0, 0.0),
    }
    for (py, px), (value, dy, dx) in cases.items():
        offset = np.zeros((1, 2, height, width))
        offset[0, :, 0, 0] = py, px
        out = ref.deform_conv2d_forward(x, offset, weight)
        grad_offset = ref.deform_conv2d_backward(grad_out, x, offset, weight)[2]
        assert out[0, 0, 0, 0] == value, (py, px)
        assert tuple(grad_offset[0, :, 0, 0]) == (dy, dx), (py, px)
