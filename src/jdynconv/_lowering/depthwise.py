"""The ``depthwise`` lowering: per-sample convolution as one broadcast multiply-add per kernel tap.

In a depthwise conv (``C_in // G == 1``: each output channel reads one input channel) ``im2col``'s
contraction degenerates to G matmuls of width one, and XLA's own grouped conv is slow on CPU. Here every
kernel tap's strided view of the input (:func:`im2col.tap_views`) is multiplied by that tap's weights,
broadcast over the positions, and the products are summed: elementwise work XLA fuses into one loop,
and whose plain autodiff (pads of the cotangent for the input gradient, one sum over positions per tap
for the kernel gradient) needs no custom derivative, so forward mode, ``jax.hessian`` and ``vmap`` keep
working. With ``C_in // G = c > 1`` it is also correct, a multiply-add per tap and per input channel of a
group (``c`` times the program); ``auto`` takes it only for ``c == 1``.

The batch runs in chunks of about :data:`im2col._CHUNK_BYTES` of a sample's input and output
(:func:`im2col.map_in_chunks`, each step checkpointed), so the backward pass's per-tap sums read data
that is still in cache. Products are summed in float32 at least (float32 for bfloat16 and float16
inputs, the ``preferred_element_type`` if one is given) and cast to the output dtype at the end;
``precision`` has no effect, since no matmul or conv is involved.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jdynconv._batch_norm import statistics_dtype
from jdynconv._lowering.canonical import ConvDims, ConvSpec, output_spatial_shape
from jdynconv._lowering.im2col import chunk_size, map_in_chunks, tap_views


def _accumulation_dtype(dtype: jnp.dtype, spec: ConvSpec) -> jnp.dtype:
    """``preferred_element_type``, else float32 at least (BatchNorm's rule for its statistics): summing taps
    in bfloat16 would round once per tap."""
    return jnp.dtype(spec.preferred_element_type or statistics_dtype(dtype))


def conv_depthwise_sample(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """One sample, channels last: ``(*S, C), (*k, C // G, O) -> (*out, O)``, a multiply-add per tap.

    Output channel ``o`` belongs to group ``o // (O // G)`` and reads that group's input channels, as in
    ``lax.conv_general_dilated``. Every product keeps the channels as its one minor axis (a group's input
    repeated for its ``O // G`` outputs): with a trailing axis of size ``O // G`` instead, fwd+bwd ran markedly
    slower (a one-process probe at B64, 64 channels, 32x32, 3x3 and 7x7).
    """
    *kernel_size, group_in, out_channels = kernels.shape
    groups = spec.feature_group_count
    accumulate = _accumulation_dtype(inputs.dtype, spec)
    views = tap_views(inputs, tuple(kernel_size), spec, first_spatial=0)  # each (*out, C)
    # (*k, C // G, O) -> (taps, C // G, 1, ..., O): one weight per output channel, broadcast over positions.
    weights = kernels.reshape(math.prod(kernel_size), group_in, *(1,) * len(kernel_size), out_channels)
    weights = weights.astype(accumulate)
    out = None
    for view, tap_weights in zip(views, weights, strict=True):
        grouped = view.reshape(*view.shape[:-1], groups, group_in).astype(accumulate)
        for c in range(group_in):
            term = jnp.repeat(grouped[..., c], out_channels // groups, axis=-1) * tap_weights[c]  # (*out, O)
            out = term if out is None else out + term
    return out.astype(spec.preferred_element_type or inputs.dtype)


def conv_depthwise_sample_channels_first(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """:func:`conv_depthwise_sample` in PyTorch's layout: ``(C, *S), (O, C // G, *k) -> (O, *out)``."""
    out_channels, group_in, *kernel_size = kernels.shape
    groups = spec.feature_group_count
    num_spatial = len(kernel_size)
    accumulate = _accumulation_dtype(inputs.dtype, spec)
    views = tap_views(inputs, tuple(kernel_size), spec, first_spatial=1)  # each (C, *out)
    # (O, C // G, *k) -> (taps, C // G, G, O // G, 1, ...): one weight per output channel, broadcast over positions.
    weights = kernels.reshape(groups, out_channels // groups, group_in, math.prod(kernel_size)).transpose(3, 2, 0, 1)
    weights = weights.reshape(*weights.shape, *(1,) * num_spatial).astype(accumulate)
    out = None
    for view, tap_weights in zip(views, weights, strict=True):
        grouped = view.reshape(groups, group_in, *view.shape[1:]).astype(accumulate)
        for c in range(group_in):
            term = grouped[:, c, None] * tap_weights[c]  # (G, 1, *out) * (G, O // G, 1, ...)
            out = term if out is None else out + term
    return out.reshape(out_channels, *out.shape[2:]).astype(spec.preferred_element_type or inputs.dtype)


def depthwise_chunk(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec, *, channels_first: bool) -> int:
    """Samples a step: about :data:`im2col._CHUNK_BYTES` of one sample's input and output (in the
    accumulation dtype): 4 at B64, 64 channels, 32x32. In a one-process probe there (3x3 and 7x7, both
    layouts), fwd+bwd with 2, 4 or 8 samples a step was close to the best, 1 and 16 slower, and the whole
    batch at once much slower. The forward alone of the 3x3 channels-last conv ran faster as one
    batch, which one chunk size for both passes leaves on the table."""
    dims = ConvDims.of(inputs, kernels, channels_first=channels_first)
    out_positions = math.prod(output_spatial_shape(dims.spatial, dims.kernel_size, spec))
    itemsize = _accumulation_dtype(inputs.dtype, spec).itemsize
    sample_bytes = (math.prod(dims.spatial) * dims.in_channels + out_positions * dims.out_channels) * itemsize
    return chunk_size(inputs.shape[0], sample_bytes)


def conv_depthwise(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """The ``depthwise`` method, channels last: ``(B, *S, C), (B, *k, C // G, O) -> (B, *out, O)``."""
    chunk = depthwise_chunk(inputs, kernels, spec, channels_first=False)
    return map_in_chunks(conv_depthwise_sample, inputs, kernels, spec, chunk)


def conv_depthwise_channels_first(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """:func:`conv_depthwise` on PyTorch-layout ``(B, C, *S)``, ``(B, O, C // G, *k)``; ``(B, O, *out)`` out."""
    chunk = depthwise_chunk(inputs, kernels, spec, channels_first=True)
    return map_in_chunks(conv_depthwise_sample_channels_first, inputs, kernels, spec, chunk)
