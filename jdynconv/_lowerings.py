"""The ways to lower a per-sample convolution to XLA, all computing the same function.

Every lowering takes canonical arguments: channels-last ``inputs`` ``(B, *spatial, C_in)``, kernels
``(B, *kernel_size, C_in // G, C_out)`` and a :class:`ConvSpec` with explicit pads, and returns
``(B, *out_spatial, C_out)`` without bias.

* ``vmap``: ``jax.vmap`` over ``lax.conv_general_dilated``, the reference semantics. JAX batches it
  into one grouped conv; its kernel gradient is a ``batch_group_count = B`` conv, which XLA:CPU
  expands with a mask, so it gets slower with B (measured 50x-300x PyTorch on 2 CPU cores).
* ``grouped``: the PyTorch trick written out (batch folded into channels, ``feature_group_count =
  B * G``). The same program as ``vmap`` after batching, kept because it is what cuDNN is fast at.
* ``scan``: ``lax.map`` over the batch of an ordinary single-kernel conv. XLA:CPU runs those with its
  fast direct convolution, so this is the quickest CPU forward for 1-D and 2-D; its backward is slow.
* ``im2col``: gather the ``prod(kernel_size)`` shifted views of the padded input and contract them
  with the kernels in one batched matmul, over chunks of the batch (``lax.map``) sized so each
  chunk's patches stay in cache, rematerialised in the backward pass. Forward and both gradients are
  batched matmuls, so its fwd+bwd is the fastest on CPU.
* ``hybrid``: values from ``grouped``, derivatives from ``im2col`` (a custom JVP), for backends whose
  grouped conv is fast but whose batch-group kernel gradient is not (GPU).
* ``auto``: see :func:`choose_lowering`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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


def extract_patches(inputs: jax.Array, kernel_size: tuple[int, ...], spec: ConvSpec) -> jax.Array:
    """The receptive field of every output position: ``(B, *S, C) -> (B, *out, prod(kernel_size) * C)``.

    Tap-major (index ``tap * C + c``, taps in row-major kernel order). One strided slice per kernel
    tap of the dilated, padded input, concatenated on the channel axis (measured 1.6x faster on
    XLA:CPU than stacking on a new axis and reshaping). A static loop over taps: the program grows
    with the kernel's size, never with the batch.
    """
    batch, *spatial, channels = inputs.shape
    zero = jnp.zeros((), inputs.dtype)
    padded = lax.pad(
        inputs,
        zero,
        [(0, 0, 0), *((lo, hi, d - 1) for (lo, hi), d in zip(spec.pads, spec.input_dilation, strict=True)), (0, 0, 0)],
    )
    out_shape = output_spatial_shape(spatial, kernel_size, spec)
    taps = []
    for tap in itertools.product(*(range(k) for k in kernel_size)):
        start = [t * kd for t, kd in zip(tap, spec.kernel_dilation, strict=True)]
        limit = [st + (o - 1) * s + 1 for st, o, s in zip(start, out_shape, spec.strides, strict=True)]
        taps.append(lax.slice(padded, (0, *start, 0), (batch, *limit, channels), (1, *spec.strides, 1)))
    return jnp.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0]


def conv_im2col(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """Patches of the input contracted with the per-sample kernels in one batched matmul."""
    batch = inputs.shape[0]
    *kernel_size, group_in, out_channels = kernels.shape[1:]
    groups = spec.feature_group_count
    patches = extract_patches(inputs, tuple(kernel_size), spec)
    out_spatial = patches.shape[1:-1]
    taps = int(np.prod(kernel_size))
    contract = dict(precision=spec.precision, preferred_element_type=spec.preferred_element_type)
    if groups == 1:
        # (B, P, T * C) @ (B, T * C, O): a plain batched matmul, the fastest form on XLA:CPU.
        flat_patches = patches.reshape(batch, -1, taps * group_in)
        out = jnp.matmul(flat_patches, kernels.reshape(batch, taps * group_in, out_channels), **contract)
    else:
        # Output channel o belongs to group o // (C_out / G), as in lax.conv_general_dilated.
        grouped_patches = patches.reshape(batch, -1, taps, groups, group_in)
        grouped_kernels = kernels.reshape(batch, taps, group_in, groups, out_channels // groups)
        out = jnp.einsum("bptgc,btcgo->bpgo", grouped_patches, grouped_kernels, **contract)
    return out.reshape(batch, *out_spatial, out_channels)


# Patches of one chunk are kept around this size so they stay in a core's L2 cache; measured on 2
# CPU cores (1 MiB L2 each): 1 to 4 MiB chunks were fastest for 1-D, 2-D and 3-D shapes.
_CHUNK_BYTES = 2 * 1024 * 1024


def chunk_size(batch: int, bytes_per_sample: int) -> int:
    """How many samples make a chunk of about ``_CHUNK_BYTES`` of intermediates (at least 1)."""
    return int(max(1, min(batch, _CHUNK_BYTES // max(bytes_per_sample, 1))))


def im2col_chunk_size(
    inputs_shape: tuple[int, ...], kernels_shape: tuple[int, ...], out_size: int, itemsize: int
) -> int:
    """How many samples of the batch ``conv_im2col_chunked`` processes at once."""
    taps = int(np.prod(kernels_shape[1:-2]))
    return chunk_size(inputs_shape[0], out_size * taps * inputs_shape[-1] * itemsize)


def conv_im2col_chunked(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """``conv_im2col`` over chunks of the batch; each chunk's patches are recomputed, not stored."""
    out_size = int(np.prod(output_spatial_shape(inputs.shape[1:-1], kernels.shape[1:-2], spec)))
    chunk = im2col_chunk_size(inputs.shape, kernels.shape, out_size, inputs.dtype.itemsize)
    if chunk >= inputs.shape[0]:
        return conv_im2col(inputs, kernels, spec)
    body = jax.checkpoint(lambda pair: conv_im2col(pair[0][None], pair[1][None], spec)[0])
    return lax.map(body, (inputs, kernels), batch_size=chunk)


def conv_scan(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """``lax.map`` over the batch of one ordinary (single-kernel) convolution per sample."""

    def one_sample(pair: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, w = pair
        return shared_conv(x[None], w, spec, spec.feature_group_count)[0]

    return lax.map(one_sample, (inputs, kernels))


def with_tangent_lowering(primal: Lowering, tangent: Lowering) -> Lowering:
    """Computes values with ``primal`` and derivatives with ``tangent`` (same function, other program).

    A custom JVP rather than a custom VJP, so forward mode, ``jax.hessian`` and nested ``jax.grad``
    keep working: the tangent ``tangent(d_inputs, kernels) + tangent(inputs, d_kernels)`` is linear,
    and JAX transposes it into the reverse pass.
    """

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
            terms.append(tangent(inputs, d_kernels, spec))
        return out, functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(out)

    return conv


# cuDNN's grouped forward, matmul derivatives: the accelerator choice.
conv_grouped_im2col_grad = with_tangent_lowering(conv_grouped, conv_im2col)

LOWERINGS: dict[str, Lowering] = {
    "vmap": conv_vmap,
    "grouped": conv_grouped,
    "scan": conv_scan,
    "im2col": conv_im2col_chunked,
    "hybrid": conv_grouped_im2col_grad,
}


def choose_lowering(backend: str) -> Lowering:
    """The ``method="auto"`` rule.

    * CPU: ``im2col``. On 2 cores it was the fastest fwd+bwd on every benchmark shape (the direct-conv
      lowerings' kernel gradient is XLA:CPU's masked batch-group conv, 10x-100x slower) and within
      0.8x-1.4x of the fastest forward (``scan``) where it was not itself the fastest.
    * GPU/TPU: values from ``grouped`` (one cuDNN/TPU grouped conv), derivatives from ``im2col``,
      which avoids the batch-group kernel gradient reported slow on GPU (jax issue 13800).
    """
    if backend == "cpu":
        return conv_im2col_chunked
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
