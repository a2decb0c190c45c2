"""mix_outputs and mix_kernels against NumPy loops, under jit, with gradients and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdynconv as jdc
from tests.helpers import assert_close


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize(("shape", "axis"), [((3, 4, 5, 6, 2), 1), ((3, 5, 4, 2), 2), ((3, 5, 4), -1), ((2, 7), 1)])
def test_mix_outputs_is_the_seed_weighted_sum(shape: tuple[int, ...], axis: int) -> None:
    outputs = _rng(0).standard_normal(shape).astype(np.float32)
    k = shape[axis]
    weights = _rng(1).standard_normal((shape[0], k)).astype(np.float32)
    expected = np.zeros(np.delete(shape, axis % len(shape)))
    for b in range(shape[0]):
        for n in range(k):
            expected[b] += weights[b, n] * np.take(outputs[b], n, axis=(axis % len(shape)) - 1).astype(np.float64)
    assert_close(jax.jit(jdc.mix_outputs, static_argnums=2)(outputs, weights, axis), expected, 1e-6)


def test_mix_outputs_gradients() -> None:
    outputs = _rng(2).standard_normal((3, 4, 5)).astype(np.float32)
    weights = _rng(3).standard_normal((3, 4)).astype(np.float32)
    cotangent = _rng(4).standard_normal((3, 5)).astype(np.float32)
    _, vjp = jax.vjp(jdc.mix_outputs, outputs, weights)
    d_outputs, d_weights = jax.jit(vjp)(cotangent)
    assert_close(d_outputs, weights[:, :, None].astype(np.float64) * cotangent[:, None, :], 1e-6)
    assert_close(d_weights, np.einsum("bkc,bc->bk", outputs.astype(np.float64), cotangent), 1e-6)


def test_mix_kernels_is_a_weighted_sum_of_the_bank() -> None:
    bank = _rng(5).standard_normal((4, 3, 3, 2, 5)).astype(np.float32)
    weights = _rng(6).standard_normal((6, 4)).astype(np.float32)
    expected = np.zeros((6, 3, 3, 2, 5))
    for b in range(6):
        for n in range(4):
            expected[b] += weights[b, n] * bank[n].astype(np.float64)
    assert_close(jax.jit(jdc.mix_kernels)(bank, weights), expected, 1e-6)
    # Biases mix the same way: (k, C_out) -> (B, C_out).
    assert_close(jdc.mix_kernels(bank[:, 0, 0, 0], weights), expected[:, 0, 0, 0], 1e-6)


def test_mixed_kernels_feed_per_sample_conv() -> None:
    bank = _rng(7).standard_normal((3, 3, 4, 2)).astype(np.float32)
    weights = jax.nn.softmax(jnp.asarray(_rng(8).standard_normal((5, 3)), jnp.float32))
    x = _rng(9).standard_normal((5, 10, 4)).astype(np.float32)
    out = jdc.per_sample_conv(x, jdc.mix_kernels(bank, weights))
    # By linearity, mixing kernels equals mixing the k shared-kernel outputs.
    per_expert = jnp.stack(
        [jdc.per_sample_conv(x, jnp.broadcast_to(bank[n], (5, *bank.shape[1:]))) for n in range(3)], 1
    )
    assert_close(out, jdc.mix_outputs(per_expert, weights), 1e-5)


def test_mix_errors() -> None:
    with pytest.raises(ValueError, match=r"`weights` must have shape \(3, 4\) \(batch, k\).*got shape \(3, 5\)"):
        jdc.mix_outputs(np.ones((3, 4, 2), np.float32), np.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"`weights` must have shape \(3, 4\).*got shape \(4,\)"):
        jdc.mix_outputs(np.ones((3, 4, 2), np.float32), np.ones(4, np.float32))
    with pytest.raises(ValueError, match="`axis` must index a non-batch axis"):
        jdc.mix_outputs(np.ones((3, 4, 2), np.float32), np.ones((3, 4), np.float32), axis=0)
    with pytest.raises(ValueError, match="`axis` must index a non-batch axis"):
        jdc.mix_outputs(np.ones((3, 4, 2), np.float32), np.ones((3, 4), np.float32), axis=3)
    with pytest.raises(ValueError, match=r"`outputs` must have rank >= 2"):
        jdc.mix_outputs(np.ones(3, np.float32), np.ones((3, 1), np.float32))
    with pytest.raises(TypeError, match=r"`weights` must have the dtype of `outputs` \(float32\), got bfloat16"):
        jdc.mix_outputs(np.ones((3, 4), np.float32), jnp.ones((3, 4), jnp.bfloat16))
    with pytest.raises(TypeError, match="`outputs` must have a floating-point dtype"):
        jdc.mix_outputs(np.ones((3, 4), np.int32), np.ones((3, 4), np.float32))
    with pytest.raises(
        ValueError, match=r"`weights` must have shape \(batch, 4\).*bank shape \(4, 3, 2\).*got shape \(6, 3\)"
    ):
        jdc.mix_kernels(np.ones((4, 3, 2), np.float32), np.ones((6, 3), np.float32))
    with pytest.raises(ValueError, match=r"`bank` must have rank >= 1"):
        jdc.mix_kernels(np.float32(1.0), np.ones((6, 3), np.float32))
    with pytest.raises(TypeError, match="`weights` must have the dtype of `bank`"):
        jdc.mix_kernels(np.ones((4, 3), np.float32), np.ones((6, 4), np.float16))
