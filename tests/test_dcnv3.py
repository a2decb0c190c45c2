"""jdynconv.dcnv3 against a float64 NumPy computation written from its docstring, forward and gradients, under jit.

The definition (``jdynconv.dcnv3``'s docstring): output position ``o``, group ``g``, tap ``t`` with kernel index
``k_t`` read channel ``c`` of group ``g`` at ``o * strides + center - padding + offset_scale * (k_t *
kernel_dilation - center + offset[o, g, t])``, ``center = kernel_dilation * (kernel_size - 1) // 2``,
multilinearly with zeros outside the input, and sum the taps weighted by ``mask[o, g, t]``. Offsets hold the
coordinates last spatial dim first (``(dx, dy)``), the taps enumerate the kernel with the last spatial dim
slowest, and ``remove_center`` drops the centre tap. :func:`_definition` computes exactly that with NumPy, and
:func:`_vjp` its gradients analytically: linear in the input (a scatter of the corner weights) and in the mask
(the samples); w.r.t. an offset ``offset_scale`` times the derivative of the multilinear formula with the corners
held at ``floor(p)`` -- one-sided from above at an integer coordinate, including the border (the convention
``jdynconv.deform_conv`` documents, through the same sampling primitive).

Positions are drawn fractional, on integers, on the border (``-1, 0, S - 1, S``) and outside; with
``offset_scale`` 0.5 or 1 the integer ones are exact, and both sides compute ``origin + offset_scale * (tap +
offset)`` in that order in float64, so they agree on every floor and each side's one-sided derivative.

Tolerance, elementwise: ``|got - expected| <= 2 n 2^-53 * magnitude``, ``magnitude`` the same sums taken over
absolute values (:func:`_vjp` with ``absolute=True``), ``n`` the most roundings one term passes through
(:func:`_roundings`): the classical bound ``gamma_n sum |terms|`` of a sum of products, for each side.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdynconv as jdc

U64 = 2.0**-53
SLACK = 8  # roundings beyond the count: the +-1 factors, the autodiff of a corner weight's product


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    channels: int
    offset_scale: float
    remove_center: bool
    batch: int = 2

    @property
    def n(self) -> int:
        return len(self.spatial)

    @property
    def out_spatial(self) -> tuple[int, ...]:
        return tuple(
            (s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, p, d, k, st in zip(self.spatial, self.padding, self.dilation, self.kernel, self.strides, strict=True)
        )

    @property
    def taps(self) -> list[tuple[int, ...]]:
        """Kernel indices ``(k_0, ..., k_{N-1})`` in InternImage's order: the last spatial dim slowest."""
        taps = [tuple(reversed(index)) for index in itertools.product(*(range(k) for k in reversed(self.kernel)))]
        if self.remove_center:
            taps.remove(tuple((k - 1) // 2 for k in self.kernel))
        return taps


CASES = [
    Case("1d_stride2_pad_dilated_groups", (9,), (3,), (2,), (1,), (2,), 2, 4, 0.5, False),
    Case("2d_rect_kernel_remove_center", (6, 7), (3, 5), (1, 2), (1, 2), (2, 1), 3, 6, 1.0, True),
    Case("3d_remove_center_scale", (4, 3, 5), (3, 1, 3), (1, 1, 2), (1, 0, 1), (1, 1, 2), 1, 2, 0.75, True),
]


def _positions(case: Case, offsets: np.ndarray) -> np.ndarray:
    """``(B, *out, G, T, N)`` positions, coordinates in spatial-dim order, from offsets ``(B, *out, G * T * N)``
    whose coordinates run last dim first."""
    taps = case.taps
    offsets = offsets.reshape(case.batch, *case.out_spatial, case.groups, len(taps), case.n)[..., ::-1]
    centers = [d * (k - 1) // 2 for k, d in zip(case.kernel, case.dilation, strict=True)]
    positions = np.empty(offsets.shape)
    for i in range(case.n):
        shape = [1] * case.n
        shape[i] = case.out_spatial[i]
        origin = (np.arange(case.out_spatial[i]) * case.strides[i] + centers[i] - case.padding[i]).reshape(shape)
        tap = np.array([k[i] * case.dilation[i] - centers[i] for k in taps], np.float64)
        local = tap + offsets[..., i]  # (B, *out, G, T)
        positions[..., i] = origin[(None, ..., None, None)] + case.offset_scale * local
    return positions


def _corners(case: Case, positions: np.ndarray):
    """Per corner ``e`` of ``{0, 1}^N``: ``(e, index tuple into x (B, *S, G, Cg), valid, per-dim weights)``."""
    low = np.floor(positions)
    frac = positions - low
    low = low.astype(np.int64)
    size = np.array(case.spatial)
    b = np.arange(case.batch).reshape(-1, *(1,) * (positions.ndim - 2))
    g = np.arange(case.groups).reshape(case.groups, 1)
    for bits in itertools.product((0, 1), repeat=case.n):
        index = low + np.array(bits)
        valid = np.all((index >= 0) & (index < size), axis=-1)
        clipped = np.clip(index, 0, size - 1)
        weights = np.where(np.array(bits) == 1, frac, 1 - frac)
        yield bits, (b, *(clipped[..., i] for i in range(case.n)), g), valid, weights


def _definition(case: Case, x: np.ndarray, offsets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The forward, ``(B, *out, C)``."""
    grouped = x.reshape(*x.shape[:-1], case.groups, -1)
    positions = _positions(case, offsets)
    mask = mask.reshape(*positions.shape[:-1])
    out = 0.0
    for _, index, valid, weights in _corners(case, positions):
        out = out + (mask * valid * np.prod(weights, axis=-1))[..., None] * grouped[index]  # (B, *out, G, T, Cg)
    return out.sum(axis=-2).reshape(case.batch, *case.out_spatial, case.channels)


def _vjp(
    case: Case, x: np.ndarray, offsets: np.ndarray, mask: np.ndarray, cotangent: np.ndarray, *, absolute: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``sum(_definition(...) * cotangent)`` w.r.t. ``(x, offsets, mask)``; with ``absolute``, the
    same sums over the terms' absolute values (every ``x``, mask and cotangent entry taken absolute and each
    corner's sign in the position derivative +1): the magnitudes of the error bound."""
    fix = np.abs if absolute else (lambda a: a)
    grouped = fix(x.reshape(*x.shape[:-1], case.groups, -1))
    positions = _positions(case, offsets)
    mask = fix(mask.reshape(*positions.shape[:-1]))
    ct = fix(cotangent.reshape(case.batch, *case.out_spatial, case.groups, 1, -1))  # (B, *out, G, 1, Cg)
    grad_x = np.zeros(grouped.shape)
    grad_mask = 0.0
    grad_positions = np.zeros(positions.shape)
    for bits, index, valid, weights in _corners(case, positions):
        corner = np.prod(weights, axis=-1) * valid
        values = grouped[index]  # (B, *out, G, T, Cg)
        np.add.at(grad_x, index, (mask * corner)[..., None] * ct)
        grad_mask = grad_mask + corner * np.sum(ct * values, axis=-1)
        dot = mask * valid * np.sum(ct * values, axis=-1)
        for i in range(case.n):
            others = np.prod(np.delete(weights, i, axis=-1), axis=-1)
            sign = 1.0 if bits[i] or absolute else -1.0
            grad_positions[..., i] += sign * others * dot
    grad_offsets = case.offset_scale * grad_positions[..., ::-1]
    return (
        grad_x.reshape(x.shape),
        grad_offsets.reshape(offsets.shape),
        grad_mask.reshape(case.batch, *case.out_spatial, -1),
    )


def _roundings(case: Case) -> dict[str, int]:
    """Most roundings of one term: output, the mask times the ``N``-factor corner weight then the sum over ``T``
    taps' ``2^N`` corners; inputs, a scatter-add of at most ``O * T * 2^N`` updates into one pixel; mask, the
    ``Cg``-channel dot products and the ``2^N`` corner sum; offsets, the same, times the mask and the scale."""
    taps, corners, per_group = len(case.taps), 2**case.n, case.channels // case.groups
    return {
        "output": taps * corners + case.n + 1,
        "inputs": math.prod(case.out_spatial) * taps * corners + case.n + 1,
        "mask": per_group + corners + case.n,
        "offsets": per_group + corners + case.n + 2,
    }


def _problem(case: Case) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([7, *map(ord, case.name)])
    taps = len(case.taps)
    shape = (case.batch, *case.out_spatial, case.groups, taps, case.n)
    size = np.array(case.spatial)
    kind = rng.choice(4, size=shape, p=[0.4, 0.25, 0.2, 0.15])
    distance = rng.uniform(2.0, 6.0, shape)
    targets = np.choose(
        kind,
        [
            rng.uniform(-1.5, size + 0.5, shape),  # fractional
            rng.integers(-2, size + 2, shape).astype(np.float64),  # on an integer
            np.choose(rng.integers(0, 4, shape), [-1.0, 0.0, size - 1.0, size + 0.0]),  # on the border
            np.where(rng.random(shape) < 0.5, -1.0 - distance, size + distance),  # outside
        ],
    )
    zero = np.zeros((case.batch, *case.out_spatial, case.groups * taps * case.n))
    regular = _positions(case, zero)  # offset 0: origin + scale * tap
    offsets = ((targets - regular) / case.offset_scale)[..., ::-1].reshape(zero.shape)
    return {
        "inputs": rng.normal(size=(case.batch, *case.spatial, case.channels)),
        "offsets": offsets,
        "mask": rng.uniform(-0.5, 1.5, (case.batch, *case.out_spatial, case.groups * taps)),
        "cotangent": rng.normal(size=(case.batch, *case.out_spatial, case.channels)),
    }


@functools.cache
def _value_and_grads(case: Case):
    def value_and_grads(inputs, offsets, mask, cotangent):
        def call(inputs, offsets, mask):
            return jdc.dcnv3(
                inputs, offsets, mask, kernel_size=case.kernel, strides=case.strides, padding=case.padding,
                kernel_dilation=case.dilation, groups=case.groups, offset_scale=case.offset_scale,
                remove_center=case.remove_center,
            )  # fmt: skip

        out, vjp = jax.vjp(call, inputs, offsets, mask)
        return dict(zip(("output", "inputs", "offsets", "mask"), (out, *vjp(cotangent)), strict=True))

    return jax.jit(value_and_grads)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_definition(case: Case) -> None:
    p = _problem(case)
    with jax.enable_x64(True):
        got = jax.tree.map(np.asarray, _value_and_grads(case)(p["inputs"], p["offsets"], p["mask"], p["cotangent"]))
    args = p["inputs"], p["offsets"], p["mask"]
    expected = dict(zip(("inputs", "offsets", "mask"), _vjp(case, *args, p["cotangent"]), strict=True))
    expected["output"] = _definition(case, *args)
    magnitude = dict(zip(("inputs", "offsets", "mask"), _vjp(case, *args, p["cotangent"], absolute=True), strict=True))
    magnitude["output"] = _definition(case, np.abs(p["inputs"]), p["offsets"], np.abs(p["mask"]))
    counts = _roundings(case)
    for quantity, value in expected.items():
        actual = got[quantity]
        assert actual.dtype == np.float64, (quantity, actual.dtype)
        assert actual.shape == value.shape, (quantity, actual.shape)
        bound = (counts[quantity] + SLACK) * 2 * U64 * magnitude[quantity]
        excess = np.abs(actual - value) - bound
        worst = np.unravel_index(np.argmax(excess), excess.shape)
        assert excess[worst] <= 0, f"{quantity}{worst}: got {actual[worst]!r}, expected {value[worst]!r}"


def test_definition_positions_cover_the_kinks() -> None:
    """The positions the cases sample hold integers (exactly: offset_scale 0.5 and 1), the border and outside."""
    for case in CASES:
        positions = _positions(case, _problem(case)["offsets"])
        size = np.array(case.spatial)
        whole = positions == np.round(positions)
        assert whole.mean() > (0.3 if case.offset_scale in (0.5, 1.0) else 0.0), case.name
        assert np.any(positions < -2), case.name
        assert np.any(positions > size + 1), case.name
        if case.offset_scale in (0.5, 1.0):
            for edge in (-1.0, 0.0):
                assert np.any(positions == edge), case.name
            assert np.any(positions == size - 1), case.name
            assert np.any(positions == size), case.name


def test_vjp_definition_matches_central_differences() -> None:
    """The NumPy gradients themselves, against central differences of the NumPy forward along random directions,
    at positions moved off the integers (the function is smooth there). Linear in inputs and mask (step 1:
    exact up to rounding); in the offsets a polynomial of degree <= N within a cell (step 1e-6)."""
    case = CASES[1]
    p = _problem(case)
    positions = _positions(case, p["offsets"])
    nudged = np.where(np.abs(positions - np.round(positions)) < 0.05, 0.37, 0.0)  # off the kinks by >= 0.32
    p["offsets"] = p["offsets"] + (nudged / case.offset_scale)[..., ::-1].reshape(p["offsets"].shape)
    moved = _positions(case, p["offsets"])
    assert np.all(np.abs(moved - np.round(moved)) > 0.05)
    analytic_grads = _vjp(case, p["inputs"], p["offsets"], p["mask"], p["cotangent"])
    grads = dict(zip(("inputs", "offsets", "mask"), analytic_grads, strict=True))
    rng = np.random.default_rng(3)

    def loss(**changes: np.ndarray) -> float:
        args = {k: p[k] for k in ("inputs", "offsets", "mask")} | changes
        return float(np.sum(_definition(case, **{"x": args["inputs"], "offsets": args["offsets"],
                                                 "mask": args["mask"]}) * p["cotangent"]))  # fmt: skip

    for name, h in (("inputs", 1.0), ("mask", 1.0), ("offsets", 1e-6)):
        for _ in range(3):
            v = rng.normal(size=p[name].shape)
            numeric = (loss(**{name: p[name] + h * v}) - loss(**{name: p[name] - h * v})) / (2 * h)
            analytic = float(np.sum(grads[name] * v))
            assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(analytic)), (name, numeric, analytic)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_other_float_dtypes_run_and_keep_their_dtype(dtype: str) -> None:
    """Half and double precision run under the suite's strict dtype promotion and return their own dtype; every
    value is exact in float16: each pixel read halfway to the next (the last halfway out of the input)."""
    x = np.stack([np.arange(5.0), 2 * np.arange(5.0)], axis=-1)[None]  # (1, 5, 2)
    offsets = np.full((1, 5, 1), 0.5)
    mask = np.ones((1, 5, 1))
    with jax.enable_x64(dtype == "float64"):
        args = [jnp.asarray(a, dtype) for a in (x, offsets, mask)]
        out = jax.jit(lambda x, o, m: jdc.dcnv3(x, o, m, kernel_size=1))(*args)
        assert out.dtype == jnp.dtype(dtype)
        expected = np.stack([[0.5, 1.5, 2.5, 3.5, 2.0], [1.0, 3.0, 5.0, 7.0, 4.0]], axis=-1)[None]
        np.testing.assert_array_equal(np.asarray(out, np.float64), expected)


def test_forward_mode_is_a_type_error() -> None:
    """The sampling is a ``jax.custom_vjp``: ``jax.jvp`` w.r.t. inputs, offsets or mask is JAX's TypeError, as the
    docstring says (reverse mode is what the tests above check)."""
    rng = np.random.default_rng(0)
    args = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((1, 5, 2), (1, 5, 3), (1, 5, 3))]

    def fn(inputs, offsets, mask):
        return jdc.dcnv3(inputs, offsets, mask, kernel_size=3, padding=1)

    for i in range(3):
        with pytest.raises(TypeError, match=r"can't apply forward-mode autodiff \(jvp\) to a custom_vjp function"):
            # Lowered only (JAX raises while lowering): nothing is compiled.
            jax.jit(
                lambda a, i=i: jax.jvp(lambda b: fn(*args[:i], b, *args[i + 1 :]), (a,), (jnp.ones_like(a),))
            ).lower(args[i])
