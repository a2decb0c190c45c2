"""The ``im2col`` lowering: per-sample convolution as matmuls of input patches with the kernels.

The ``prod(kernel_size)`` shifted views of the padded input (the patches) are contracted with each
sample's kernel. Forward and both gradients are matmuls, the gradients far faster on CPU than autodiff
through a conv's. Large per-sample matmuls (G = 1) run two samples a step (a ``lax.map`` of matmuls
batched over 2; a matmul batched over many large samples is several times slower: ``benchmarks/xla_floor.py``,
``docs/results/xla_floor_cpu.md``, per-sample and batched matmul columns, 2d-c); small ones
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

    Tap-major (index ``tap * C + c``). The tap views concatenated on the channel axis (faster on XLA:CPU
    than stacking on a new axis and reshaping, in a one-process probe).
    """
    views = tap_views(inputs, kernel_size, spec, first_spatial=1)
    return jnp.concatenate(views, axis=-1) if len(views) > 1 else views[0]


def _contract_kwargs(spec: ConvSpec) -> dict[str, Any]:
    return dict(precision=spec.precision, preferred_element_type=spec.preferred_element_type)


def conv_im2col_sample(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """One sample's patches contracted with its kernel: ``(*S, C), (*k, C // G, O) -> (*out, O)``.

    Unbatched, so a caller picks the batching: XLA:CPU hands an unbatched matmul to its fast GEMM and a
    matmul batched over many samples to a path several times slower for the same FLOPs (a one-process
    probe, one 8192x2304x256 matmul against 128 of 64x2304x256; ``xla_floor_cpu.md``'s per-sample and
    batched matmul columns compare the two on the benchmark's shapes).
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
    instead cost more than the convolution (a one-process probe at 1d-b: B128, 128 channels, 1-D k5).
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
    patches over their major axis instead, which XLA:CPU ran markedly slower (a one-process probe of the
    matmuls alone on ready-made patches: B64, 64 -> 64 channels, 32x32, 3x3, two samples a step).
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


# Patches of one chunk are kept around this size so they stay in a core's L2 cache: in a one-process probe,
# chunks of about a core's L2 size up to a few times it were fastest for 1-D, 2-D and 3-D shapes.
_CHUNK_BYTES = 2 * 1024 * 1024

# From this many multiply-adds per sample (G = 1), a few samples a step beat cache-sized batched chunks on
# XLA:CPU (a one-process probe): one sample a step took about half the time on samples well above this
# size, was level with the chunks around it, and slower on tiny samples, where the loop's per-step cost
# dominates.
PER_SAMPLE_MATMUL_MACS = 1 << 20

# How many such samples a step. Two rather than one: faster on 2d-a (forward and forward + kernel
# gradient), 3d-a (channels-last forward), 1d-a (fwd+bwd) and 1d-b (forward); within noise on 2d-b, 2d-c and
# the kernel-mixing conv (B64, 64 channels, 32x32), except its channels-last fwd+bwd, where one was faster
# before that path took the reoriented kernel gradient below. Four were slower again on 3d-a, 2d-c and the
# kernel-mixing conv. Fewer, cheaper loop steps, each spread over the CPU's threads. Set by one-process
# probes (both layouts; fwd, fwd+bwd and fwd + kernel gradient) on benchmarks/per_sample_conv.py's shapes.
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

# From this many output positions per sample the reoriented kernel gradient paid (channels last, G = 1,
# new against old in one process, two runs): faster in fwd + kernel gradient and fwd+bwd at B64, 64 -> 64
# channels, 32x32, 3x3, in fwd+bwd at 3d-a (512 positions) and, slightly, at 1d-a (128); at 32-64 positions
# (1d-b, 2d-b, 2d-c) level or slower, so those keep one loop. In those shapes many positions came with 32-64
# channels and few with 128-256, so the rule cannot tell which of the two decides; grouped convs were not
# tried and keep plain autodiff.
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
    scan over 8 branches (B128, 3 -> 32 channels, 32x32) took over an order of magnitude longer for its
    gradient with it than with this (a one-process probe; ``benchmarks/branch_mix.py`` times the result,
    ``docs/results/branch_mix_cpu.md``, remat column). Costs ``prod(kernel_size)`` times the input in
    patches.
    """
    spec = dataclasses.replace(spec, feature_group_count=feature_group_count)
    return _shared_conv_im2col_kernel_grad(inputs, kernel, spec)
