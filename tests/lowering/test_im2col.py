"""The im2col lowering's helpers not reached through per_sample_conv's ``method``, and its rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdynconv._lowering import canonical, im2col
from jdynconv.functional import conv_spec
from tests import reference
from tests.helpers import assert_close


@pytest.mark.parametrize(
    ("spatial", "kernel_size", "in_channels", "out_channels", "groups", "stride"),
    [((7, 6), (3, 3), 3, 32, 1, 1), ((9,), (3,), 4, 8, 2, 2), ((4, 5, 4), (2, 3, 1), 2, 12, 1, 1)],
)
def test_shared_conv_with_matmul_kernel_grad(spatial, kernel_size, in_channels, out_channels, groups, stride) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, *spatial, in_channels)).astype(np.float32)
    kernel = rng.standard_normal((*kernel_size, in_channels // groups, out_channels)).astype(np.float32)
    spec = conv_spec(
        spatial, kernel_size, strides=stride, padding=1, kernel_dilation=1, input_dilation=1, feature_group_count=groups
    )
    fn = jax.jit(lambda x, k: im2col.shared_conv_matmul_kernel_grad(x, k, spec, groups))
    out, vjp = jax.vjp(fn, x, kernel)
    geo = reference.Geometry(spec.strides, spec.pads, spec.kernel_dilation, spec.input_dilation, groups)
    per_sample = np.broadcast_to(kernel, (3, *kernel.shape))
    assert_close(out, reference.conv(x, per_sample, None, geo), 1e-5, "forward")
    cotangent = rng.standard_normal(out.shape).astype(np.float32)
    d_x, d_kernel = jax.jit(vjp)(cotangent)
    ref_x, ref_w, _ = reference.conv_vjp(x, per_sample, cotangent, geo)
    assert_close(d_x, ref_x, 1e-5, "d_inputs")
    # A shared kernel's gradient is the sum of the per-sample kernel gradients.
    assert_close(d_kernel, ref_w.sum(axis=0), 1e-5, "d_kernel")
    # Forward mode too (it is a custom JVP).
    _, tangent = jax.jvp(fn, (x, kernel), (x, kernel))
    assert_close(tangent, 2 * reference.conv(x, per_sample, None, geo), 1e-5, "jvp")


@pytest.mark.parametrize(
    ("batch", "spatial", "channels", "groups", "expected"),
    [
        (64, (32, 32), 64, 1, True),  # the kernel-mixing conv: 1024 positions, two samples a step
        (64, (32, 32), 64, 2, False),  # grouped: not measured
        (128, (8, 8), 256, 1, False),  # 2d-c: 64 positions
        (2, (32, 32), 64, 1, False),  # the whole batch in one step: plain autodiff keeps the patches
    ],
)
def test_reoriented_kernel_grad_rule(batch: int, spatial: tuple[int, ...], channels: int, groups: int, expected: bool):
    inputs = jax.ShapeDtypeStruct((batch, *spatial, channels), jnp.float32)
    kernels = jax.ShapeDtypeStruct((batch, 3, 3, channels // groups, channels), jnp.float32)
    spec = canonical.ConvSpec((1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), groups)
    assert im2col.reorients_kernel_grad(inputs, kernels, spec) is expected
