"""A depthwise conv layer with ``nnx.Conv``'s parameters, computed by :func:`jdynconv._depthwise.depthwise_conv`."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jdynconv._depthwise import depthwise_conv
from jdynconv._dtypes import promote_dtype
from jdynconv.linen._common import Dtype, Initializer, default_kernel_init, zeros


class DepthwiseConv(nnx.Module):
    """``nnx.Conv(C, C, kernel_size, padding=padding, feature_group_count=C)`` with stride 1: the same
    variables (``kernel (*kernel_size, 1, C)``, ``bias (C,)``, drawn in the same order) and function, as
    shifted products. The linen twin is :class:`jdynconv.linen._depthwise.DepthwiseConv`."""

    def __init__(
        self,
        features: int,
        kernel_size: Sequence[int],
        padding: Sequence[tuple[int, int]],
        *,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = zeros,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.kernel_size = tuple(kernel_size)
        self.padding = tuple(tuple(pair) for pair in padding)
        self.dtype = dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (*self.kernel_size, 1, features), param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (features,), param_dtype))

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """``(B, *spatial, C) -> (B, *out_spatial, C)``."""
        inputs, kernel, bias = promote_dtype((inputs, self.kernel[...], self.bias[...]), dtype=self.dtype)
        return depthwise_conv(inputs, kernel, bias, self.padding)
