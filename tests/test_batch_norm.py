"""jdynconv._batch_norm against BatchNorm written out in float64 NumPy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jdynconv import _batch_norm
from tests.helpers import assert_close

EPSILON = 1e-5
MOMENTUM = 0.9


def _arrays(seed: int) -> tuple[np.ndarray, ...]:
    """Channels-last values ``(4, 5, 6, 3)`` off zero mean and unit variance, and ``(3,)`` parameters and stats."""
    rng = np.random.default_rng(seed)
    out = rng.standard_normal((4, 5, 6, 3)) * np.array([0.5, 2.0, 3.0]) + np.array([1.0, -2.0, 0.0])
    scale, offset, mean = (rng.standard_normal(3) for _ in range(3))
    var = rng.uniform(0.5, 2.0, 3)
    return out, scale, offset, mean, var


def _normalise(out: np.ndarray, scale, offset, mean, var) -> np.ndarray:
    return (out - mean) / np.sqrt(var + EPSILON) * scale + offset


@pytest.mark.parametrize("unbiased", [True, False])
def test_training_normalises_with_batch_statistics_and_updates_the_running_ones(unbiased: bool) -> None:
    out, scale, offset, mean, var = _arrays(0)
    batch_mean = out.mean(axis=(0, 1, 2))
    batch_var = out.var(axis=(0, 1, 2))  # biased: what the output is normalised with, in both frameworks
    count = out.size // 3
    stored_var = batch_var * count / (count - 1) if unbiased else batch_var
    norm = _batch_norm.NormConfig(MOMENTUM, EPSILON, unbiased_running_var=unbiased)
    normalised, (new_mean, new_var) = _batch_norm.batch_norm(
        *(jnp.asarray(a, jnp.float32) for a in (out, scale, offset, mean, var)), training=True, norm=norm
    )
    assert_close(normalised, _normalise(out, scale, offset, batch_mean, batch_var), 1e-5, "output")
    assert_close(new_mean, MOMENTUM * mean + (1 - MOMENTUM) * batch_mean, 1e-6, "running mean")
    assert_close(new_var, MOMENTUM * var + (1 - MOMENTUM) * stored_var, 1e-6, "running var")
    # The two conventions differ by count / (count - 1) = 120 / 119 in the stored variance: visible here.
    other = MOMENTUM * var + (1 - MOMENTUM) * (batch_var if unbiased else batch_var * count / (count - 1))
    assert np.max(np.abs(np.asarray(new_var) - other)) > 1e-4


def test_evaluation_normalises_with_the_running_statistics_and_keeps_them() -> None:
    out, scale, offset, mean, var = _arrays(1)
    norm = _batch_norm.NormConfig(MOMENTUM, EPSILON, unbiased_running_var=True)
    stats = jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32)
    normalised, (new_mean, new_var) = _batch_norm.batch_norm(
        *(jnp.asarray(a, jnp.float32) for a in (out, scale, offset)), *stats, training=False, norm=norm
    )
    assert_close(normalised, _normalise(out, scale, offset, mean, var), 1e-5, "output")
    assert new_mean is stats[0]
    assert new_var is stats[1]


def test_bfloat16_values_keep_float32_statistics() -> None:
    out, scale, offset, mean, var = _arrays(2)
    norm = _batch_norm.NormConfig(MOMENTUM, EPSILON, unbiased_running_var=False)
    values = jnp.asarray(out, jnp.bfloat16)
    normalised, (new_mean, new_var) = _batch_norm.batch_norm(
        values, *(jnp.asarray(a, jnp.float32) for a in (scale, offset, mean, var)), training=True, norm=norm
    )
    assert normalised.dtype == jnp.bfloat16
    assert new_mean.dtype == new_var.dtype == jnp.float32
    # Statistics of the bfloat16 values themselves, computed exactly: only the output's rounding is left.
    exact = np.asarray(values, np.float64)
    batch_mean, batch_var = exact.mean(axis=(0, 1, 2)), exact.var(axis=(0, 1, 2))
    assert_close(new_mean, MOMENTUM * mean + (1 - MOMENTUM) * batch_mean, 1e-6, "running mean")
    assert_close(new_var, MOMENTUM * var + (1 - MOMENTUM) * batch_var, 1e-6, "running var")
    # Normalised in float32, then rounded once to bfloat16: within half a bfloat16 step (2^-8 relative) of
    # the exact value, element by element. Normalising in bfloat16 itself was off by up to 33 steps.
    expected = _normalise(exact, scale, offset, batch_mean, batch_var)
    error = np.abs(np.asarray(normalised, np.float64) - expected)
    assert np.all(error <= 2.0**-8 * np.abs(expected) + 1e-6), float(np.max(error / (np.abs(expected) + 1e-6)))


def test_one_value_per_channel_stores_the_variance_as_is() -> None:
    """With one value per channel the unbiased correction n / (n - 1) is undefined: the batch variance (0)
    is stored uncorrected, as PyTorch's BatchNorm does, rather than dividing by zero."""
    out, scale, offset, mean, var = (a[:1, :1, :1] if a.ndim == 4 else a for a in _arrays(3))
    norm = _batch_norm.NormConfig(MOMENTUM, EPSILON, unbiased_running_var=True)
    normalised, (new_mean, new_var) = _batch_norm.batch_norm(
        *(jnp.asarray(a, jnp.float32) for a in (out, scale, offset, mean, var)), training=True, norm=norm
    )
    assert np.all(np.isfinite(np.asarray(normalised)))
    assert_close(new_mean, MOMENTUM * mean + (1 - MOMENTUM) * out.reshape(-1), 1e-6, "running mean")
    assert_close(new_var, MOMENTUM * var, 1e-6, "running var")


def test_statistics_dtype_is_at_least_float32() -> None:
    assert _batch_norm.statistics_dtype(jnp.bfloat16) == jnp.float32
    assert _batch_norm.statistics_dtype(jnp.float16) == jnp.float32
    assert _batch_norm.statistics_dtype(jnp.float32) == jnp.float32
