"""The maths of involution (Li et al., "Involution: Inverting the Inherence of Convolution for Visual Recognition",
CVPR 2021; d-li14/involution), N-d and channels-last, apart from the layers' variables.

A kernel per output position and group of ``group_channels`` channels is generated from the input (pooled by
the stride), and applied to the input window under it with :func:`per_position_conv`. The original pads by
``(K - 1) // 2`` on each side and pools with ``AvgPool2d(stride, stride)``; for an odd input size and stride 2
(or an even kernel size) the pooled size ``floor(H / s)`` and the conv's ``floor((H - 1) / s) + 1`` disagree and
its ``view`` fails. jdynconv defines those cases: padding ``((K - 1) // 2, K // 2)`` (the original's for odd K)
and a pooling whose last, partial window averages the pixels it has (``AvgPool2d(s, s, ceil_mode=True)``), both
giving ``ceil(H / s)`` positions; where the original runs, the result is the original's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdynconv._per_position import per_position_conv


def padding(kernel_size: Sequence[int]) -> list[tuple[int, int]]:
    """``((K - 1) // 2, K // 2)`` per spatial dim: the original's ``(K - 1) // 2`` each side for odd K."""
    return [((k - 1) // 2, k // 2) for k in kernel_size]


def out_spatial(spatial: Sequence[int], strides: Sequence[int]) -> tuple[int, ...]:
    """``ceil(size / stride)`` per spatial dim: the positions the kernels are generated and applied at."""
    return tuple(-(-n // s) for n, s in zip(spatial, strides, strict=True))


def stride_pool(inputs: jax.Array, strides: Sequence[int]) -> jax.Array:
    """Average over ``strides``-sized windows at ``strides`` steps, channels-last; the last window of a dim the
    stride does not divide averages the pixels it covers (``AvgPool(s, s, ceil_mode=True)``). Identity for
    stride 1."""
    if all(s == 1 for s in strides):
        return inputs
    spatial = inputs.shape[1:-1]
    extra = [o * s - n for n, s, o in zip(spatial, strides, out_spatial(spatial, strides), strict=True)]
    window = (1, *strides, 1)
    pads = ((0, 0), *((0, e) for e in extra), (0, 0))
    compute = jnp.promote_types(inputs.dtype, jnp.float32)
    zero = np.zeros((), compute)  # a concrete 0: lax lowers the sum to reduce_window_sum, which has a VJP
    total = lax.reduce_window(inputs.astype(compute), zero, lax.add, window, window, pads)
    if not any(extra):
        return (total / math.prod(strides)).astype(inputs.dtype)
    ones = jnp.ones((1, *spatial, 1), compute)
    count = lax.reduce_window(ones, zero, lax.add, window, window, pads)
    return (total / count).astype(inputs.dtype)


def involution(inputs: jax.Array, kernels: jax.Array, strides: Sequence[int]) -> jax.Array:
    """``(B, *spatial, C)`` inputs and ``(B, *out_spatial, G, *kernel_size)`` kernels -> ``(B, *out_spatial, C)``:
    :func:`per_position_conv` with involution's padding."""
    num_spatial = inputs.ndim - 2
    kernel_size = kernels.shape[2 + num_spatial :]
    return per_position_conv(inputs, kernels, strides=tuple(strides), padding=padding(kernel_size))
