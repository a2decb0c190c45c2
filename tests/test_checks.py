"""The shared canonicalisers: every accepted padding form resolves to explicit (low, high) pairs."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jdynconv import _checks


def _pads(
    padding: Any,
    spatial: tuple[int, ...],
    kernel: tuple[int, ...],
    strides: tuple[int, ...] | None = None,
    dilation: tuple[int, ...] | None = None,
) -> tuple[tuple[int, int], ...]:
    n = len(spatial)
    return _checks.canonicalize_padding(
        padding,
        spatial_shape=spatial,
        kernel_size=kernel,
        strides=strides or (1,) * n,
        kernel_dilation=dilation or (1,) * n,
        input_dilation=(1,) * n,
    )


@pytest.mark.parametrize(
    ("padding", "expected"),
    [
        (2, ((2, 2), (2, 2))),
        ((1, 3), ((1, 1), (3, 3))),
        (((0, 1), 2), ((0, 1), (2, 2))),
        ([(1, 0), (0, 1)], ((1, 0), (0, 1))),
        (np.int64(1), ((1, 1), (1, 1))),
        ("valid", ((0, 0), (0, 0))),
    ],
)
def test_explicit_padding_forms(padding: Any, expected: tuple[tuple[int, int], ...]) -> None:
    assert _pads(padding, (8, 8), (3, 3)) == expected


@pytest.mark.parametrize("size", range(1, 12))
@pytest.mark.parametrize("kernel", [1, 2, 3, 4])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("dilation", [1, 2])
def test_same_equals_jax_lax(size: int, kernel: int, stride: int, dilation: int) -> None:
    effective = (kernel - 1) * dilation + 1
    expected = lax.padtype_to_pads((size,), (effective,), (stride,), "SAME")
    assert _pads("SAME", (size,), (kernel,), (stride,), (dilation,)) == tuple(map(tuple, expected))


def test_causal_pads_only_the_start() -> None:
    assert _pads("CAUSAL", (10,), (3,), dilation=(2,)) == ((4, 0),)


def test_canonicalize_ints() -> None:
    assert _checks.canonicalize_ints(2, 3, "strides") == (2, 2, 2)
    assert _checks.canonicalize_ints((1, np.int32(2)), 2, "strides") == (1, 2)
    with pytest.raises(TypeError, match="`strides` must be an int or a sequence of 2 ints, got True"):
        _checks.canonicalize_ints(True, 2, "strides")


def test_output_shape_matches_lax() -> None:
    pads = ((1, 2), (0, 0))
    got = _checks.conv_output_shape(
        (9, 7), (3, 2), strides=(2, 1), pads=pads, kernel_dilation=(1, 3), input_dilation=(2, 1)
    )
    x = np.zeros((1, 1, 9, 7), np.float32)
    w = np.zeros((1, 1, 3, 2), np.float32)
    expected = lax.conv_general_dilated(x, w, (2, 1), pads, lhs_dilation=(2, 1), rhs_dilation=(1, 3)).shape[2:]
    assert got == tuple(expected)


def test_temperature_must_be_a_scalar_even_when_traced() -> None:
    """A traced temperature's value cannot be checked, but its shape can: a (B,) array would broadcast into
    every attention's channel axis."""
    _checks.check_temperature(jnp.float32(0.5))
    jax.jit(lambda t: _checks.check_temperature(t) or t)(jnp.float32(2.0))
    with pytest.raises(ValueError, match=r"`temperature` must be a positive finite scalar, got shape \(4,\)"):
        jax.jit(lambda t: _checks.check_temperature(t) or t)(jnp.ones(4))
    with pytest.raises(ValueError, match=r"`temperature` must be a positive finite scalar, got -1.0"):
        _checks.check_temperature(-1.0)
