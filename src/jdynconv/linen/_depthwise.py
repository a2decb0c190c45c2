"""A depthwise conv layer with ``nn.Conv``'s parameters, computed by :func:`jdynconv._depthwise.depthwise_conv`."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdynconv._depthwise import depthwise_conv
from jdynconv._dtypes import promote_dtype
from jdynconv.linen._common import Dtype, Initializer, default_kernel_init, zeros


class DepthwiseConv(nn.Module):
    """``nn.Conv(features, kernel_size, padding=padding, feature_group_count=features)`` with stride 1: the same
    variables (``kernel (*kernel_size, 1, features)``, ``bias (features,)``) and function, as shifted products.

    Attributes:
      features: the channels C, in and out.
      kernel_size: one int per spatial dim.
      padding: one ``(low, high)`` pair per spatial dim.
    """

    features: int
    kernel_size: Sequence[int]
    padding: Sequence[tuple[int, int]]
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = zeros
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """``(B, *spatial, C) -> (B, *out_spatial, C)``."""
        shape = (*self.kernel_size, 1, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        inputs, kernel, bias = promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        return depthwise_conv(inputs, kernel, bias, self.padding)
