"""Depthwise convolution (one filter per channel, stride 1) as a sum of shifted, scaled copies of the input.

The same function as ``lax.conv_general_dilated(..., feature_group_count=C)`` with a ``(*K, 1, C)`` kernel, written
as ``prod(K)`` elementwise products of slices, which XLA fuses into one loop. XLA:CPU runs the grouped conv many
times slower at DCNv3's depthwise shapes (``docs/performance.md``, DCNv3), forward and backward; on other backends
the fused products are as cheap as the input is large.

The derivatives are written out (:func:`jax.custom_vjp`): the inputs' is the same sum with the kernel flipped, the
kernel's one reduction per tap. Autodiff of the slices would keep a copy of the input per tap for the backward pass
and pad each tap's cotangent back to the input's size.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Padding = tuple[tuple[int, int], ...]


def depthwise_conv(
    inputs: jax.Array, kernel: jax.Array, bias: jax.Array | None, padding: Sequence[tuple[int, int]]
) -> jax.Array:
    """``out[b, o, c] = sum_k kernel[k, 0, c] * pad(inputs)[b, o + k, c] + bias[c]``, channels-last, N-d.

    Args:
      inputs: ``(B, *spatial, C)``.
      kernel: ``(*K, 1, C)``: Flax's conv layout with ``feature_group_count = C``.
      bias: ``(C,)`` or None.
      padding: one ``(low, high)`` pair of zeros per spatial dim (negative: cropped).

    Returns:
      ``(B, *out_spatial, C)``, ``out_spatial = spatial + low + high - K + 1``, in the inputs' and kernel's
      result dtype.
    """
    pads = tuple((int(low), int(high)) for low, high in padding)
    out = _correlate(inputs, kernel, pads)
    return out if bias is None else out + bias.reshape(_per_channel(inputs))


def _per_channel(inputs: jax.Array) -> tuple[int, ...]:
    """A ``(C,)`` vector's shape broadcast against ``inputs``, ranks explicit (no rank promotion)."""
    return (1,) * (inputs.ndim - 1) + (inputs.shape[-1],)


def _windows(padded: jax.Array, taps: tuple[int, ...], out_spatial: Sequence[int]):
    """``(tap, window)`` for every kernel tap: the slice of ``padded`` that tap reads, ``(B, *out_spatial, C)``."""
    for tap in itertools.product(*(range(k) for k in taps)):
        yield tap, padded[(slice(None), *(slice(t, t + n) for t, n in zip(tap, out_spatial, strict=True)))]


def _pad(inputs: jax.Array, pads: Padding) -> jax.Array:
    zero = jnp.zeros((), inputs.dtype)
    return lax.pad(inputs, zero, ((0, 0, 0), *((low, high, 0) for low, high in pads), (0, 0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _correlate(inputs: jax.Array, kernel: jax.Array, pads: Padding) -> jax.Array:
    inputs, kernel = jnp.asarray(inputs), jnp.asarray(kernel)
    dtype = jnp.result_type(inputs, kernel)
    taps = kernel.shape[:-2]
    padded = _pad(inputs.astype(dtype), pads)
    out_spatial = [size - k + 1 for size, k in zip(padded.shape[1:-1], taps, strict=True)]
    out = None
    for tap, window in _windows(padded, taps, out_spatial):
        term = window * kernel[(*tap, 0)].astype(dtype).reshape(_per_channel(inputs))
        out = term if out is None else out + term
    return out


def _correlate_fwd(inputs, kernel, pads):
    return _correlate(inputs, kernel, pads), (inputs, kernel)


def _correlate_bwd(pads, residuals, cotangent):
    inputs, kernel = residuals
    taps = kernel.shape[:-2]
    # The inputs' cotangent: the same correlation of the cotangent with the kernel flipped, padded by K - 1 - pad.
    flipped = kernel[(slice(None, None, -1),) * len(taps)]
    back = tuple((k - 1 - low, k - 1 - high) for k, (low, high) in zip(taps, pads, strict=True))
    grad_inputs = _correlate(cotangent, flipped, back)
    # The kernel's: per tap, the window it read times the cotangent, summed over the batch and positions.
    padded = _pad(inputs.astype(cotangent.dtype), pads)
    axes = tuple(range(cotangent.ndim - 1))
    grad_kernel = jnp.stack(
        [jnp.sum(window * cotangent, axis=axes) for _, window in _windows(padded, taps, cotangent.shape[1:-1])]
    )
    grad_kernel = grad_kernel.reshape(kernel.shape)
    return grad_inputs.astype(inputs.dtype), grad_kernel.astype(kernel.dtype)


_correlate.defvjp(_correlate_fwd, _correlate_bwd)
