"""The ways to lower a per-sample convolution to XLA, all computing the same function.

Every lowering takes canonical arguments: channels-last ``inputs`` ``(B, *spatial, C_in)``, kernels
``(B, *kernel_size, C_in // G, C_out)`` and a :class:`ConvSpec` with explicit pads, and returns
``(B, *out_spatial, C_out)`` without bias. ``CHANNELS_FIRST_FORMS`` maps a lowering to its form taking
and returning PyTorch's layout (``(B, C_in, *spatial)``, ``(B, C_out, C_in // G, *kernel_size)``),
where it has one.

* ``vmap``: ``jax.vmap`` over ``lax.conv_general_dilated``, the reference semantics. JAX batches it
  into one grouped conv; its kernel gradient is a ``batch_group_count = B`` conv, which XLA:CPU
  expands with a mask, so it gets slower with B (measured 50x-300x PyTorch on 2 CPU cores).
* ``grouped``: the PyTorch trick written out (batch folded into channels, ``feature_group_count =
  B * G``). The same program as ``vmap`` after batching, kept because it is what cuDNN is fast at.
* ``scan``: ``lax.map`` over the batch of an ordinary single-kernel conv (XLA:CPU's direct
  convolution). Its forward is close to ``im2col``'s, a little faster on some small-channel shapes;
  its backward is slow.
* ``im2col``: gather the ``prod(kernel_size)`` shifted views of the padded input and contract them
  with the kernels. Forward and both gradients are matmuls, so its fwd+bwd is the fastest on CPU.
  Large per-sample matmuls (G = 1) run two samples a step (a ``lax.map`` of matmuls batched over 2);
  a matmul batched over many large samples ran ~3.8x slower at 2d-c-like sizes; small ones run in
  batched chunks sized so each chunk's patches stay in cache. When the batch is split, patches are recomputed
  in the backward pass. Channels last, when the batch is split, G = 1 and a sample has at least 128 output
  positions, the kernel gradient is contracted from channel-major patches (a custom JVP,
  :func:`conv_im2col_method`), the orientation XLA:CPU ran faster there.
* ``hybrid``: values from ``grouped``, derivatives from ``im2col`` (a custom JVP), for backends whose
  grouped conv is fast but whose batch-group kernel gradient is not (GPU).
* ``auto``: see :func:`choose_lowering`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jdynconv._checks import Pads, conv_output_shape


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """Static, canonical convolution hyper-parameters (hashable, so usable as a nondiff argument)."""

    strides: tuple[int, ...]
    pads: Pads
    kernel_dilation: tuple[int, ...]
    input_dilation: tuple[int, ...]
    feature_group_count: int
    precision: Any = None
    preferred_element_type: Any = None


def output_spatial_shape(spatial: Sequence[int], kernel_size: Sequence[int], spec: ConvSpec) -> tuple[int, ...]:
    return conv_output_shape(
        spatial,
        kernel_size,
        strides=spec.strides,
        pads=spec.pads,
        kernel_dilation=spec.kernel_dilation,
        input_dilation=spec.input_dilation,
    )


Lowering = Callable[[jax.Array, jax.Array, ConvSpec], jax.Array]


def _channels_last_dimension_numbers(num_spatial: int) -> lax.ConvDimensionNumbers:
    spatial = tuple(range(1, num_spatial + 1))
    lhs = (0, num_spatial + 1, *spatial)
    rhs = (num_spatial + 1, num_spatial, *range(num_spatial))
    return lax.ConvDimensionNumbers(lhs_spec=lhs, rhs_spec=rhs, out_spec=lhs)


def shared_conv(inputs: jax.Array, kernel: jax.Array, spec: ConvSpec, feature_group_count: int) -> jax.Array:
    """``lax.conv_general_dilated`` in channels-last layout with one kernel for the whole batch.

    Input dilation is applied as an explicit interior pad rather than ``lhs_dilation``: with jax
    0.10.2, XLA:CPU aborts the process (algebraic_simplifier CHECK "Window dimensions do not match
    RHS shape") compiling the input gradient of some strided 2-D/3-D convs with ``lhs_dilation``, e.g.
    spatial (3, 6), kernel (2, 3), strides 3, padding ((1, 0), (2, 2)), lhs_dilation (1, 2). The
    gradient of a pad is a strided slice, which compiles everywhere.
    """
    if any(d > 1 for d in spec.input_dilation):
        interior = [(0, 0, 0), *((0, 0, d - 1) for d in spec.input_dilation), (0, 0, 0)]
        inputs = lax.pad(inputs, jnp.zeros((), inputs.dtype), interior)
    return lax.conv_general_dilated(
        inputs,
        kernel,
        window_strides=spec.strides,
        padding=spec.pads,
        rhs_dilation=spec.kernel_dilation,
        dimension_numbers=_channels_last_dimension_numbers(inputs.ndim - 2),
        feature_group_count=feature_group_count,
        precision=spec.precision,
        preferred_element_type=spec.preferred_element_type,
    )


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
_PER_SAMPLE_MATMUL_MACS = 1 << 20

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
    if macs_per_sample >= _PER_SAMPLE_MATMUL_MACS:
        return max(1, min(batch, _LARGE_MATMUL_SAMPLES_PER_STEP))
    return chunk_size(batch, patch_bytes_per_sample)


def _im2col_chunk(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec, *, channels_first: bool) -> int:
    """:func:`im2col_chunk_size` for these arguments."""
    kernel_size = kernels.shape[3:] if channels_first else kernels.shape[1:-2]
    spatial = inputs.shape[2:] if channels_first else inputs.shape[1:-1]
    in_channels = inputs.shape[1] if channels_first else inputs.shape[-1]
    group_in, out_channels = (kernels.shape[2], kernels.shape[1]) if channels_first else kernels.shape[-2:]
    patch_size = math.prod(output_spatial_shape(spatial, kernel_size, spec)) * math.prod(kernel_size)
    # Measured for G == 1 only: a grouped contraction is a matmul batched over the groups even per sample.
    macs = patch_size * group_in * out_channels if spec.feature_group_count == 1 else 0
    return im2col_chunk_size(inputs.shape[0], macs, patch_size * in_channels * inputs.dtype.itemsize)


def _map_over_chunks(
    sample_fn: Lowering, inputs: jax.Array, kernels: jax.Array, spec: ConvSpec, *, channels_first: bool
) -> jax.Array:
    """``sample_fn`` (one sample's conv) over the batch in chunks; patches are recomputed, not stored."""
    chunk = _im2col_chunk(inputs, kernels, spec, channels_first=channels_first)
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


def conv_scan(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """``lax.map`` over the batch of one ordinary (single-kernel) convolution per sample."""

    def one_sample(pair: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, w = pair
        return shared_conv(x[None], w, spec, spec.feature_group_count)[0]

    return lax.map(one_sample, (inputs, kernels))


def with_tangent_lowering(primal: Lowering, tangent: Lowering, kernel_tangent: Lowering | None = None) -> Lowering:
    """Computes values with ``primal`` and derivatives with ``tangent`` (same function, other program).

    A custom JVP rather than a custom VJP, so forward mode, ``jax.hessian`` and nested ``jax.grad``
    keep working: the tangent ``tangent(d_inputs, kernels) + kernel_tangent(inputs, d_kernels)`` is
    linear, and JAX transposes it into the reverse pass. ``kernel_tangent`` defaults to ``tangent``.
    """
    kernel_tangent = tangent if kernel_tangent is None else kernel_tangent

    @functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
    def conv(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
        return primal(inputs, kernels, spec)

    @functools.partial(conv.defjvp, symbolic_zeros=True)
    def conv_jvp(
        spec: ConvSpec, primals: tuple[jax.Array, jax.Array], tangents: tuple[Any, Any]
    ) -> tuple[jax.Array, jax.Array]:
        inputs, kernels = primals
        d_inputs, d_kernels = tangents
        out = conv(inputs, kernels, spec)
        terms = []
        if not isinstance(d_inputs, SymbolicZero):
            terms.append(tangent(d_inputs, kernels, spec))
        if not isinstance(d_kernels, SymbolicZero):
            terms.append(kernel_tangent(inputs, d_kernels, spec))
        return out, functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(out)

    return conv


# cuDNN's grouped forward, matmul derivatives: the accelerator choice.
conv_grouped_im2col_grad = with_tangent_lowering(conv_grouped, conv_im2col)

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


LOWERINGS: dict[str, Lowering] = {
    "vmap": conv_vmap,
    "grouped": conv_grouped,
    "scan": conv_scan,
    "im2col": conv_im2col_method,
    "hybrid": conv_grouped_im2col_grad,
}


# Lowerings with a native PyTorch-layout form, which spares ``per_sample_conv`` the transposes.
CHANNELS_FIRST_FORMS: dict[Lowering, Lowering] = {conv_im2col_method: conv_im2col_chunked_channels_first}


def choose_lowering(backend: str) -> Lowering:
    """The ``method="auto"`` rule.

    * CPU: ``im2col``. On 2 cores (benchmarks/per_sample_conv.py, 2026-11-21) it was the fastest
      fwd+bwd on five of seven benchmark shapes and ``hybrid`` on the other two, the small seed and
      1d-a shapes (0.041 vs 0.058 ms, 3.9 vs 4.2 ms); the direct-conv lowerings' kernel gradient is
      XLA:CPU's masked batch-group conv, 10x-100x slower. It was the fastest forward on all but 2d-a,
      where ``scan`` was (11 vs 15 ms).
    * GPU/TPU: values from ``grouped`` (one cuDNN/TPU grouped conv), derivatives from ``im2col``,
      which avoids the batch-group kernel gradient reported slow on GPU (jax issue 13800).
    """
    if backend == "cpu":
        return conv_im2col_method
    return conv_grouped_im2col_grad


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def shared_conv_matmul_kernel_grad(
    inputs: jax.Array, kernel: jax.Array, spec: ConvSpec, feature_group_count: int
) -> jax.Array:
    """:func:`shared_conv` whose kernel derivative is the ``im2col`` contraction, not XLA's conv.

    Inside a ``lax.scan`` XLA:CPU's kernel-gradient conv is very slow: BranchMixConv's rematerialised
    scan over 8 branches (B128, 3 -> 32 channels, 32x32) took 5.0 s for its gradient with it and 0.32 s
    with this (jax 0.10.2, 2 cores). Costs ``prod(kernel_size)`` times the input in patches.
    """
    return shared_conv(inputs, kernel, spec, feature_group_count)


@functools.partial(shared_conv_matmul_kernel_grad.defjvp, symbolic_zeros=True)
def _shared_conv_matmul_kernel_grad_jvp(
    spec: ConvSpec, feature_group_count: int, primals: tuple[jax.Array, jax.Array], tangents: tuple[Any, Any]
) -> tuple[jax.Array, jax.Array]:
    inputs, kernel = primals
    d_inputs, d_kernel = tangents
    out = shared_conv(inputs, kernel, spec, feature_group_count)
    terms = []
    if not isinstance(d_inputs, SymbolicZero):
        terms.append(shared_conv(d_inputs, kernel, spec, feature_group_count))
    if not isinstance(d_kernel, SymbolicZero):
        # The same kernel for every sample: im2col per sample; its transpose sums the batch's patches^T @ g.
        per_sample = jnp.broadcast_to(d_kernel, (inputs.shape[0], *d_kernel.shape))
        terms.append(
            conv_im2col(inputs, per_sample, dataclasses.replace(spec, feature_group_count=feature_group_count))
        )
    return out, functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(out)
