"""jdynconv.deform_conv against the float64 N-d definition (``tests/deform_reference.py``), under ``jax.jit``.

Forward and the gradients w.r.t. inputs, offsets, mask, kernel and bias (``jax.vjp`` with a random cotangent), in
1-D, 2-D and 3-D, with weight groups and offset groups, stride 2, dilation, padding 0 / ``k // 2`` / asymmetric
pairs / ``"SAME"``, mask on and off, and sampling positions drawn from four kinds (see :func:`_targets`):
fractional, exactly on integers, exactly on the border (``-1``, ``0``, ``S - 1``, ``S``) and outside the input.

Tolerances are bounds, elementwise, derived from the arithmetic (:func:`_roundings`): every entry of every
quantity is a sum of products, ``sum_j prod_i a_ij``; computed in floating point with unit roundoff ``u``, each
term passes through at most ``n`` roundings, so the error is at most ``gamma_n * sum_j |prod_i a_ij|`` with
``gamma_n = n u / (1 - n u)`` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., 3.1 and 4.2),
whatever the order of the sums. The sums of absolute terms (:func:`_magnitudes`) come from the definition itself
called with ``|x|, |kernel|, |mask|, |bias|, |cotangent|`` (every corner weight is >= 0, so that is exactly
``sum_j |term_j|``), except for the offsets, whose corner terms carry signs (see :func:`_magnitudes`). The
reference, in float64, is held to the same bound with ``u = 2^-53``, so the test asserts ``|got - expected| <=
(n + SLACK) * (u + 2^-53) * magnitude``: about ``1e-14`` relative in float64, ``1e-6`` to ``1e-4`` in float32.

Sampling positions are part of that bound only when both sides compute them identically. In float64 they do:
``grid + offset`` is one float64 addition in jdynconv and in the reference. In float32 jdynconv rounds
``grid + offset`` once while the float64 reference does not; near an integer the rounded position can land on
the other side of it, where the other one-sided derivative applies (an O(1) change of the offset gradient, not
a rounding). So the float32 cases draw every position as a multiple of 1/8 (integers included) with ``|p| <
2^20``: exact in float32, the same floor on both sides, and the corner weights (products of at most three
multiples of 1/8) exact too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdynconv as jdc
from jdynconv import _deform
from tests import deform_reference as dr
from tests.helpers import equations

U64 = 2.0**-53  # float64's unit roundoff (round to nearest): the reference's
UNIT_ROUNDOFF = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float64): U64}
# Added to every rounding count: the bias add, the exact-but-counted multiplications by +-1 and the partial
# products of the autodiff of a corner weight; a few roundings more than counted cannot hide an O(1) error.
SLACK = 8
QUANTITIES = ("output", "inputs", "offsets", "kernel", "bias", "mask")


@dataclasses.dataclass(frozen=True)
class Case:
    """One deformable convolution, channels-first shapes (torchvision's layout)."""

    name: str
    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    padding: Any  # as jdynconv takes it
    dilation: tuple[int, ...]
    groups: int
    offset_groups: int
    in_channels: int
    out_channels: int
    mask: bool
    bias: bool
    batch: int = 2

    @property
    def n(self) -> int:
        return len(self.spatial)

    @property
    def taps(self) -> int:
        return math.prod(self.kernel)

    @property
    def pads(self) -> tuple[tuple[int, int], ...]:
        """Explicit ``(low, high)`` pairs, resolved here independently of jdynconv (``"SAME"`` as ``jax.lax``:
        output ``ceil(size / stride)``, the odd extra pad at the end)."""
        if self.padding == "SAME":
            pads = []
            for size, k, s, d in zip(self.spatial, self.kernel, self.strides, self.dilation, strict=True):
                total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
                pads.append((total // 2, total - total // 2))
            return tuple(pads)
        if isinstance(self.padding, int):
            return ((self.padding, self.padding),) * self.n
        return tuple((p, p) if isinstance(p, int) else tuple(p) for p in self.padding)

    @property
    def out_spatial(self) -> tuple[int, ...]:
        return tuple(
            (s + lo + hi - d * (k - 1) - 1) // st + 1
            for s, (lo, hi), d, k, st in zip(
                self.spatial, self.pads, self.dilation, self.kernel, self.strides, strict=True
            )
        )

    @property
    def geometry(self) -> dict[str, Any]:
        return {"strides": self.strides, "padding": self.pads, "dilation": self.dilation}


# float64: every feature, generic (non-dyadic) fractional positions among the integers and the border.
CASES_F64 = [
    Case("1d_groups_stride2_asym_pad_dilated", (11,), (3,), (2,), ((1, 2),), (2,), 2, 2, 4, 4, True, True),
    Case("2d_pairs_stride_dilation", (6, 5), (3, 2), (2, 1), ((2, 0), (0, 1)), (1, 2), 1, 2, 4, 6, True, False),
    Case("3d_same_groups_nomask", (4, 3, 4), (2, 2, 3), (1, 2, 1), "SAME", (1, 1, 2), 2, 2, 4, 4, False, True),
]
# float32: positions on multiples of 1/8 (see the module doc).
CASES_F32 = [
    Case("1d_pad0_stride2_dilated_mask", (13,), (3,), (2,), 0, (2,), 1, 2, 4, 3, True, True),
    Case("2d_half_pad_groups_nomask", (5, 6), (3, 3), (1, 1), 1, (1, 1), 2, 1, 4, 4, False, True),
]


def _grid(case: Case) -> np.ndarray:
    """Undeformed positions ``(K, N, *out_spatial)``: ``o * stride - pad_low + t * dilation``, taps row-major."""
    taps = np.array(list(np.ndindex(*case.kernel)))  # (K, N)
    axes = [np.arange(o) * s - lo for o, s, (lo, _) in zip(case.out_spatial, case.strides, case.pads, strict=True)]
    outs = np.stack(np.meshgrid(*axes, indexing="ij"))  # (N, *out)
    tap_offsets = (taps * np.array(case.dilation)).reshape(case.taps, case.n, *(1,) * case.n)
    return outs[None] + tap_offsets


def _targets(case: Case, rng: np.random.Generator, dyadic: bool) -> np.ndarray:
    """Sampling positions ``(B, G_off, K, N, *out)``, each coordinate drawn from one of four kinds:
    fractional in ``[-1.5, S + 0.5]``, an integer in ``[-2, S + 1]``, exactly on the border ``{-1, 0, S - 1, S}``
    (value 0 at -1 and S, one-sided derivatives), or far outside (``S + 2`` to ``S + 6`` away). ``dyadic``
    rounds the fractional and outside ones to multiples of 1/8."""
    shape = (case.batch, case.offset_groups, case.taps, case.n, *case.out_spatial)
    size = np.array(case.spatial).reshape(1, 1, 1, case.n, *(1,) * case.n)
    fractional = rng.uniform(-1.5, size + 0.5, shape)
    integer = rng.integers(-2, size + 2, shape).astype(np.float64)
    border = np.choose(rng.integers(0, 4, shape), [-1.0, 0.0, size - 1.0, size + 0.0])
    distance = rng.uniform(2.0, 6.0, shape)
    outside = np.where(rng.random(shape) < 0.5, -1.0 - distance, size + distance)
    if dyadic:
        fractional, outside = np.round(fractional * 8) / 8, np.round(outside * 8) / 8
    kind = rng.choice(4, size=shape, p=[0.35, 0.2, 0.3, 0.15])
    return np.choose(kind, [fractional, integer, border, outside])


def _problem(case: Case, dtype: type) -> dict[str, np.ndarray | None]:
    """Random operands (channels-first) in ``dtype``; the float64 reference reads the same rounded numbers."""
    rng = np.random.default_rng([*map(ord, case.name)])
    dyadic = np.dtype(dtype) == np.float32
    targets = _targets(case, rng, dyadic)
    offsets = (targets - _grid(case)[None, None]).reshape(
        case.batch, case.offset_groups * case.taps * case.n, *case.out_spatial
    )
    mask_shape = (case.batch, case.offset_groups * case.taps, *case.out_spatial)
    arrays = {
        "inputs": rng.normal(size=(case.batch, case.in_channels, *case.spatial)),
        "offsets": offsets,
        "kernel": rng.normal(size=(case.out_channels, case.in_channels // case.groups, *case.kernel)),
        "bias": rng.normal(size=case.out_channels) if case.bias else None,
        "mask": rng.uniform(-0.5, 1.5, mask_shape) if case.mask else None,
        "cotangent": rng.normal(size=(case.batch, case.out_channels, *case.out_spatial)),
    }
    arrays = {k: None if v is None else v.astype(dtype) for k, v in arrays.items()}
    if dyadic:  # exact in float32: the targets, hence the positions, are what the definition sees
        assert np.array_equal(arrays["offsets"].astype(np.float64), offsets)
    return arrays


@functools.cache
def _value_and_grads(case: Case, data_format: str):
    """One jitted function per configuration: the output and the VJP of ``cotangent`` w.r.t. every argument."""

    def call(inputs, offsets, kernel, bias, mask):
        return jdc.deform_conv(
            inputs,
            offsets,
            kernel,
            bias,
            mask=mask,
            strides=case.strides,
            padding=case.padding,
            kernel_dilation=case.dilation,
            feature_group_count=case.groups,
            data_format=data_format,
            precision=jax.lax.Precision.HIGHEST,  # full float32 products on any backend
        )

    def value_and_grads(inputs, offsets, kernel, bias, mask, cotangent):
        out, vjp = jax.vjp(call, inputs, offsets, kernel, bias, mask)
        grads = vjp(cotangent)
        return dict(zip(QUANTITIES, (out, *grads[:3], *grads[3:]), strict=True))

    return jax.jit(value_and_grads)


def _args(p: dict) -> tuple:
    return p["inputs"], p["offsets"], p["kernel"], p["bias"], p["mask"], p["cotangent"]


def _expected(case: Case, p: dict) -> dict[str, np.ndarray | None]:
    f64 = {k: None if v is None else v.astype(np.float64) for k, v in p.items()}
    args = f64["inputs"], f64["offsets"], f64["kernel"], f64["bias"], f64["mask"]
    out = dr.deform_conv(*args, **case.geometry)
    g_x, g_off, g_mask, g_w, g_b = dr.deform_conv_vjp(*args, f64["cotangent"], **case.geometry)
    return {"output": out, "inputs": g_x, "offsets": g_off, "kernel": g_w, "bias": g_b, "mask": g_mask}


def _magnitudes(case: Case, p: dict) -> dict[str, np.ndarray | None]:
    """``sum_j |term_j|`` for every entry of every quantity (see the module doc).

    Offsets: the gradient w.r.t. coordinate ``i`` of a position is ``mask * sum_e (+-prod_{j != i} w_j(e)) *
    sum_c x_e[c] * gcol[c]`` over the corners ``e`` (``gcol = sum_f kernel * cotangent``), the sign + for
    ``e_i = 1``. Its sum of absolute terms, ``|mask| * sum_e prod_{j != i} w_j(e) * sum_c |x_e[c]| |gcol|[c]``,
    is the definition's mask gradient (taken with ``|x|``, ``|kernel|``, ``|cotangent|`` and a mask of ones)
    at the position moved along ``i`` to ``floor(p_i)``, plus the same at ``floor(p_i) + 1``: those two samples
    weight the corners ``e_i = 0`` and ``e_i = 1`` each by ``prod_{j != i} w_j(e)``.
    """
    f64 = {k: None if v is None else np.abs(v.astype(np.float64)) for k, v in p.items()}
    offsets = p["offsets"].astype(np.float64)
    args = f64["inputs"], offsets, f64["kernel"], f64["bias"], f64["mask"]
    out = dr.deform_conv(*args, **case.geometry)
    g_x, _, g_mask, g_w, g_b = dr.deform_conv_vjp(*args, f64["cotangent"], **case.geometry)

    grid = _grid(case)[None, None]
    split = (case.batch, case.offset_groups, case.taps, case.n, *case.out_spatial)
    positions = grid + offsets.reshape(split)
    ones = np.ones((case.batch, case.offset_groups * case.taps, *case.out_spatial))
    g_off = np.zeros(split)
    for i in range(case.n):
        for step in (0.0, 1.0):
            moved = positions.copy()
            moved[:, :, :, i] = np.floor(positions[:, :, :, i]) + step
            at = (moved - grid).reshape(offsets.shape)
            sampled = dr.deform_conv_vjp(
                f64["inputs"], at, f64["kernel"], None, ones, f64["cotangent"], **case.geometry
            )[2]
            g_off[:, :, :, i] += sampled.reshape(split[:3] + split[4:])
    if case.mask:
        g_off = g_off * f64["mask"].reshape((*split[:3], 1, *split[4:]))
    g_off = g_off.reshape(offsets.shape)
    return {"output": out, "inputs": g_x, "offsets": g_off, "kernel": g_w, "bias": g_b, "mask": g_mask}


def _roundings(case: Case) -> dict[str, int]:
    """The most roundings one term of each quantity passes through in jdynconv's arithmetic (``n`` of
    ``gamma_n``; the float64 reference's count is no larger):

    * output: mask times corner weight (1), the corner sum (2^N products and additions), the contraction
      with the kernel over ``K * C_in / G`` products and additions;
    * inputs: ``gcol = sum_f kernel * cotangent`` over ``C_out / G`` filters, times mask and corner weight
      (2), then the scatter-add of at most ``O * K * 2^N`` updates into one pixel (``O`` output positions);
    * kernel: a column's own roundings (2^N + 1), then the sum over the batch and the ``O`` positions;
    * bias: the sum of ``B * O`` cotangents;
    * mask, offsets: ``gcol`` (``C_out / G``), its dot product with a corner's ``C_in / G_off`` channels, the
      corner weight's ``N`` factors and the sum over the ``2^N`` corners, and the mask (1).
    """
    corners = 2**case.n
    out = math.prod(case.out_spatial)
    per_filter_group = case.out_channels // case.groups
    per_offset_group = case.in_channels // case.offset_groups
    return {
        "output": 1 + corners + case.taps * (case.in_channels // case.groups),
        "inputs": per_filter_group + 2 + out * case.taps * corners,
        "kernel": corners + 1 + case.batch * out,
        "bias": case.batch * out,
        "mask": per_filter_group + per_offset_group + case.n + corners,
        "offsets": per_filter_group + per_offset_group + case.n + corners + 1,
    }


def _assert_within_bound(case: Case, p: dict, got: dict, dtype: type) -> None:
    expected, magnitudes, counts = _expected(case, p), _magnitudes(case, p), _roundings(case)
    u = UNIT_ROUNDOFF[np.dtype(dtype)]
    for quantity in QUANTITIES:
        if expected[quantity] is None:
            assert got[quantity] is None, quantity
            continue
        actual = np.asarray(got[quantity])
        assert actual.dtype == dtype, (quantity, actual.dtype)
        assert actual.shape == expected[quantity].shape, (quantity, actual.shape, expected[quantity].shape)
        bound = (counts[quantity] + SLACK) * (u + U64) * magnitudes[quantity]
        excess = np.abs(actual.astype(np.float64) - expected[quantity]) - bound
        worst = np.unravel_index(np.argmax(excess), excess.shape)
        assert excess[worst] <= 0, (
            f"{case.name} {quantity}{worst}: got {actual[worst]!r}, expected {expected[quantity][worst]!r}, "
            f"bound {bound[worst]:.3g} (n = {counts[quantity]} + {SLACK}, magnitude {magnitudes[quantity][worst]:.3g})"
        )


@pytest.mark.parametrize("case", CASES_F64, ids=lambda c: c.name)
def test_float64_matches_definition(case: Case) -> None:
    with jax.enable_x64(True):
        p = _problem(case, np.float64)
        got = _value_and_grads(case, "channels_first")(*_args(p))
        got = jax.tree.map(np.asarray, got)
    _assert_within_bound(case, p, got, np.float64)


@pytest.mark.parametrize("case", CASES_F32, ids=lambda c: c.name)
def test_float32_matches_definition(case: Case) -> None:
    p = _problem(case, np.float32)
    got = _value_and_grads(case, "channels_first")(*_args(p))
    _assert_within_bound(case, p, got, np.float32)


def test_positions_cover_the_integers_and_the_border() -> None:
    """The positions the cases sample hold what the module doc promises (else the one-sided derivatives at the
    integers and the border would go untested): integers, every border value, far outside, fractions inside."""
    for case, dtype in [(c, np.float64) for c in CASES_F64] + [(c, np.float32) for c in CASES_F32]:
        offsets = _problem(case, dtype)["offsets"].astype(np.float64)
        split = (case.batch, case.offset_groups, case.taps, case.n, *case.out_spatial)
        positions = _grid(case)[None, None] + offsets.reshape(split)
        size = np.array(case.spatial).reshape(1, 1, 1, case.n, *(1,) * case.n)
        whole = positions == np.round(positions)
        assert whole.mean() > 0.3, case.name
        for edge in (-1.0, 0.0, size - 1.0, size + 0.0):
            assert np.any(positions == edge), (case.name, "border")
        assert np.any((positions < -2) | (positions > size + 1)), (case.name, "outside")
        assert np.any(~whole & (positions > 0) & (positions < size - 1)), (case.name, "fractional inside")
        if dtype == np.float32:
            assert np.array_equal(positions * 8, np.round(positions * 8)), case.name


def _to_last(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else np.moveaxis(a, 1, -1)


def test_channels_last_is_channels_first_transposed_exactly() -> None:
    """The same numbers in Flax's layout: the output and every gradient equal bit for bit after transposing."""
    case = CASES_F32[0]
    p = _problem(case, np.float32)
    first = _value_and_grads(case, "channels_first")(*_args(p))
    kernel_last = np.moveaxis(p["kernel"], (0, 1), (-1, -2))  # (F, C/G, *k) -> (*k, C/G, F)
    last = _value_and_grads(case, "channels_last")(
        _to_last(p["inputs"]), _to_last(p["offsets"]), kernel_last, p["bias"], _to_last(p["mask"]),
        _to_last(p["cotangent"]),
    )  # fmt: skip
    for quantity in ("output", "inputs", "offsets", "mask"):
        np.testing.assert_array_equal(np.moveaxis(np.asarray(last[quantity]), -1, 1), first[quantity], quantity)
    np.testing.assert_array_equal(np.moveaxis(np.asarray(last["kernel"]), (-1, -2), (0, 1)), first["kernel"])
    np.testing.assert_array_equal(last["bias"], first["bias"])


def test_zero_offsets_without_mask_is_lax_conv() -> None:
    """Zero offsets, no mask: ``jax.lax.conv_general_dilated`` (plus bias), forward and gradients, float64, on the
    3-D case: ``"SAME"`` with even kernel sizes (asymmetric pads), stride 2, dilation 2 and groups. Both sides sum
    the same products in different orders (the deformable side's corner weights are exactly 1 and 0). Bound:
    ``gamma_n`` of both sides, ``n`` the largest count of :func:`_roundings`, times the sums of absolute terms
    (the conv and its VJP taken with absolute values)."""
    case = CASES_F64[2]

    def conv(x, w, b):
        y = jax.lax.conv_general_dilated(
            x, w, case.strides, case.pads, rhs_dilation=case.dilation, dimension_numbers=("NCDHW", "OIDHW", "NCDHW"),
            feature_group_count=case.groups, precision=jax.lax.Precision.HIGHEST,
        )  # fmt: skip
        return y + b.reshape(1, -1, 1, 1, 1)

    @jax.jit
    def lax_and_magnitude(x, w, b, ct):
        out, vjp = jax.vjp(conv, x, w, b)
        abs_out, abs_vjp = jax.vjp(conv, jnp.abs(x), jnp.abs(w), jnp.abs(b))
        names = ("output", "inputs", "kernel", "bias")
        values = dict(zip(names, (out, *vjp(ct)), strict=True))
        return values, dict(zip(names, (abs_out, *abs_vjp(jnp.abs(ct))), strict=True))

    with jax.enable_x64(True):
        p = _problem(case, np.float64)
        p["offsets"] = np.zeros_like(p["offsets"])
        deform = jax.tree.map(np.asarray, _value_and_grads(case, "channels_first")(*_args(p)))
        lax, magnitude = jax.tree.map(
            np.asarray, lax_and_magnitude(p["inputs"], p["kernel"], p["bias"], p["cotangent"])
        )
    n = max(_roundings(case).values()) + SLACK
    for quantity in ("output", "inputs", "kernel", "bias"):
        assert deform[quantity].shape == lax[quantity].shape, quantity
        assert np.all(np.abs(deform[quantity] - lax[quantity]) <= n * 2 * U64 * magnitude[quantity]), quantity


def test_row_chunks_match_definition(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampled columns over ``COLUMN_BYTES`` are made and contracted a block of output rows at a time (and made
    again in the backward pass): forced here with a tiny limit, 3 blocks of 2 rows for 5 rows (the last block
    padded with rows that sample outside), the result holds the same bounds as the one-block computation."""
    case = CASES_F32[0]
    assert case.out_spatial == (5,)
    p = _problem(case, np.float32)
    column_bytes = case.batch * math.prod(case.out_spatial) * case.taps * case.in_channels * 4
    monkeypatch.setattr(_deform, "COLUMN_BYTES", column_bytes // 3 + 1)
    fn = _value_and_grads.__wrapped__(case, "channels_first")  # a fresh trace under the small limit
    assert equations("scan", fn, *_args(p)), "no loop over row blocks"
    _assert_within_bound(case, p, fn(*_args(p)), np.float32)


def test_empty_batch_gives_empty_output_and_gradients() -> None:
    case = dataclasses.replace(CASES_F32[0], name="1d_empty", batch=0)
    p = _problem(case, np.float32)
    got = _value_and_grads(case, "channels_first")(*_args(p))
    assert got["output"].shape == (0, case.out_channels, *case.out_spatial)
    for quantity in ("inputs", "offsets", "mask"):
        assert got[quantity].shape == p[quantity].shape, quantity
    for quantity in ("kernel", "bias"):
        np.testing.assert_array_equal(got[quantity], np.zeros_like(p[quantity]), quantity)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_other_float_dtypes_run_and_keep_their_dtype(dtype: str) -> None:
    """Half and double precision run under the suite's strict dtype promotion and return their own dtype. Every
    value here is exact in float16: ``x0 + x1 = 0, 3, 6, 9, 12`` read halfway to the next pixel (the last one
    halfway out of the input, where the missing neighbour counts 0)."""
    x = np.stack([np.arange(5.0), 2 * np.arange(5.0)])[None]  # (1, 2, 5)
    offsets = np.full((1, 1, 5), 0.5)
    kernel = np.ones((1, 2, 1))
    with jax.enable_x64(dtype == "float64"):
        args = [jnp.asarray(a, dtype) for a in (x, offsets, kernel)]
        out = jax.jit(lambda x, o, k: jdc.deform_conv(x, o, k, data_format="channels_first"))(*args)
        assert out.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(out, np.float64), [[[1.5, 4.5, 7.5, 10.5, 6.0]]])


def test_offset_gradient_on_the_border_is_the_one_from_above() -> None:
    """1-D, one channel, a 1-tap kernel, the docstring's border rule: at ``-1`` (value 0) the derivative from above
    reads the first pixel (``v[0] - 0``, torchvision's), at ``size - 1`` it is ``0 - v[size - 1]``, and at ``size``
    (value 0, both corners outside) it is 0."""
    signal = jnp.asarray([2.0, 3.0, 5.0, 8.0, 12.0]).reshape(1, 5, 1)

    def sampled(offsets: jax.Array) -> jax.Array:
        return jdc.deform_conv(signal, offsets, jnp.ones((1, 1, 1))).sum()

    grad = jax.jit(jax.grad(sampled))
    np.testing.assert_array_equal(grad(jnp.full((1, 5, 1), -1.0)).ravel(), [2.0, 1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(grad(jnp.full((1, 5, 1), 1.0)).ravel(), [2.0, 3.0, 4.0, -12.0, 0.0])


def test_forward_mode_only_through_kernel_and_bias() -> None:
    """The sampling is a ``jax.custom_vjp``: ``jax.jvp`` w.r.t. inputs, offsets or mask is JAX's TypeError, as the
    docstring says; w.r.t. the kernel and the bias (linear) it is the op itself, without and with only the bias."""
    rng = np.random.default_rng(0)
    args = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((1, 6, 2), (1, 4, 3), (1, 4, 3), (3, 2, 4), (4,))]

    def fn(inputs, offsets, mask, kernel, bias):
        return jdc.deform_conv(inputs, offsets, kernel, bias, mask=mask)

    for i in range(3):
        with pytest.raises(TypeError, match=r"can't apply forward-mode autodiff \(jvp\) to a custom_vjp function"):
            # Lowered only (JAX raises while lowering): nothing is compiled.
            jax.jit(
                lambda a, i=i: jax.jvp(lambda b: fn(*args[:i], b, *args[i + 1 :]), (a,), (jnp.ones_like(a),))
            ).lower(args[i])
    tangent_kernel, tangent_bias = jnp.ones_like(args[3]), jnp.ones_like(args[4])
    jitted = jax.jit(fn)
    along_kernel = jax.jit(lambda k, t: jax.jvp(lambda k: fn(*args[:3], k, args[4]), (k,), (t,))[1])(
        args[3], tangent_kernel
    )
    np.testing.assert_allclose(along_kernel, jitted(*args[:3], tangent_kernel, jnp.zeros_like(args[4])), rtol=1e-6)
    along_bias = jax.jit(lambda b, t: jax.jvp(lambda b: fn(*args[:4], b), (b,), (t,))[1])(args[4], tangent_bias)
    np.testing.assert_array_equal(along_bias, jnp.ones((1, 4, 4)))
