"""Small assertion helpers shared by the tests (optax-style, no heavy test dependency)."""

from __future__ import annotations

import numpy as np


def assert_close(actual: object, expected: object, rtol: float, name: str = "value") -> None:
    """Max abs error at most ``rtol`` times the largest magnitude of ``expected`` (and shapes equal).

    Scaling by the largest magnitude rather than per element keeps sums that cancel to ~0 from
    failing on rounding noise, while any real error (a wrong tap, a wrong group) is O(1) relative.
    """
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != expected {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    error = float(np.abs(actual - expected).max(initial=0.0))
    assert error <= rtol * scale, f"{name}: max abs error {error:.3g} > {rtol:g} * {scale:.3g}"
