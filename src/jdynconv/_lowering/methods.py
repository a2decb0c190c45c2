"""The lowerings that need no module of their own: ``vmap`` (the reference semantics), ``grouped``, ``scan``
and ``hybrid``, and :data:`LOWERINGS`, every lowering by its ``method`` name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jdynconv._lowering.canonical import ConvSpec, Lowering, shared_conv
from jdynconv._lowering.depthwise import conv_depthwise
from jdynconv._lowering.direct import conv_direct_method
from jdynconv._lowering.im2col import conv_im2col, conv_im2col_method
from jdynconv._lowering.tangent import with_tangent_lowering


def conv_vmap(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """``jax.vmap`` of a single-sample convolution over the batch: the reference semantics."""

    def one_sample(x: jax.Array, w: jax.Array) -> jax.Array:
        return shared_conv(x[None], w, spec, spec.feature_group_count)[0]

    return jax.vmap(one_sample)(inputs, kernels)


def conv_grouped(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """One conv with the batch folded into channels and ``feature_group_count = B * G``."""
    batch, *spatial, in_channels = inputs.shape
    *kernel_size, group_in, out_channels = kernels.shape[1:]
    # (B, *S, C) -> (1, *S, B * C): channel b * C + c lands in group b * G + c // (C / G).
    folded_inputs = jnp.moveaxis(inputs, 0, -2).reshape(1, *spatial, batch * in_channels)
    folded_kernels = jnp.moveaxis(kernels, 0, -2).reshape(*kernel_size, group_in, batch * out_channels)
    out = shared_conv(folded_inputs, folded_kernels, spec, batch * spec.feature_group_count)[0]
    return jnp.moveaxis(out.reshape(*out.shape[:-1], batch, out_channels), -2, 0)


def conv_scan(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """``lax.map`` over the batch of one ordinary (single-kernel) convolution per sample."""

    def one_sample(pair: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, w = pair
        return shared_conv(x[None], w, spec, spec.feature_group_count)[0]

    return lax.map(one_sample, (inputs, kernels))


# cuDNN's grouped forward, matmul derivatives: the accelerator choice.
conv_grouped_im2col_grad = with_tangent_lowering(conv_grouped, conv_im2col)


LOWERINGS: dict[str, Lowering] = {
    "vmap": conv_vmap,
    "grouped": conv_grouped,
    "scan": conv_scan,
    "im2col": conv_im2col_method,
    "direct": conv_direct_method,
    "hybrid": conv_grouped_im2col_grad,
    "depthwise": conv_depthwise,
}
