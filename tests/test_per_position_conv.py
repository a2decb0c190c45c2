"""jdynconv.per_position_conv against the float64 definition (``tests/per_position_reference.py``), under jax.jit.

Forward and the gradients w.r.t. inputs and kernels (``jax.vjp`` with a random cotangent), 1-D to 3-D, with groups,
strides, dilation and every padding form, channels-last and channels-first.

Bounds are derived from the arithmetic, elementwise: each quantity is a sum of ``n`` products (``n`` = the taps
``K`` for the output and the input gradient, the group's channels ``C / G`` for the kernel gradient), so computed
with unit roundoff ``u`` its error is at most ``gamma_{n+1} * sum |terms|`` whatever the summation order (Higham,
*Accuracy and Stability of Numerical Algorithms*, 2nd ed., 3.1); the sums of absolute terms come from the
definition called with absolute values. The float64 reference carries the same bound with ``u = 2^-53``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdynconv as jdc
from tests import per_position_reference as ref

U64 = 2.0**-53
UNIT_ROUNDOFF = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float64): U64}
SLACK = 4  # roundings beyond the n of the sum: the product itself and the casts; far below an O(1) error


@dataclasses.dataclass(frozen=True)
class Case:
    spatial: tuple[int, ...]
    kernel_size: tuple[int, ...]
    channels: int
    groups: int
    strides: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: Any  # as passed to per_position_conv
    pads: tuple[tuple[int, int], ...]  # the same, explicit

    @property
    def id(self) -> str:
        return (
            f"{len(self.spatial)}d-k{self.kernel_size}-s{self.strides}-d{self.dilation}-p{self.padding}-g{self.groups}"
        )

    @property
    def out_spatial(self) -> tuple[int, ...]:
        return tuple(
            (n + lo + hi - (k - 1) * d - 1) // s + 1
            for n, (lo, hi), k, s, d in zip(
                self.spatial, self.pads, self.kernel_size, self.strides, self.dilation, strict=True
            )
        )


CASES = [
    Case((9,), (3,), 4, 2, (1,), (1,), "CAUSAL", ((2, 0),)),  # causal; 2 channels a group: K reductions
    Case((11,), (4,), 6, 3, (1,), (2,), [(3, 3)], ((3, 3),)),  # even K, dilation
    # 16 channels a group: the 1-D kernel gradient's blocked products, three blocks of 32, the last one partial
    Case((70,), (5,), 32, 2, (1,), (1,), "SAME", ((2, 2),)),
    Case((8,), (31,), 4, 2, (1,), (1,), [(30, 0)], ((30, 0),)),  # causal K > T: blocked (32 + 30 <= 31 * 2)
    Case((10,), (3,), 4, 2, (2,), (1,), 1, ((1, 1),)),  # stride 2 (the per-tap kernel gradient)
    Case((7, 6), (3, 2), 6, 3, (2, 1), (1, 2), [(1, 1), (0, 2)], ((1, 1), (0, 2))),
    Case((7, 7), (3, 3), 32, 2, (2, 2), (1, 1), [(1, 1), (1, 1)], ((1, 1), (1, 1))),  # involution, odd size stride 2
    Case((5, 4), (1, 1), 4, 4, (1, 1), (1, 1), "VALID", ((0, 0), (0, 0))),
    Case((4, 5, 3), (2, 3, 1), 4, 1, (1, 2, 1), (1, 1, 1), [(1, 0), (1, 1), (0, 0)], ((1, 0), (1, 1), (0, 0))),
]


def _arrays(case: Case, dtype: Any, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, *case.spatial, case.channels)).astype(dtype)
    kernels = rng.standard_normal((2, *case.out_spatial, case.groups, *case.kernel_size)).astype(dtype)
    cotangent = rng.standard_normal((2, *case.out_spatial, case.channels)).astype(dtype)
    return x, kernels, cotangent


def _call(case: Case, data_format: str = "channels_last") -> Any:
    def fn(x: jax.Array, kernels: jax.Array) -> jax.Array:
        return jdc.per_position_conv(
            x,
            kernels,
            strides=case.strides,
            padding=case.padding,
            kernel_dilation=case.dilation,
            data_format=data_format,
        )

    return fn


def _assert_within(got: Any, expected: np.ndarray, magnitude: np.ndarray, terms: int, u: float, name: str) -> None:
    bound = (terms + SLACK) * (u + U64) * magnitude + 1e-300
    error = np.abs(np.asarray(got, np.float64) - expected)
    worst = np.unravel_index(np.argmax(error / bound), error.shape)
    assert np.all(error <= bound), f"{name}: error {error[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_forward_and_gradients_match_the_definition(case: Case, dtype: Any) -> None:
    x, kernels, cotangent = _arrays(case, dtype)
    geometry = (case.strides, case.pads, case.dilation)
    with jax.enable_x64(dtype == np.float64):
        out, vjp = jax.jit(lambda x, k: jax.vjp(_call(case), x, k))(x, kernels)
        grad_x, grad_kernels = jax.jit(vjp)(jnp.asarray(cotangent))
    expected = ref.forward(x, kernels, *geometry)
    magnitude = ref.forward(np.abs(x), np.abs(kernels), *geometry)
    expected_dx, expected_dk = ref.gradients(x, kernels, cotangent, *geometry)
    magnitude_dx, magnitude_dk = ref.gradients(np.abs(x), np.abs(kernels), np.abs(cotangent), *geometry)
    u = UNIT_ROUNDOFF[np.dtype(dtype)]
    taps = int(np.prod(case.kernel_size))
    assert out.dtype == dtype
    assert out.shape == expected.shape
    _assert_within(out, expected, magnitude, taps, u, "output")
    _assert_within(grad_x, expected_dx, magnitude_dx, taps, u, "d inputs")
    _assert_within(grad_kernels, expected_dk, magnitude_dk, case.channels // case.groups, u, "d kernels")


@pytest.mark.parametrize("case", CASES[1::3], ids=[c.id for c in CASES[1::3]])
def test_channels_first_is_the_same_numbers(case: Case) -> None:
    """``(B, C, *spatial)`` inputs and ``(B, G, *K, *out)`` kernels (involution's layout) give the channels-last
    result with the channel axis moved: the same function, bit for bit."""
    x, kernels, _ = _arrays(case, np.float32)
    n = len(case.spatial)
    kernels_first = np.transpose(kernels, (0, 1 + n, *range(2 + n, 2 + 2 * n), *range(1, 1 + n)))
    last = jax.jit(_call(case))(x, kernels)
    first = jax.jit(_call(case, "channels_first"))(np.moveaxis(x, -1, 1), kernels_first)
    np.testing.assert_array_equal(np.moveaxis(np.asarray(first), 1, -1), np.asarray(last))


def test_bfloat16_sums_in_float32() -> None:
    """bfloat16 in and out, the K products summed in float32: within one bfloat16 rounding of the exact result
    (plus the float32 sum's bound), where a bfloat16 accumulation of 31 taps would be several roundings off."""
    case = CASES[3]
    x, kernels, _ = _arrays(case, np.float32)
    x, kernels = (jnp.asarray(a, jnp.bfloat16) for a in (x, kernels))
    out = jax.jit(_call(case))(x, kernels)
    assert out.dtype == jnp.bfloat16
    x64, k64 = np.asarray(x, np.float64), np.asarray(kernels, np.float64)
    geometry = (case.strides, case.pads, case.dilation)
    expected = ref.forward(x64, k64, *geometry)
    bound = 2.0**-8 * np.abs(expected) + (31 + SLACK) * 2.0**-24 * ref.forward(np.abs(x64), np.abs(k64), *geometry)
    assert np.all(np.abs(np.asarray(out, np.float64) - expected) <= bound + 1e-30)


def test_empty_batch() -> None:
    out = jdc.per_position_conv(np.zeros((0, 5, 4), np.float32), np.zeros((0, 5, 2, 3), np.float32))
    assert out.shape == (0, 5, 4)


def test_forward_mode_is_refused() -> None:
    """The op is a ``jax.custom_vjp``: reverse mode only (as ``deform_conv``); jvp names the reason."""
    x, kernels, _ = _arrays(CASES[0], np.float32)
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(_call(CASES[0]), (x, kernels), (x, kernels))


def test_second_order_reverse() -> None:
    """grad of grad (the backward pass is itself differentiable): d/dx of |d out / d kernels|^2 against a
    central finite difference in float64."""
    case = CASES[0]
    x, kernels, cotangent = _arrays(case, np.float64)

    def inner(x: jax.Array) -> jax.Array:
        grad_k = jax.grad(lambda k: jnp.sum(_call(case)(x, k) * cotangent))(kernels)
        return jnp.sum(grad_k**2)

    with jax.enable_x64(True):
        inner = jax.jit(inner)
        grad = np.asarray(jax.jit(jax.grad(inner))(x))
        direction = np.random.default_rng(1).standard_normal(x.shape)
        eps = 1e-6
        numeric = (inner(x + eps * direction) - inner(x - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(np.sum(grad * direction), numeric, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kernels": np.zeros((2, 9, 3, 3), np.float32)}, ValueError, "divides the 4 channels"),
        ({"kernels": np.zeros((2, 8, 2, 3), np.float32)}, ValueError, "out_spatial \\(9,\\)"),
        ({"kernels": np.zeros((2, 9, 2, 3), np.float16)}, TypeError, "dtype of `inputs`"),
        ({"kernels": np.zeros((2, 9, 2), np.float32)}, ValueError, "`kernels` must have rank 4"),
        ({"inputs": np.zeros((2, 9, 4), np.int32)}, TypeError, "floating-point"),
        ({"data_format": "NCHW"}, ValueError, "`data_format`"),
        ({"strides": 0}, ValueError, "`strides`"),
        ({"padding": "FULL"}, ValueError, "`padding`"),
    ],
)
def test_errors_name_the_argument(kwargs: dict, error: type, match: str) -> None:
    arrays = {"inputs": np.zeros((2, 9, 4), np.float32), "kernels": np.zeros((2, 9, 2, 3), np.float32)}
    call = arrays | kwargs
    with pytest.raises(error, match=match):
        jdc.per_position_conv(call.pop("inputs"), call.pop("kernels"), **call)
