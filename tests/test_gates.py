"""jdynconv._gates: the gate's view of the input and its activations, against NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdynconv import _gates
from tests.helpers import assert_close


def test_flatten_is_pytorchs_channel_major_order() -> None:
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # (B, H, W, C)
    # PyTorch's nn.Flatten on the (B, C, H, W) tensor.
    expected = np.transpose(x, (0, 3, 1, 2)).reshape(2, -1)
    np.testing.assert_array_equal(np.asarray(_gates.gate_features(jnp.asarray(x), "flatten")), expected)


@pytest.mark.parametrize("spatial", [(7,), (3, 4), (2, 3, 4)])
def test_mean_is_global_average_pooling(spatial: tuple[int, ...]) -> None:
    x = np.random.default_rng(0).standard_normal((2, *spatial, 3))
    expected = x.mean(axis=tuple(range(1, 1 + len(spatial))))
    assert_close(_gates.gate_features(jnp.asarray(x, jnp.float32), "mean"), expected, 1e-6)
    assert_close(_gates.spatial_mean(jnp.asarray(x, jnp.float32)), expected, 1e-6)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize(
    ("activation", "expected"),
    [
        ("leaky_relu", lambda z: np.where(z > 0, z, 0.01 * z)),
        ("sigmoid", lambda z: 1 / (1 + np.exp(-z))),
        ("identity", lambda z: z),
        (lambda z: jnp.tanh(z), np.tanh),
    ],
    ids=["leaky_relu", "sigmoid", "identity", "callable"],
)
def test_activations(activation, expected) -> None:
    logits = np.random.default_rng(1).standard_normal((4, 3)) * 3
    got = _gates.gate_activation(jnp.asarray(logits, jnp.float32), activation, temperature=1.0)
    assert_close(got, expected(logits), 1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 30.0])
def test_softmax_divides_by_the_temperature(temperature: float) -> None:
    logits = np.random.default_rng(2).standard_normal((4, 3)) * 3
    got = _gates.gate_activation(jnp.asarray(logits, jnp.float32), "softmax", temperature)
    assert_close(got, _softmax(logits / temperature), 1e-6)


def test_softmax_takes_a_traced_temperature() -> None:
    logits = jnp.asarray(np.random.default_rng(3).standard_normal((4, 3)), jnp.float32)
    step = jax.jit(lambda t: _gates.gate_activation(logits, "softmax", t))
    assert_close(step(jnp.float32(2.0)), _softmax(np.asarray(logits, np.float64) / 2.0), 1e-6)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_softmax_refuses_a_non_positive_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="`temperature` must be a positive finite scalar"):
        _gates.gate_activation(jnp.zeros((2, 3)), "softmax", temperature)
