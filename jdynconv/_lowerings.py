"""The ways to lower a per-sample convolution to XLA, all computing the same function, and ``auto``'s rule.

Every lowering takes and returns the canonical arrays of :mod:`jdynconv._conv_spec`. ``CHANNELS_FIRST_FORMS``
maps a lowering to its form taking and returning PyTorch's layout (``(B, C_in, *spatial)``,
``(B, C_out, C_in // G, *kernel_size)``), where it has one.

* ``vmap``: ``jax.vmap`` over ``lax.conv_general_dilated``, the reference semantics. JAX batches it
  into one grouped conv; its kernel gradient is a ``batch_group_count = B`` conv, which XLA:CPU
  expands with a mask, so it gets slower with B (measured 50x-300x PyTorch on 2 CPU cores).
* ``grouped``: the PyTorch trick written out (batch folded into channels, ``feature_group_count =
  B * G``). The same program as ``vmap`` after batching, kept because it is what cuDNN is fast at.
* ``scan``: ``lax.map`` over the batch of an ordinary single-kernel conv (XLA:CPU's direct
  convolution). Its forward is close to ``im2col``'s, a little faster on some small-channel shapes;
  its backward is slow.
* ``im2col``: matmuls of input patches with the kernels, both ways (:mod:`jdynconv._im2col`).
* ``direct``: values from XLA's own convolution per sample, eight samples a ``lax.map`` step (each its own
  conv, so XLA:CPU runs them side by side), 2-D ones with unit stride along their first spatial dim kept
  from YNNPACK (:mod:`jdynconv._direct`); derivatives from ``im2col`` (a custom JVP). The fastest CPU
  forward measured where channels are few.
* ``depthwise``: a broadcast multiply-add per kernel tap (:mod:`jdynconv._depthwise`), plain autodiff; for
  depthwise convs (``C_in // G == 1``), correct for any G.
* ``hybrid``: values from ``grouped``, derivatives from ``im2col`` (a custom JVP), for backends whose
  grouped conv is fast but whose batch-group kernel gradient is not (GPU).
* ``auto``: see :func:`choose_lowering`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# The rule's inputs (_direct.direct_extra_rows, _im2col.PER_SAMPLE_MATMUL_MACS) are read from their modules
# at call time, so they stay the ones those modules use.
from jdynconv import _direct, _im2col
from jdynconv._conv_spec import ConvDims, ConvSpec, Lowering, shared_conv
from jdynconv._depthwise import conv_depthwise, conv_depthwise_channels_first
from jdynconv._direct import conv_direct_channels_first_im2col_grad, conv_direct_method
from jdynconv._im2col import conv_im2col, conv_im2col_chunked_channels_first, conv_im2col_method
from jdynconv._tangent_lowering import with_tangent_lowering


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


# The CPU rule's bounds (2 cores, jax 0.10.2, 2026-11-21, ``direct`` / ``im2col`` in one process, float32,
# G = 1, value and gradients of sum(y * g)). Channels first, where direct transposes each sample: 2d-a 0.92,
# kernel-mixing conv 0.90, 1d-a 0.86 (32-64 channels); with 128-256 channels 1d-b 1.01, 2d-b 1.08, 2d-c 1.23,
# forward 1.39-1.94. Channels last: 2d-a 0.90, the kernel-mixing conv 0.86, 1d-a 0.95; with 128-256 channels
# 1d-b 0.89, 2d-b 1.04, 2d-c 1.14. One bound serves both layouts and follows the channels-first figures,
# so channels-last 1d-b stays on im2col though direct was faster there. The large-channel shapes are also
# the ones with few output positions (32-64) and, but for 2d-c, stride 2: the figures cannot tell which of
# these decides. 3-D convs were 4x-7x slower through XLA's convolution than im2col (dense 3d-a-sized conv
# 43 ms vs im2col's per-sample 11 ms). 2-D convs that YNNPACK would take (see :func:`_direct.direct_extra_rows`)
# were measured through ``direct`` only at 128 channels (2d-b, stride 2: 1.04 and 1.08 above), so they stay
# on im2col.
_DIRECT_MAX_CHANNELS = 64


def uses_direct(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec, *, channels_first: bool) -> bool:
    """Whether ``auto`` on CPU takes ``direct`` rather than ``im2col``: float32, 1-D, or 2-D with the extra
    rows that keep it from YNNPACK, G = 1, at most :data:`_DIRECT_MAX_CHANNELS` channels in and out, and a
    sample large enough that ``im2col`` would loop over samples too (:data:`_im2col.PER_SAMPLE_MATMUL_MACS`)."""
    dims = ConvDims.of(inputs, kernels, channels_first=channels_first)
    kept_from_ynnpack = len(dims.spatial) == 1 or _direct.direct_extra_rows(dims.spatial, dims.kernel_size, spec) > 0
    return (
        inputs.dtype == jnp.float32
        and kept_from_ynnpack  # 1-D, or 2-D with the extra rows: never 3-D
        and max(dims.in_channels, dims.out_channels) <= _DIRECT_MAX_CHANNELS
        and dims.matmul_macs(spec) >= _im2col.PER_SAMPLE_MATMUL_MACS
    )


def uses_depthwise(inputs: jax.Array, kernels: jax.Array, *, channels_first: bool) -> bool:
    """Whether ``auto`` on CPU takes ``depthwise``: a 2-D depthwise conv, one input channel per group and as
    many outputs as inputs (``C_in == C_out == G``).

    Measured on 2 cores, 2026-11-21, B64, ``depthwise`` / ``im2col`` (what ``auto`` took before), channels
    last / first, one-process probe, medians of 7 rounds: 64 channels 32x32 3x3 fwd 0.49x / 0.30x, fwd+bwd
    0.60x / 0.89x; 7x7 fwd 0.07x / 0.21x, fwd+bwd 0.26x / 0.72x; 128 channels 16x16 3x3 stride 2 fwd
    0.88x / 0.56x, fwd+bwd 0.88x / 0.89x. Left to the other methods because a pass lost against what
    ``auto`` took (medians of 5): 1-D (128 channels, 128 long, k7: fwd+bwd 3.6x channels first), 3-D (B16,
    32 channels 8x8x8, 3x3x3: fwd+bwd 1.46x / 3.4x), a channel multiplier (C_out = 2 C_in: channels-last
    fwd+bwd 3.0x) and one input channel with G = 1 (fwd 3.7x channels last).
    """
    dims = ConvDims.of(inputs, kernels, channels_first=channels_first)
    return len(dims.spatial) == 2 and dims.group_in == 1 and dims.in_channels == dims.out_channels > 1


def conv_cpu_auto(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """``auto`` on CPU, channels last: ``depthwise`` where :func:`uses_depthwise` says so, ``direct`` where
    :func:`uses_direct` does, else ``im2col``."""
    if uses_depthwise(inputs, kernels, channels_first=False):
        return conv_depthwise(inputs, kernels, spec)
    if uses_direct(inputs, kernels, spec, channels_first=False):
        return conv_direct_method(inputs, kernels, spec)
    return conv_im2col_method(inputs, kernels, spec)


def conv_cpu_auto_channels_first(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
    """:func:`conv_cpu_auto` on PyTorch-layout arguments, each method in its channels-first form."""
    if uses_depthwise(inputs, kernels, channels_first=True):
        return conv_depthwise_channels_first(inputs, kernels, spec)
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
    "depthwise": conv_depthwise,
}


# Lowerings with a native PyTorch-layout form, which spares ``per_sample_conv`` the transposes.
CHANNELS_FIRST_FORMS: dict[Lowering, Lowering] = {
    conv_im2col_method: conv_im2col_chunked_channels_first,
    conv_direct_method: conv_direct_channels_first_im2col_grad,
    conv_cpu_auto: conv_cpu_auto_channels_first,
    conv_depthwise: conv_depthwise_channels_first,
}


def choose_lowering(backend: str) -> Lowering:
    """The ``method="auto"`` rule.

    * CPU: :func:`conv_cpu_auto`: ``depthwise`` for 2-D depthwise convs (:func:`uses_depthwise`), ``direct``
      for float32 1-D convs, and 2-D ones it can keep from YNNPACK,
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
