"""The ``direct`` lowering: XLA's own convolution per sample, a few samples a ``lax.map`` step.

Values only; :func:`conv_direct_method` takes the derivatives from ``im2col`` (a custom JVP). A 2-D conv
with unit stride along its first spatial dim computes a few extra output rows (:func:`direct_extra_rows`),
so that XLA:CPU runs it with its own convolution rather than YNNPACK, which was slower on these convs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

# ``im2col.reorients_kernel_grad`` is looked up on the module at call time, so a test patching it there
# reaches ``direct`` too (a name imported from it would not).
from jdynconv._lowering import im2col
from jdynconv._lowering.canonical import ConvSpec, Lowering, output_spatial_shape, shared_conv
from jdynconv._lowering.im2col import (
    conv_im2col_chunked,
    conv_im2col_chunked_channels_first,
    conv_im2col_chunked_kernel_tangent,
)
from jdynconv._lowering.tangent import with_tangent_lowering

# Samples a step of the ``direct`` lowering's ``lax.map``, each its own conv in the step's body. Of 2, 4, 8
# and 16 a step (a one-process probe, channels last, forward), 8 was fastest or level with the best on 2d-a
# and 1d-b and close to the best on the kernel-mixing conv (B64, 64 -> 64, 32x32); one a step (``scan``) was
# slower than 8. Independent convs in one step are what XLA:CPU spreads over its threads.
_DIRECT_SAMPLES_PER_STEP = 8

# XLA:CPU (jax 0.10.2) hands a 2-D NHWC convolution to YNNPACK unless, among other things, its output is
# larger than its input along a spatial dim (xla/backends/cpu/ynn_support.cc, IsConvolutionOpSupportedByYnn;
# a workaround there, b/476207717). On these per-sample convs YNNPACK ran slower than XLA's own (Eigen)
# convolution (a one-process probe: forward, 8 a step, on 2d-a, 2d-c and the kernel-mixing conv). So a 2-D
# conv with unit stride along its first spatial dim computes enough extra output rows to be larger than its
# input, and drops them, unless that would add more than 1 / _MAX_EXTRA_ROWS_SHARE of the work. Correct
# either way; only the library XLA picks depends on it.
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
    channels-first conv per sample ran an order of magnitude or more slower in a one-process probe), and
    transposing the whole batch cost more than the convolution in another (see
    :func:`im2col.conv_im2col_sample_channels_first`).
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
    is a convolution XLA:CPU ran well over an order of magnitude slower than ``im2col``'s in a one-process
    probe, so :func:`conv_direct_method` takes derivatives from ``im2col``)."""
    return _map_in_steps(conv_direct_sample, inputs, kernels, spec)


def conv_direct_channels_first(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """:func:`conv_direct` on PyTorch-layout ``(B, C, *S)``, ``(B, O, C // G, *k)``; ``(B, O, *out)`` out."""
    return _map_in_steps(conv_direct_sample_channels_first, inputs, kernels, spec)


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
    (its kernel gradient reoriented where :func:`im2col.reorients_kernel_grad` says so)."""
    if im2col.reorients_kernel_grad(inputs, kernels, spec):
        return conv_direct_reoriented_kernel_grad(inputs, kernels, spec)
    return conv_direct_im2col_grad(inputs, kernels, spec)
