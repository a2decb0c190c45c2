"""The canonical description of one convolution (:class:`ConvSpec`, the sizes rules read as
:class:`ConvDims`, :func:`output_spatial_shape`), the ``Lowering`` signature, and XLA's own convolution on
it (:func:`shared_conv`).

Every lowering (:mod:`.methods`, :mod:`.im2col`, :mod:`.direct`, :mod:`.depthwise`) takes canonical
arguments: channels-last ``inputs`` ``(B, *spatial, C_in)``, kernels ``(B, *kernel_size, C_in // G, C_out)``
and a :class:`ConvSpec` with explicit pads, and returns ``(B, *out_spatial, C_out)`` without bias.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

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


@dataclasses.dataclass(frozen=True)
class ConvDims:
    """The sizes a lowering rule looks at, read from batched arguments in either layout."""

    spatial: tuple[int, ...]
    kernel_size: tuple[int, ...]
    in_channels: int
    group_in: int
    out_channels: int

    @classmethod
    def of(cls, inputs: jax.Array, kernels: jax.Array, *, channels_first: bool) -> ConvDims:
        if channels_first:
            return cls(inputs.shape[2:], kernels.shape[3:], inputs.shape[1], kernels.shape[2], kernels.shape[1])
        return cls(inputs.shape[1:-1], kernels.shape[1:-2], inputs.shape[-1], *kernels.shape[-2:])

    def patch_size(self, spec: ConvSpec) -> int:
        """Output positions times taps: one sample's patch rows times their taps."""
        return math.prod(output_spatial_shape(self.spatial, self.kernel_size, spec)) * math.prod(self.kernel_size)

    def matmul_macs(self, spec: ConvSpec) -> int:
        """One sample's multiply-adds as one (ungrouped) matmul; 0 for a grouped conv, which im2col contracts as
        a matmul batched over its groups even per sample (its rules were set on G == 1 convs only)."""
        return self.patch_size(spec) * self.group_in * self.out_channels if spec.feature_group_count == 1 else 0
