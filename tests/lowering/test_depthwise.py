"""The ``depthwise`` lowering (a multiply-add per kernel tap) and ``auto``'s rule for it, against float64 NumPy.

Every method, this one included, is also run on all of ``test_functional``'s cases (grouped and not).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdynconv as jdc
from jdynconv import _lowering
from jdynconv._lowering import auto, canonical, depthwise
from tests import reference
from tests.helpers import F32_RTOL, assert_close, equation_params

# (name, batch, spatial, in_channels, out_channels, kernel_size, call kwargs, reference geometry)
DEPTHWISE_CASES = [
    (
        "2d_k3_same",
        5,
        (6, 7),
        4,
        4,
        (3, 3),
        {"padding": 1, "feature_group_count": 4},
        reference.Geometry((1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 4),
    ),
    (
        "1d_multiplier_stride_dilation",
        3,
        (11,),
        3,
        6,
        (3,),
        {"padding": ((2, 1),), "strides": 2, "kernel_dilation": 2, "feature_group_count": 3},
        reference.Geometry((2,), ((2, 1),), (2,), (1,), 3),
    ),
    (
        "3d_input_dilation",
        2,
        (3, 4, 3),
        2,
        2,
        (2, 2, 1),
        {"padding": ((1, 1), (0, 1), (0, 0)), "input_dilation": (2, 1, 1), "feature_group_count": 2},
        reference.Geometry((1, 1, 1), ((1, 1), (0, 1), (0, 0)), (1, 1, 1), (2, 1, 1), 2),
    ),
]
CASE_IDS = [case[0] for case in DEPTHWISE_CASES]


def _arrays(batch, spatial, in_channels, out_channels, kernel_size, groups, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *spatial, in_channels)).astype(np.float32)
    w = rng.standard_normal((batch, *kernel_size, in_channels // groups, out_channels)).astype(np.float32)
    return x, w


def _in_layout(data_format: str, **kwargs):
    """``per_sample_conv(method="depthwise")`` as a function of channels-last arrays, computed in ``data_format``."""
    conv = functools.partial(jdc.per_sample_conv, method="depthwise", data_format=data_format, **kwargs)
    if data_format == "channels_last":
        return jax.jit(conv)
    return jax.jit(lambda x, w: jnp.moveaxis(conv(jnp.moveaxis(x, -1, 1), jnp.moveaxis(w, (-1, -2), (1, 2))), 1, -1))


@pytest.mark.parametrize("chunk", [None, 2], ids=["own_chunks", "chunks_of_2"])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=CASE_IDS)
def test_matches_float64_reference_forward_and_gradients(case, data_format, chunk, monkeypatch) -> None:
    """Values and both gradients; with chunks of 2 the batch of 5 or 3 runs as a loop with a ragged last sample."""
    if chunk is not None:
        monkeypatch.setattr(depthwise, "chunk_size", lambda batch, sample_bytes: chunk)
    _, batch, spatial, in_channels, out_channels, kernel_size, kwargs, geometry = case
    x, w = _arrays(batch, spatial, in_channels, out_channels, kernel_size, geometry.groups, seed=1)
    out, vjp = jax.vjp(_in_layout(data_format, **kwargs), x, w)
    assert_close(out, reference.conv(x, w, None, geometry), F32_RTOL)
    cotangent = np.random.default_rng(2).standard_normal(out.shape).astype(np.float32)
    d_x, d_w, _ = reference.conv_vjp(x, w, cotangent, geometry)
    got_x, got_w = vjp(cotangent)
    assert_close(got_x, d_x, F32_RTOL, "input gradient")
    assert_close(got_w, d_w, F32_RTOL, "kernel gradient")


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_bfloat16_taps_are_summed_in_float32(data_format: str) -> None:
    """49 taps: each output is the exact sum rounded once to bfloat16 (half a step), as if summed in float32.

    Summing the taps in bfloat16 rounds 48 times and misses this by several steps on some outputs.
    """
    x, w = _arrays(2, (9, 9), 8, 8, (7, 7), 8, seed=3)
    x_h, w_h = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    out = _in_layout(data_format, padding=3, feature_group_count=8)(x_h, w_h)
    assert out.dtype == jnp.bfloat16
    geometry = reference.Geometry((1, 1), ((3, 3), (3, 3)), (1, 1), (1, 1), 8)
    exact = reference.conv(np.asarray(x_h, np.float64), np.asarray(w_h, np.float64), None, geometry)
    error = np.abs(np.asarray(out, np.float64) - exact)
    # Half a bfloat16 step (2^-8 relative to the leading bit, so <= 2^-8 |v|), plus float32's own rounding.
    assert np.all(error <= 2.0**-8 * np.abs(exact) + 1e-5 * np.abs(exact).max())


def test_preferred_element_type_is_the_output_dtype() -> None:
    x, w = _arrays(2, (5, 5), 3, 3, (3, 3), 3, seed=4)
    x_h, w_h = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    out = jdc.per_sample_conv(
        x_h, w_h, padding=1, feature_group_count=3, method="depthwise", preferred_element_type=jnp.float32
    )
    assert out.dtype == jnp.float32
    geometry = reference.Geometry((1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 3)
    exact = reference.conv(np.asarray(x_h, np.float64), np.asarray(w_h, np.float64), None, geometry)
    assert_close(out, exact, F32_RTOL)  # products of bfloat16 values are exact in float32


def test_program_is_multiply_adds_only() -> None:
    """No conv and no matmul, forward or backward: the whole point of the lowering."""
    x, w = _arrays(3, (6, 6), 4, 4, (3, 3), 4, seed=5)

    def loss(x, w):
        return jnp.sum(jdc.per_sample_conv(x, w, padding=1, feature_group_count=4, method="depthwise") ** 2)

    for primitive in ("conv_general_dilated", "dot_general"):
        assert equation_params(primitive, jax.value_and_grad(loss, argnums=(0, 1)), x, w) == []
    # And the check can fail: im2col's program has its matmuls.
    im2col = functools.partial(jdc.per_sample_conv, padding=1, feature_group_count=4, method="im2col")
    assert equation_params("dot_general", im2col, x, w)


@pytest.mark.parametrize(
    ("spatial", "in_channels", "out_channels", "batch", "expected"),
    [
        ((32, 32), 64, 64, 64, 4),  # 256 KiB in + 256 KiB out a sample: 4 make 2 MiB
        ((16, 16), 128, 128, 64, 8),  # 128 KiB in + 128 KiB out: 8
        ((8,), 4, 4, 32, 32),  # tiny samples: the whole batch at once
    ],
)
def test_chunk_is_about_two_mib_of_input_and_output(spatial, in_channels, out_channels, batch, expected) -> None:
    n = len(spatial)
    inputs = jax.ShapeDtypeStruct((batch, *spatial, in_channels), jnp.float32)
    kernels = jax.ShapeDtypeStruct((batch, *(3,) * n, 1, out_channels), jnp.float32)
    spec = canonical.ConvSpec((1,) * n, ((1, 1),) * n, (1,) * n, (1,) * n, in_channels)
    assert depthwise.depthwise_chunk(inputs, kernels, spec, channels_first=False) == expected


@pytest.mark.parametrize(
    ("spatial", "in_channels", "out_channels", "groups", "expected"),
    [
        ((32, 32), 64, 64, 64, True),  # 2-D depthwise
        ((16, 16), 128, 128, 128, True),
        ((128,), 128, 128, 128, False),  # 1-D: its channels-first backward lost
        ((8, 8, 8), 32, 32, 32, False),  # 3-D: its backward lost
        ((32, 32), 32, 64, 32, False),  # channel multiplier 2: its channels-last backward lost
        ((32, 32), 1, 32, 1, False),  # one input channel, G = 1
        ((32, 32), 64, 64, 32, False),  # two input channels a group
        ((32, 32), 1, 1, 1, False),  # a single channel is not a depthwise conv worth the name
    ],
)
@pytest.mark.parametrize("channels_first", [False, True])
def test_depthwise_rule(spatial, in_channels, out_channels, groups, expected, channels_first) -> None:
    n = len(spatial)
    if channels_first:
        inputs = jax.ShapeDtypeStruct((8, in_channels, *spatial), jnp.float32)
        kernels = jax.ShapeDtypeStruct((8, out_channels, in_channels // groups, *(3,) * n), jnp.float32)
    else:
        inputs = jax.ShapeDtypeStruct((8, *spatial, in_channels), jnp.float32)
        kernels = jax.ShapeDtypeStruct((8, *(3,) * n, in_channels // groups, out_channels), jnp.float32)
    assert auto.uses_depthwise(inputs, kernels, channels_first=channels_first) is expected


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_cpu_auto_takes_depthwise_for_2d_depthwise_convs_only(data_format: str) -> None:
    """Read from ``auto``'s CPU program: multiply-adds only for a 2-D depthwise conv, matmuls for a 1-D one."""
    channels_first = data_format == "channels_first"
    cpu_auto = _lowering.CHANNELS_FIRST_FORMS[auto.conv_cpu_auto] if channels_first else auto.conv_cpu_auto

    def matmuls(spatial: tuple[int, ...]) -> int:
        n = len(spatial)
        x = jnp.ones((2, 4, *spatial) if channels_first else (2, *spatial, 4), jnp.float32)
        w = jnp.ones((2, 4, 1, *(3,) * n) if channels_first else (2, *(3,) * n, 1, 4), jnp.float32)
        spec = canonical.ConvSpec((1,) * n, ((1, 1),) * n, (1,) * n, (1,) * n, 4)
        fn = functools.partial(cpu_auto, spec=spec)
        return len(equation_params("dot_general", fn, x, w)) + len(equation_params("conv_general_dilated", fn, x, w))

    assert matmuls((5, 6)) == 0
    assert matmuls((7,)) > 0
