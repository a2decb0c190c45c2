"""The ``im2col`` lowering: per-sample convolution as matmuls of input patches with the kernels.

The ``prod(kernel_size)`` shifted views of the padded input (the patches) are contracted with each
sample's kernel. Forward and both gradients are matmuls, the gradients far faster on CPU than autodiff
through a conv's. Large per-sample matmuls (G = 1) run two samples a step (a ``lax.map`` of matmuls
batched over 2; a matmul batched over many large samples ran ~3.8x slower at 2d-c-like sizes); small ones
run in batched chunks sized so each chunk's patches stay in cache. When the batch is split, patches are
recomputed in the backward pass. Channels last, when the batch is split, G = 1 and a sample has at least
128 output positions, the kernel gradient is contracted from channel-major patches (a custom JVP,
:func:`conv_im2col_method`), the orientation XLA:CPU ran faster there.

Also the derivatives of ``direct`` and ``hybrid``, and the kernel gradient of BranchMixConv's shared
conv (:func:`shared_conv_matmul_kernel_grad`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jdynconv._lowering.canonical import ConvDims, ConvSpec, Lowering, output_spatial_shape, shared_conv
from jdynconv._lowering.tangent import with_tangent_lowering


def tap_views(inputs: jax.Array, kernel_size: tuple[int, ...], spec: ConvSpec, first_spatial: int) -> list[jax.Array]:
    """One strided view of the dilated, padded ``inputs`` per kernel tap, taps in row-major kernel order.

    ``inputs`` has its spatial dims at ``first_spatial, first_spatial + 1, ...``; every other dim is
    kept whole, so this serves batched and single samples in either channel layout. Each view has the
    output's spatial shape. A static loop over taps: the program grows with the kernel's size, never
    with the batch.
    """
    num_spatial = len(kernel_size)
    spatial_axes = range(first_spatial, first_spatial + num_spatial)
    spatial = [inputs.shape[axis] for axis in spatial_axes]
    config = [(0, 0, 0)] * inputs.ndim
    for axis, (lo, hi), dilation in zip(spatial_axes, spec.pads, spec.input_dilation, strict=True):
        config[axis] = (lo, hi, dilation - 1)
    padded = lax.pad(inputs, jnp.zeros((), inputs.dtype), config)
    out_shape = output_spatial_shape(spatial, kernel_size, spec)
    views = []
    for tap in itertools.product(*(range(k) for k in kernel_size)):
        start, limit, strides = [0] * inputs.ndim, list(padded.shape), [1] * inputs.ndim
        for axis, t, kd, o, s in zip(spatial_axes, tap, spec.kernel_dilation, out_shape, spec.strides, strict=True):
            start[axis], limit[axis], strides[axis] = t * kd, t * kd + (o - 1) * s + 1, s
        views.append(lax.slice(padded, start, limit, strides))
    return views


def extract_patches(inputs: jax.Array, kernel_size: tuple[int, ...], spec: ConvSpec) -> jax.Array:
    """The receptive field of every output position: ``(B, *S, C) -> (B, *out, prod(kernel_size) * C)``.

    Tap-major (index ``tap * C + c``). The tap views concatenated on the channel axis (measured 1.6x
    faster on XLA:CPU than stacking on a new axis and reshaping).
    """
    views = tap_views(inputs, kernel_size, spec, first_spatial=1)
    return jnp.concatenate(views, axis=-1) if len(views) > 1 else views[0]


def _contract_kwargs(spec: ConvSpec) -> dict[str, Any]:
    return dict(precision=spec.precision, preferred_element_type=spec.preferred_element_type)


def conv_im2col_sample(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """One sample's patches contracted with its kernel: ``(*S, C), (*k, C // G, O) -> (*out, O)``.

    Unbatched, so a caller picks the batching: XLA:CPU hands an unbatched matmul to its fast GEMM
    (measured 345 GFLOP/s on 2 cores for 8192x2304x256) and a matmul batched over many samples to a
    slower path (91 GFLOP/s for the same FLOPs as 128 matmuls of 64x2304x256).
    """
    *kernel_size, group_in, out_channels = kernels.shape
    groups = spec.feature_group_count
    patches = extract_patches(inputs[None], tuple(kernel_size), spec)[0]
    out_spatial = patches.shape[:-1]
    taps = math.prod(kernel_size)
    if groups == 1:
        flat_patches = patches.reshape(-1, taps * group_in)
        out = lax.dot(flat_patches, kernels.reshape(taps * group_in, out_channels), **_contract_kwargs(spec))
    else:
        # Output channel o belongs to group o // (C_out / G), as in lax.conv_general_dilated.
        grouped_patches = patches.reshape(-1, taps, groups, group_in)
        grouped_kernels = kernels.reshape(taps, group_in, groups, out_channels // groups)
        out = jnp.einsum("ptgc,tcgo->pgo", grouped_patches, grouped_kernels, **_contract_kwargs(spec))
    return out.reshape(*out_spatial, out_channels)


def conv_im2col_sample_channels_first(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """:func:`conv_im2col_sample` in PyTorch's layout: ``(C, *S), (O, C // G, *k) -> (O, *out)``.

    The kernel's own ``(O, C // G * T)`` flattening times patches stacked as ``(C * T, positions)``:
    no transpose of inputs, kernels or output. Transposing PyTorch-layout arguments to channels-last
    instead cost more than the convolution (B128, 128 channels, 1-D k5: 23-46 ms against 8-13 ms).
    """
    out_channels, group_in, *kernel_size = kernels.shape
    groups = spec.feature_group_count
    views = tap_views(inputs, tuple(kernel_size), spec, first_spatial=1)
    patches = jnp.stack(views, axis=1)  # (C, T, *out): channel-major, as the kernel is flattened.
    out_spatial = patches.shape[2:]
    taps = math.prod(kernel_size)
    if groups == 1:
        flat_patches = patches.reshape(group_in * taps, -1)
        out = lax.dot(kernels.reshape(out_channels, group_in * taps), flat_patches, **_contract_kwargs(spec))
    else:
        grouped_patches = patches.reshape(groups, group_in * taps, -1)
        grouped_kernels = kernels.reshape(groups, out_channels // groups, group_in * taps)
        out = jnp.einsum("gok,gkp->gop", grouped_kernels, grouped_patches, **_contract_kwargs(spec))
    return out.reshape(out_channels, *out_spatial)


def conv_im2col_sample_kernel_tangent(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """:func:`conv_im2col_sample` (same layouts, same values), contracted so its transpose is a fast kernel gradient.

    The patches are built channel-major, ``(C * T, positions)`` from the transposed sample, and contracted
    over their first axis. JAX transposes this (as a function of the kernel) into a contraction of those
    ``(C * T, positions)`` patches with the cotangent ``(positions, O)`` over positions, the contracted axis
    the patches' minor one. The transpose of :func:`conv_im2col_sample` contracts its ``(positions, T * C)``
    patches over their major axis instead, which XLA:CPU ran at 0.6x the speed (B64, 64 -> 64 channels,
    32x32, 3x3, two samples a step: 52 vs 31 ms for the matmuls alone on ready-made patches).
    """
    *kernel_size, group_in, out_channels = kernels.shape
    groups = spec.feature_group_count
    taps = math.prod(kernel_size)
    views = tap_views(jnp.moveaxis(inputs, -1, 0), tuple(kernel_size), spec, first_spatial=1)
    patches = jnp.stack(views, axis=1)  # (C, T, *out)
    out_spatial = patches.shape[2:]
    # Kernel rows in the patches' (c, tap) order, per group: (T, C // G, O) -> (G, C // G * T, O // G).
    grouped_kernels = kernels.reshape(taps, group_in, groups, out_channels // groups).transpose(2, 1, 0, 3)
    grouped_kernels = grouped_kernels.reshape(groups, group_in * taps, out_channels // groups)
    grouped_patches = patches.reshape(groups, group_in * taps, -1)
    if groups == 1:
        contraction = (((0,), (0,)), ((), ()))
        out = lax.dot_general(grouped_patches[0], grouped_kernels[0], contraction, **_contract_kwargs(spec))
    else:
        out = jnp.einsum("gkp,gko->pgo", grouped_patches, grouped_kernels, **_contract_kwargs(spec))
    return out.reshape(*out_spatial, out_channels)


def conv_im2col(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """Patches of the input contracted with the per-sample kernels in one batched matmul."""
    return jax.vmap(conv_im2col_sample, in_axes=(0, 0, None))(inputs, kernels, spec)


# Patches of one chunk are kept around this size so they stay in a core's L2 cache; measured on 2
# CPU cores (1 MiB L2 each): 1 to 4 MiB chunks were fastest for 1-D, 2-D and 3-D shapes.
_CHUNK_BYTES = 2 * 1024 * 1024

# From this many multiply-adds per sample (G = 1), a few samples a step beat cache-sized batched chunks on
# XLA:CPU (2 cores): one sample a step took 0.4x-0.6x the time at 2.6M-38M per sample, was within +-15%
# at 0.05M-1.6M either way, and 1.6x-1.9x slower below 0.01M, where the loop's per-step cost dominates.
PER_SAMPLE_MATMUL_MACS = 1 << 20

# How many such samples a step. Two rather than one (2 cores, jax 0.10.2, both layouts, fwd, fwd+bwd
# and fwd + kernel gradient, 2026-11-21): 2d-a (B64, 32 channels, 32x32) fwd 8.1-8.6 vs 11.5-12.9 ms and
# fwd + kernel gradient 17.9-18.8 vs 26.2-26.5 ms; 3d-a channels-last fwd 10.1 vs 15.1 ms; 1d-a fwd+bwd
# 4.8-4.9 vs 5.2-5.4 ms; 1d-b forward 7.2-7.9 vs 8.8-9.8 ms; within noise on 2d-b, 2d-c and the kernel-mixing
# conv (B64, 64 channels, 32x32), except its channels-last fwd+bwd (84 vs 73 ms, measured before that path
# took the reoriented kernel gradient below). Four were slower again on 3d-a, 2d-c and the kernel-mixing
# conv. Fewer, cheaper loop steps, each spread over both cores.
_LARGE_MATMUL_SAMPLES_PER_STEP = 2


def chunk_size(batch: int, bytes_per_sample: int) -> int:
    """How many samples make a chunk of about ``_CHUNK_BYTES`` of intermediates (at least 1)."""
    return int(max(1, min(batch, _CHUNK_BYTES // max(bytes_per_sample, 1))))


def im2col_chunk_size(batch: int, macs_per_sample: int, patch_bytes_per_sample: int) -> int:
    """How many samples the im2col lowering contracts at once (one batched matmul per step)."""
    if macs_per_sample >= PER_SAMPLE_MATMUL_MACS:
        return max(1, min(batch, _LARGE_MATMUL_SAMPLES_PER_STEP))
    return chunk_size(batch, patch_bytes_per_sample)


def _im2col_chunk(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec, *, channels_first: bool) -> int:
    """:func:`im2col_chunk_size` for these arguments."""
    dims = ConvDims.of(inputs, kernels, channels_first=channels_first)
    patch_bytes = dims.patch_size(spec) * dims.in_channels * inputs.dtype.itemsize
    return im2col_chunk_size(inputs.shape[0], dims.matmul_macs(spec), patch_bytes)


def _map_over_chunks(
    sample_fn: Lowering, inputs: jax.Array, kernels: jax.Array, spec: ConvSpec, *, channels_first: bool
) -> jax.Array:
    """``sample_fn`` (one sample's conv) over the batch in :func:`_im2col_chunk`-sized chunks."""
    chunk = _im2col_chunk(inputs, kernels, spec, channels_first=channels_first)
    return map_in_chunks(sample_fn, inputs, kernels, spec, chunk)


def map_in_chunks(sample_fn: Lowering, inputs: jax.Array, kernels: jax.Array, spec: ConvSpec, chunk: int) -> jax.Array:
    """``sample_fn`` (one sample's conv) over the batch, ``chunk`` samples a ``lax.map`` step (vmapped within
    a step); each step is checkpointed, so its intermediates are recomputed in the backward pass, not stored."""
    body = jax.checkpoint(lambda pair: sample_fn(pair[0], pair[1], spec))
    if chunk == 1:  # a batch of 1, or one sample's patches fill a chunk: unbatched, one sample a step
        return lax.map(body, (inputs, kernels))
    if chunk >= inputs.shape[0]:
        return jax.vmap(sample_fn, in_axes=(0, 0, None))(inputs, kernels, spec)
    return lax.map(body, (inputs, kernels), batch_size=chunk)


def conv_im2col_chunked(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """The ``im2col`` lowering: large per-sample matmuls two samples a step, small ones in larger chunks."""
    return _map_over_chunks(conv_im2col_sample, inputs, kernels, spec, channels_first=False)


def conv_im2col_chunked_kernel_tangent(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """``conv_im2col_chunked`` contracted as :func:`conv_im2col_sample_kernel_tangent`, chunked the same way."""
    return _map_over_chunks(conv_im2col_sample_kernel_tangent, inputs, kernels, spec, channels_first=False)


def conv_im2col_chunked_channels_first(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """``conv_im2col_chunked`` on PyTorch-layout ``(B, C, *S)``, ``(B, O, C // G, *k)``; ``(B, O, *out)`` out."""
    return _map_over_chunks(conv_im2col_sample_channels_first, inputs, kernels, spec, channels_first=True)


# im2col both ways, its kernel gradient contracted in the faster orientation. Two loops over the batch in
# the backward pass (kernel gradient, input gradient) instead of one. When the batch is split, patches
# are recomputed in the backward pass either way, and the input gradient's loop needs none, so no more
# patches are built than with one loop; an unsplit batch would build them twice (its plain autodiff
# keeps the forward's), which is why :func:`reorients_kernel_grad` requires a split.
conv_im2col_reoriented_kernel_grad = with_tangent_lowering(
    conv_im2col_chunked, conv_im2col_chunked, kernel_tangent=conv_im2col_chunked_kernel_tangent
)

# From this many output positions per sample the reoriented kernel gradient paid (2 cores, jax 0.10.2,
# channels last, G = 1, 2026-11-21, new / old in one process, two runs): fwd + kernel gradient 0.84-0.88
# and fwd+bwd 0.81-0.82 at B64, 64 -> 64 channels, 32x32, 3x3; fwd+bwd 0.78-0.85 at 3d-a (512 positions),
# 0.93-0.96 at 1d-a (128); at 32-64 positions (1d-b, 2d-b, 2d-c) 0.92-1.15, so those keep one loop. In
# those shapes many positions came with 32-64 channels and few with 128-256, so the rule cannot tell
# which of the two decides; grouped convs were not measured and keep plain autodiff.
_REORIENTED_KERNEL_GRAD_POSITIONS = 128


def reorients_kernel_grad(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> bool:
    """Whether :func:`conv_im2col_method` takes the reoriented kernel gradient for these arguments."""
    positions = math.prod(output_spatial_shape(inputs.shape[1:-1], kernels.shape[1:-2], spec))
    batch_is_split = _im2col_chunk(inputs, kernels, spec, channels_first=False) < inputs.shape[0]
    return spec.feature_group_count == 1 and positions >= _REORIENTED_KERNEL_GRAD_POSITIONS and batch_is_split


def conv_im2col_method(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """The ``im2col`` method (channels last): :func:`conv_im2col_chunked`, with the reoriented kernel
    gradient (:func:`conv_im2col_sample_kernel_tangent`) where :func:`reorients_kernel_grad` says so."""
    if reorients_kernel_grad(inputs, kernels, spec):
        return conv_im2col_reoriented_kernel_grad(inputs, kernels, spec)
    return conv_im2col_chunked(inputs, kernels, spec)


def _shared_conv(inputs: jax.Array, kernel: jax.Array, spec: ConvSpec) -> jax.Array:
    return shared_conv(inputs, kernel, spec, spec.feature_group_count)


def _shared_kernel_im2col(inputs: jax.Array, kernel: jax.Array, spec: ConvSpec) -> jax.Array:
    """The same kernel for every sample, im2col per sample: its transpose sums the batch's patches^T @ g."""
    return conv_im2col(inputs, jnp.broadcast_to(kernel, (inputs.shape[0], *kernel.shape)), spec)


_shared_conv_im2col_kernel_grad = with_tangent_lowering(
    _shared_conv, _shared_conv, kernel_tangent=_shared_kernel_im2col
)


def shared_conv_matmul_kernel_grad(
    inputs: jax.Array, kernel: jax.Array, spec: ConvSpec, feature_group_count: int
) -> jax.Array:
    """:func:`shared_conv` whose kernel derivative is the ``im2col`` contraction, not XLA's conv.

    Inside a ``lax.scan`` XLA:CPU's kernel-gradient conv is very slow: BranchMixConv's rematerialised
    scan over 8 branches (B128, 3 -> 32 channels, 32x32) took 5.0 s for its gradient with it and 0.32 s
    with this (jax 0.10.2, 2 cores). Costs ``prod(kernel_size)`` times the input in patches.
    """
    spec = dataclasses.replace(spec, feature_group_count=feature_group_count)
    return _shared_conv_im2col_kernel_grad(inputs, kernel, spec)
