"""Depthwise convolution (one filter per channel, stride 1) as a sum of shifted, scaled copies of the input.

The same function as ``lax.conv_general_dilated(..., feature_group_count=C)`` with a ``(*K, 1, C)`` kernel, written
as ``prod(K)`` elementwise products of slices, which XLA fuses into one loop. XLA:CPU runs the grouped conv many
times slower at DCNv3's depthwise shapes (``docs/performance.md``, DCNv3), forward and backward; on other backends
the fused products are as cheap as the input is large.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def depthwise_conv(
    inputs: jax.Array, kernel: jax.Array, bias: jax.Array | None, padding: Sequence[tuple[int, int]]
) -> jax.Array:
    """``out[b, o, c] = sum_k kernel[k, 0, c] * pad(inputs)[b, o + k, c] + bias[c]``, channels-last, N-d.

    Args:
      inputs: ``(B, *spatial, C)``.
      kernel: ``(*K, 1, C)``: Flax's conv layout with ``feature_group_count = C``.
      bias: ``(C,)`` or None.
      padding: one ``(low, high)`` pair of zeros per spatial dim.

    Returns:
      ``(B, *out_spatial, C)``, ``out_spatial = spatial + low + high - K + 1``, in the inputs' and kernel's
      result dtype.
    """
    taps = kernel.shape[:-2]
    padded = jnp.pad(inputs, ((0, 0), *padding, (0, 0)))
    out_spatial = [size - k + 1 for size, k in zip(padded.shape[1:-1], taps, strict=True)]
    per_channel = (1,) * (inputs.ndim - 1) + (inputs.shape[-1],)  # explicit ranks: no rank promotion
    out = None
    for tap in itertools.product(*(range(k) for k in taps)):
        window = padded[(slice(None), *(slice(t, t + n) for t, n in zip(tap, out_spatial, strict=True)))]
        term = window * kernel[(*tap, 0)].reshape(per_channel)
        out = term if out is None else out + term
    return out if bias is None else out + bias.reshape(per_channel)
