"""How :func:`jdynconv.per_sample_conv` reaches XLA: the lowerings (its ``method`` argument), all computing
the same function, and ``auto``'s rule.

Every lowering takes and returns the canonical arrays of :mod:`jdynconv._lowering.canonical`. ``CHANNELS_FIRST_FORMS``
maps a lowering to its form taking and returning PyTorch's layout (``(B, C_in, *spatial)``,
``(B, C_out, C_in // G, *kernel_size)``), where it has one.

* ``vmap``: ``jax.vmap`` over ``lax.conv_general_dilated``, the reference semantics. JAX batches it
  into one grouped conv; its kernel gradient is a ``batch_group_count = B`` conv, which XLA:CPU
  expands with a mask, so it gets slower with B: on most of the benchmark's shapes its backward pass is one
  to two orders of magnitude slower than PyTorch's on CPU (``benchmarks/per_sample_conv.py``,
  ``docs/results/per_sample_conv_cpu.md``, vmap column).
* ``grouped``: the PyTorch trick written out (batch folded into channels, ``feature_group_count =
  B * G``). The same program as ``vmap`` after batching, kept because it is what cuDNN is fast at.
* ``scan``: ``lax.map`` over the batch of an ordinary single-kernel conv (XLA:CPU's direct
  convolution). Its forward is close to ``im2col``'s, a little faster on some small-channel shapes;
  its backward is slow.
* ``im2col``: matmuls of input patches with the kernels, both ways (:mod:`.im2col`).
* ``direct``: values from XLA's own convolution per sample, eight samples a ``lax.map`` step (each its own
  conv, so XLA:CPU runs them side by side), 2-D ones with unit stride along their first spatial dim kept
  from YNNPACK (:mod:`.direct`); derivatives from ``im2col`` (a custom JVP). The fastest CPU
  forward where channels are few (``per_sample_conv_cpu.md``, direct column).
* ``depthwise``: a broadcast multiply-add per kernel tap (:mod:`.depthwise`), plain autodiff; for
  depthwise convs (``C_in // G == 1``), correct for any G.
* ``hybrid``: values from ``grouped``, derivatives from ``im2col`` (a custom JVP), for backends whose
  grouped conv is fast but whose batch-group kernel gradient is not (GPU).
* ``auto``: :func:`.auto.choose_lowering`.

Modules: :mod:`.canonical` (the canonical arrays and ``ConvSpec``), :mod:`.methods` (``vmap``, ``grouped``,
``scan``, ``hybrid`` and the table of all), :mod:`.im2col`, :mod:`.direct`, :mod:`.depthwise`, :mod:`.tangent`
(values from one lowering, derivatives from another), :mod:`.auto` (the rule) and :mod:`.batch_parallel`
(every lowering run on each device's samples under SPMD).
"""

from __future__ import annotations

from jdynconv._lowering.auto import choose_lowering, conv_cpu_auto, conv_cpu_auto_channels_first
from jdynconv._lowering.canonical import Lowering
from jdynconv._lowering.depthwise import conv_depthwise, conv_depthwise_channels_first
from jdynconv._lowering.direct import conv_direct_channels_first_im2col_grad, conv_direct_method
from jdynconv._lowering.im2col import conv_im2col_chunked_channels_first, conv_im2col_method
from jdynconv._lowering.methods import LOWERINGS

__all__ = ["CHANNELS_FIRST_FORMS", "LOWERINGS", "choose_lowering"]

# Lowerings with a native PyTorch-layout form, which spares ``per_sample_conv`` the transposes.
CHANNELS_FIRST_FORMS: dict[Lowering, Lowering] = {
    conv_im2col_method: conv_im2col_chunked_channels_first,
    conv_direct_method: conv_direct_channels_first_im2col_grad,
    conv_cpu_auto: conv_cpu_auto_channels_first,
    conv_depthwise: conv_depthwise_channels_first,
}
