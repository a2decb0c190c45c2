"""Shared settings and the float32 comparison for the PyTorch parity tests in this directory."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import numpy as np
import pytest

# float32 parity tolerance, relative to the largest magnitude of the reference (HF transformers' 1e-5).
# Two frameworks' float32 kernels sum in different orders; the largest error of the parity suite was
# 1.6e-6 (a DynamicConv attention gradient; AMD EPYC, jax 0.10.2), so 1e-5 leaves 6x for other
# CPUs and kernels, while a wrong weight layout, padding or convention is O(1).
RTOL = 1e-5


@pytest.fixture(autouse=True)
def strict_jax() -> Iterator[None]:
    """Strict promotion so silent broadcasting fails loudly, and full float32 matmul/conv precision.

    On GPU JAX runs float32 convs and matmuls in TF32 by default, ~1e-3 relative, far above ``RTOL``;
    PyTorch here runs on CPU in full float32. The setting is part of jit's cache key, so it is honoured.
    """
    with (
        jax.numpy_dtype_promotion("strict"),
        jax.numpy_rank_promotion("raise"),
        jax.default_matmul_precision("highest"),
    ):
        yield


def _assert_close(actual: object, expected: object, name: str) -> None:
    """``|actual - expected| <= RTOL * |expected| + RTOL * max(1, max |expected|)`` elementwise.

    The absolute term scales with the largest reference value so entries that cancel to ~0 do not
    fail on float32 rounding, while a real error (a wrong tap, group or sample) is O(1) relative.
    """
    expected = np.asarray(expected)
    atol = RTOL * max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=RTOL, atol=atol, err_msg=name, strict=True)


@pytest.fixture
def assert_close() -> Callable[[object, object, str], None]:
    """The float32 parity comparison, as a fixture so test modules need not import this conftest."""
    return _assert_close
