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
  with the kernels. Forward and both gradients are matmuls, its gradients far faster on CPU than
  autodiff through a conv's.
  Large per-sample matmuls (G = 1) run two samples a step (a ``lax.map`` of matmuls batched over 2);
  a matmul batched over many large samples ran ~3.8x slower at 2d-c-like sizes; small ones run in
  batched chunks sized so each chunk's patches stay in cache. When the batch is split, patches are recomputed
  in the backward pass. Channels last, when the batch is split, G = 1 and a sample has at least 128 output
  positions, the kernel gradient is contracted from channel-major patches (a custom JVP,
  :func:`conv_im2col_method`), the orientation XLA:CPU ran faster there.
* ``direct``: values from XLA's own convolution per sample, eight samples a ``lax.map`` step (each its own
  conv, so XLA:CPU runs them side by side), 2-D ones with unit stride along their first spatial dim kept
  from YNNPACK (:func:`conv_direct_sample`); derivatives from ``im2col`` (a custom JVP). The fastest CPU
  forward measured where channels are few.
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


@dataclasses.dataclass(frozen=True)
class _Dims:
    """The sizes a lowering rule looks at, read from batched arguments in either layout."""

    spatial: tuple[int, ...]
    kernel_size: tuple[int, ...]
    in_channels: int
    group_in: int
    out_channels: int

    @classmethod
    def of(cls, inputs: jax.Array, kernels: jax.Array, *, channels_first: bool) -> _Dims:
        if channels_first:
            return cls(inputs.shape[2:], kernels.shape[3:], inputs.shape[1], kernels.shape[2], kernels.shape[1])
        return cls(inputs.shape[1:-1], kernels.shape[1:-2], inputs.shape[-1], *kernels.shape[-2:])

    def patch_size(self, spec: ConvSpec) -> int:
        """Output positions times taps: one sample's patch rows times their taps."""
        return math.prod(output_spatial_shape(self.spatial, self.kernel_size, spec)) * math.prod(self.kernel_size)

    def matmul_macs(self, spec: ConvSpec) -> int:
        """One sample's multiply-adds as one (ungrouped) matmul; 0 for a grouped conv, which im2col contracts as
        a matmul batched over its groups even per sample (its rules were measured for G == 1 only)."""
        return self.patch_size(spec) * self.group_in * self.out_channels if spec.feature_group_count == 1 else 0


def _im2col_chunk(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec, *, channels_first: bool) -> int:
    """:func:`im2col_chunk_size` for these arguments."""
    dims = _Dims.of(inputs, kernels, channels_first=channels_first)
    patch_bytes = dims.patch_size(spec) * dims.in_channels * inputs.dtype.itemsize
    return im2col_chunk_size(inputs.shape[0], dims.matmul_macs(spec), patch_bytes)


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


# Samples a step of the ``direct`` lowering's ``lax.map``, each its own conv in the step's body (2 cores,
# jax 0.10.2, channels last, forward, 2026-11-21; 2, 4, 8 and 16 a step): 2d-a 10.2 / 6.8 / 6.7 / 7.7 ms, the
# kernel-mixing conv (B64, 64 -> 64, 32x32) 23.0 / 29.0 / 24.5 / 26.2 ms, 1d-b 7.5 / 6.1 / 5.6 / 5.7 ms: 8 was
# fastest or within 2% on 2d-a and 1d-b, and within 7% of the best on the kernel-mixing conv. One a step
# (``scan``) was 1.3x-1.6x slower than 8. Independent convs in one step are what XLA:CPU spreads over its
# threads.
_DIRECT_SAMPLES_PER_STEP = 8

# XLA:CPU (jax 0.10.2) hands a 2-D NHWC convolution to YNNPACK unless, among other things, its output is
# larger than its input along a spatial dim (xla/backends/cpu/ynn_support.cc, IsConvolutionOpSupportedByYnn;
# a workaround there, b/476207717). On these per-sample convs YNNPACK ran 1.1x-1.5x slower than XLA's own
# (Eigen) convolution: forward, 8 a step, 2d-a 9.0 vs 6.7 ms, the kernel-mixing conv 35.9 vs 24.5 ms, 2d-c
# 74 vs 65 ms. So a 2-D conv with unit stride along its first spatial dim computes enough extra output rows
# to be larger than its input, and drops them, unless that would add more than 1 / _MAX_EXTRA_ROWS_SHARE
# of the work. Correct either way; only the library XLA picks depends on it.
_MAX_EXTRA_ROWS_SHARE = 8


def direct_extra_rows(spatial: Sequence[int], kernel_size: Sequence[int], spec: ConvSpec) -> int:
    """How many output rows :func:`conv_direct_sample` adds along the first spatial dim (0: none)."""
    if len(spatial) != 2 or spec.strides[0] != 1:
        return 0
    conv_input = [(size - 1) * dilation + 1 for size, dilation in zip(spatial, spec.input_dilation, strict=True)]
    output_rows, output_columns = output_spatial_shape(spatial, kernel_size, spec)  # (shared_conv dilates the input)
    if output_columns > conv_input[1]:  # already larger than the input: YNNPACK declines it as it is
        return 0
    extra = max(0, conv_input[0] - output_rows + 1)
    return extra if extra * _MAX_EXTRA_ROWS_SHARE <= output_rows else 0


def conv_direct_sample(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """One sample's conv as XLA's own convolution: ``(*S, C), (*k, C // G, O) -> (*out, O)``.

    With :func:`direct_extra_rows` more output rows (more high padding, dropped after), so that XLA:CPU
    keeps a 2-D conv to itself rather than handing it to YNNPACK.
    """
    extra = direct_extra_rows(inputs.shape[:-1], kernels.shape[:-2], spec)
    if extra:
        (low, high), *rest = spec.pads
        spec = dataclasses.replace(spec, pads=((low, high + extra), *rest))
    out = shared_conv(inputs[None], kernels, spec, spec.feature_group_count)[0]
    return out[: out.shape[0] - extra] if extra else out


def conv_direct_sample_channels_first(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """:func:`conv_direct_sample` on one PyTorch-layout sample: ``(C, *S), (O, C // G, *k) -> (O, *out)``.

    Transposed one sample at a time, in the loop: XLA:CPU's convolution is fast channels last only (a
    channels-first conv per sample ran 15x-70x slower), and transposing the whole batch cost more than
    the convolution in an earlier measurement (see :func:`conv_im2col_sample_channels_first`).
    """
    out = conv_direct_sample(jnp.moveaxis(inputs, 0, -1), jnp.moveaxis(kernels, (0, 1), (-1, -2)), spec)
    return jnp.moveaxis(out, -1, 0)


def _map_in_steps(sample_fn: Lowering, inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """``sample_fn`` over a batch of at least one sample, :data:`_DIRECT_SAMPLES_PER_STEP` samples a
    ``lax.map`` step, each its own call in the step's body; a ragged last few samples run after the loop."""

    def step(pair: tuple[jax.Array, jax.Array]) -> jax.Array:
        xs, ws = pair
        return jnp.stack([sample_fn(xs[i], ws[i], spec) for i in range(xs.shape[0])])

    batch, per_step = inputs.shape[0], _DIRECT_SAMPLES_PER_STEP
    looped = batch - batch % per_step
    parts = []
    if looped:
        steps = (a[:looped].reshape(looped // per_step, per_step, *a.shape[1:]) for a in (inputs, kernels))
        out = lax.map(step, tuple(steps))
        parts.append(out.reshape(looped, *out.shape[2:]))
    if looped < batch:
        parts.append(step((inputs[looped:], kernels[looped:])))
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


def conv_direct(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """XLA's own convolution per sample, a few samples a step (values only: its autodiff kernel gradient
    is a convolution XLA:CPU ran 37x-69x slower than ``im2col``'s, so :func:`conv_direct_method` takes
    derivatives from ``im2col``)."""
    return _map_in_steps(conv_direct_sample, inputs, kernels, spec)


def conv_direct_channels_first(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """:func:`conv_direct` on PyTorch-layout ``(B, C, *S)``, ``(B, O, C // G, *k)``; ``(B, O, *out)`` out."""
    return _map_in_steps(conv_direct_sample_channels_first, inputs, kernels, spec)


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


# XLA's convolution forward, im2col's derivatives, in either layout; the kernel derivative as im2col's own.
conv_direct_im2col_grad = with_tangent_lowering(conv_direct, conv_im2col_chunked)
conv_direct_reoriented_kernel_grad = with_tangent_lowering(
    conv_direct, conv_im2col_chunked, kernel_tangent=conv_im2col_chunked_kernel_tangent
)
conv_direct_channels_first_im2col_grad = with_tangent_lowering(
    conv_direct_channels_first, conv_im2col_chunked_channels_first
)


def conv_direct_method(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """The ``direct`` method (channels last): values from :func:`conv_direct`, derivatives from ``im2col``
    (its kernel gradient reoriented where :func:`reorients_kernel_grad` says so)."""
    if reorients_kernel_grad(inputs, kernels, spec):
        return conv_direct_reoriented_kernel_grad(inputs, kernels, spec)
    return conv_direct_im2col_grad(inputs, kernels, spec)


# The CPU rule's bounds (2 cores, jax 0.10.2, 2026-11-21, ``direct`` / ``im2col`` in one process, float32,
# G = 1, value and gradients of sum(y * g)). Channels first, where direct transposes each sample: 2d-a 0.92,
# kernel-mixing conv 0.90, 1d-a 0.86 (32-64 channels); with 128-256 channels 1d-b 1.01, 2d-b 1.08, 2d-c 1.23,
# forward 1.39-1.94. Channels last: 2d-a 0.90, the kernel-mixing conv 0.86, 1d-a 0.95; with 128-256 channels
# 1d-b 0.89, 2d-b 1.04, 2d-c 1.14. One bound serves both layouts and follows the channels-first figures,
# so channels-last 1d-b stays on im2col though direct was faster there. The large-channel shapes are also
# the ones with few output positions (32-64) and, but for 2d-c, stride 2: the figures cannot tell which of
# these decides. 3-D convs were 4x-7x slower through XLA's convolution than im2col (dense 3d-a-sized conv
# 43 ms vs im2col's per-sample 11 ms). 2-D convs that YNNPACK would take (see :func:`direct_extra_rows`)
# were measured through ``direct`` only at 128 channels (2d-b, stride 2: 1.04 and 1.08 above), so they stay
# on im2col.
_DIRECT_MAX_CHANNELS = 64


def uses_direct(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec, *, channels_first: bool) -> bool:
    """Whether ``auto`` on CPU takes ``direct`` rather than ``im2col``: float32, 1-D, or 2-D with the extra
    rows that keep it from YNNPACK, G = 1, at most :data:`_DIRECT_MAX_CHANNELS` channels in and out, and a
    sample large enough that ``im2col`` would loop over samples too (:data:`_PER_SAMPLE_MATMUL_MACS`)."""
    dims = _Dims.of(inputs, kernels, channels_first=channels_first)
    kept_from_ynnpack = len(dims.spatial) == 1 or direct_extra_rows(dims.spatial, dims.kernel_size, spec) > 0
    return (
        inputs.dtype == jnp.float32
        and kept_from_ynnpack  # 1-D, or 2-D with the extra rows: never 3-D
        and max(dims.in_channels, dims.out_channels) <= _DIRECT_MAX_CHANNELS
        and dims.matmul_macs(spec) >= _PER_SAMPLE_MATMUL_MACS
    )


def conv_cpu_auto(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """``auto`` on CPU, channels last: ``direct`` where :func:`uses_direct` says so, else ``im2col``."""
    if uses_direct(inputs, kernels, spec, channels_first=False):
        return conv_direct_method(inputs, kernels, spec)
    return conv_im2col_method(inputs, kernels, spec)


def conv_cpu_auto_channels_first(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """:func:`conv_cpu_auto` on PyTorch-layout arguments, each method in its channels-first form."""
    if uses_direct(inputs, kernels, spec, channels_first=True):
        return conv_direct_channels_first_im2col_grad(inputs, kernels, spec)
    return conv_im2col_chunked_channels_first(inputs, kernels, spec)


LOWERINGS: dict[str, Lowering] = {
    "vmap": conv_vmap,
    "grouped": conv_grouped,
    "scan": conv_scan,
    "im2col": conv_im2col_method,
    "direct": conv_direct_method,
    "hybrid": conv_grouped_im2col_grad,
}


# Lowerings with a native PyTorch-layout form, which spares ``per_sample_conv`` the transposes.
CHANNELS_FIRST_FORMS: dict[Lowering, Lowering] = {
    conv_im2col_method: conv_im2col_chunked_channels_first,
    conv_direct_method: conv_direct_channels_first_im2col_grad,
    conv_cpu_auto: conv_cpu_auto_channels_first,
}


def choose_lowering(backend: str) -> Lowering:
    """The ``method="auto"`` rule.

    * CPU: :func:`conv_cpu_auto`: ``direct`` for float32 1-D convs, and 2-D ones it can keep from YNNPACK,
      with G = 1, at most 64 channels and a sample's matmul of at least 2^20 multiply-adds
      (:func:`uses_direct`), else ``im2col``. Measured on 2 cores (figures at
      :data:`_DIRECT_MAX_CHANNELS`, benchmarks/per_sample_conv.py). Both take their derivatives from
      im2col's matmuls: the direct-conv lowerings' autodiff kernel gradient is XLA:CPU's masked
      batch-group conv (``vmap``, ``grouped``) or a per-sample conv (``scan``), 10x-100x slower.
    * GPU/TPU: values from ``grouped`` (one cuDNN/TPU grouped conv), derivatives from ``im2col``,
      which avoids the batch-group kernel gradient reported slow on GPU (jax issue 13800).
    """
    if backend == "cpu":
        return conv_cpu_auto
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
