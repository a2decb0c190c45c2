"""``method="auto"``: which lowering :func:`jdynconv.per_sample_conv` takes, by platform and shape.

The CPU bounds come from ``benchmarks/per_sample_conv.py`` (its ``direct``, ``im2col`` and ``depthwise``
columns, ``docs/results/per_sample_conv_cpu.md`` and, with ``--grid depthwise``,
``per_sample_conv_depthwise_cpu.md``); the docs' Performance page explains each rule with those figures.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The rule's inputs (direct.direct_extra_rows, im2col.PER_SAMPLE_MATMUL_MACS) are read from their modules at
# call time, so they stay the ones those modules use (tests monkeypatch them).
from jdynconv._lowering import direct, im2col
from jdynconv._lowering.canonical import ConvDims, ConvSpec, Lowering
from jdynconv._lowering.depthwise import conv_depthwise, conv_depthwise_channels_first
from jdynconv._lowering.direct import conv_direct_channels_first_im2col_grad, conv_direct_method
from jdynconv._lowering.im2col import conv_im2col_chunked_channels_first, conv_im2col_method
from jdynconv._lowering.methods import conv_grouped_im2col_grad

# ``direct`` beats ``im2col`` on value and gradients where channels are few (32-64); from 128 channels the
# two are within the rounds' spread or ``im2col`` wins, so the bound sits between them. One bound serves both
# layouts and follows the channels-first figures (direct transposes each sample there). The large-channel
# shapes are also the ones with few output positions and stride 2, so the figures cannot tell which of these
# decides. 3-D convs are several times slower through XLA's convolution than through im2col, and 2-D convs
# that YNNPACK would take (:func:`direct.direct_extra_rows`) were measured only at 128 channels: both stay on
# im2col. Set by benchmarks/per_sample_conv.py (results/per_sample_conv_cpu.md, direct and im2col columns).
_DIRECT_MAX_CHANNELS = 64


def uses_direct(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec, *, channels_first: bool) -> bool:
    """Whether ``auto`` on CPU takes ``direct`` rather than ``im2col``: float32, 1-D, or 2-D with the extra
    rows that keep it from YNNPACK, G = 1, at most :data:`_DIRECT_MAX_CHANNELS` channels in and out, and a
    sample large enough that ``im2col`` would loop over samples too (:data:`im2col.PER_SAMPLE_MATMUL_MACS`)."""
    dims = ConvDims.of(inputs, kernels, channels_first=channels_first)
    kept_from_ynnpack = len(dims.spatial) == 1 or direct.direct_extra_rows(dims.spatial, dims.kernel_size, spec) > 0
    return (
        inputs.dtype == jnp.float32
        and kept_from_ynnpack  # 1-D, or 2-D with the extra rows: never 3-D
        and max(dims.in_channels, dims.out_channels) <= _DIRECT_MAX_CHANNELS
        and dims.matmul_macs(spec) >= im2col.PER_SAMPLE_MATMUL_MACS
    )


def uses_depthwise(inputs: jax.Array, kernels: jax.Array, *, channels_first: bool) -> bool:
    """Whether ``auto`` on CPU takes ``depthwise``: a 2-D depthwise conv, one input channel per group and as
    many outputs as inputs (``C_in == C_out == G``).

    ``depthwise`` is faster than ``im2col`` (what ``auto`` took before) in both layouts, forward and
    backward, for 3x3 and 7x7 kernels; at stride 2 the two are level. It lost a pass to what ``auto`` took
    for 1-D and 3-D depthwise convs, a channel multiplier (``C_out = 2 C_in``) and one input channel with
    G = 1, which stay
    on the other methods. Set by ``benchmarks/per_sample_conv.py --grid depthwise``
    (results/per_sample_conv_depthwise_cpu.md) and one-process probes of the excluded shapes.
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


def choose_lowering(platform: str) -> Lowering:
    """The ``method="auto"`` rule, for the platform the program is lowered for (``"cpu"``, or any other;
    :func:`jdynconv._platform.by_platform` asks it for both and stages out each answer).

    * CPU: :func:`conv_cpu_auto`: ``depthwise`` for 2-D depthwise convs (:func:`uses_depthwise`), ``direct``
      for float32 1-D convs, and 2-D ones it can keep from YNNPACK, with G = 1, at most
      :data:`_DIRECT_MAX_CHANNELS` channels and a sample's matmul of at least
      :data:`im2col.PER_SAMPLE_MATMUL_MACS` multiply-adds (:func:`uses_direct`), else ``im2col``. Both take
      their derivatives from im2col's matmuls: the direct-conv lowerings' autodiff kernel gradient is XLA:CPU's
      masked batch-group conv (``vmap``, ``grouped``) or a per-sample conv (``scan``), one to two orders of
      magnitude slower (docs/results/per_sample_conv_cpu.md).
    * GPU/TPU: values from ``grouped`` (one cuDNN/TPU grouped conv), derivatives from ``im2col``,
      which avoids the batch-group kernel gradient reported slow on GPU (jax issue 13800).
    """
    if platform == "cpu":
        return conv_cpu_auto
    return conv_grouped_im2col_grad
