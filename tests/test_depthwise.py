"""``jdynconv._depthwise.depthwise_conv`` against ``lax.conv_general_dilated(feature_group_count=C)`` in float64
(the same sums in another order: equal to rounding), values and gradients, 2-D and 3-D, asymmetric padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jdynconv._depthwise import depthwise_conv


def grouped_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, padding) -> jax.Array:
    n = x.ndim - 2
    spatial = "DHW"[-n:] if n <= 3 else None
    numbers = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    out = lax.conv_general_dilated(
        x, kernel, (1,) * n, padding, dimension_numbers=numbers, feature_group_count=x.shape[-1]
    )
    return out + bias.reshape((1,) * (x.ndim - 1) + (-1,))


@pytest.mark.parametrize(
    ("spatial", "kernel_size", "padding"),
    [
        ((7, 6), (5, 3), ((0, 2), (2, 1))),
        ((5, 4, 6), (3, 1, 3), ((1, 1), (0, 0), (2, 0))),
    ],
)
def test_equals_grouped_conv_with_gradients(spatial, kernel_size, padding) -> None:
    rng = np.random.default_rng(len(spatial) * 10 + kernel_size[0])
    channels = 5
    x, kernel, bias, cotangent_seed = (
        rng.standard_normal((2, *spatial, channels)),
        rng.standard_normal((*kernel_size, 1, channels)),
        rng.standard_normal((channels,)),
        rng.integers(1 << 30),
    )
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(a, jnp.float64) for a in (x, kernel, bias))
        expected, expected_vjp = jax.vjp(lambda *a: grouped_conv(*a, padding), *args)
        actual, actual_vjp = jax.vjp(lambda *a: depthwise_conv(*a, padding), *args)
        cotangent = jnp.asarray(np.random.default_rng(cotangent_seed).standard_normal(expected.shape))
        # float64 sums of at most prod(kernel_size) = 15 products of O(1) terms, in two orders: ~1e-15.
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-12)
        for got, want in zip(actual_vjp(cotangent), expected_vjp(cotangent), strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-11)


def test_without_bias_and_dtype() -> None:
    x = jnp.ones((1, 4, 3), jnp.bfloat16)
    kernel = jnp.full((3, 1, 3), 2.0, jnp.bfloat16)
    out = depthwise_conv(x, kernel, None, ((1, 1),))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out[0, :, 0], np.float32), [4.0, 6.0, 6.0, 4.0])
