"""Small helpers shared by the tests: assertions (optax-style, no heavy test dependency) and jaxpr inspection."""

from __future__ import annotations

from typing import Any

import jax
import jax.extend.core
import numpy as np

# float32 results against float64 references (and lowerings against each other), relative to the
# largest reference magnitude: sums of float32 products, whose order differs between
# lowerings, XLA versions and CPUs. The largest error of the whole suite was 1.4e-6 (AMD EPYC, jax
# 0.10.2), about 24 roundings of 2^-24; 1e-5 leaves 7x for other CPUs' orders, while a real
# error (a wrong tap, group, sample or chunk) is O(1).
F32_RTOL = 1e-5


def assert_close(
    actual: object, expected: object, rtol: float, name: str = "value", *, magnitude: object = None
) -> None:
    """Max abs error at most ``rtol`` times the largest magnitude of ``expected`` (and shapes equal).

    Scaling by the largest magnitude rather than per element keeps sums that cancel to ~0 from
    failing on rounding noise, while any real error (a wrong tap, a wrong group) is O(1) relative.
    ``magnitude``, if given, replaces ``expected`` as that scale: for sums whose every entry may cancel
    (a bias gradient of few terms), the same sums of absolute values, which bound float32's rounding.
    """
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != expected {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
    reference_scale = expected if magnitude is None else np.asarray(magnitude, np.float64)
    scale = max(float(np.abs(reference_scale).max(initial=0.0)), 1e-30)
    error = float(np.abs(actual - expected).max(initial=0.0))
    assert error <= rtol * scale, f"{name}: max abs error {error:.3g} > {rtol:g} * {scale:.3g}"


def equations(primitive: str, fn, *args) -> list[Any]:
    """Every ``primitive`` equation in the (nested) jaxpr of ``fn``."""
    found = []

    def visit(jaxpr: jax.extend.core.Jaxpr) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == primitive:
                found.append(eqn)
            for sub in _subjaxprs(eqn):
                visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def equation_params(primitive: str, fn, *args) -> list[dict[str, Any]]:
    """The parameters of every ``primitive`` equation in the (nested) jaxpr of ``fn``."""
    return [eqn.params for eqn in equations(primitive, fn, *args)]


def equation_operand_shapes(primitive: str, fn, *args) -> list[tuple[int, ...]]:
    """The shape of every operand of every ``primitive`` equation in the (nested) jaxpr of ``fn``."""
    return [tuple(var.aval.shape) for eqn in equations(primitive, fn, *args) for var in eqn.invars]


def _subjaxprs(eqn: Any) -> list[Any]:
    found = []
    for value in eqn.params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                found.append(item.jaxpr)
            elif isinstance(item, jax.extend.core.Jaxpr):
                found.append(item)
    return found
