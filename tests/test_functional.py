"""jdynconv.functional against float64 NumPy references, every lowering, forward and gradients."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import jdynconv as jdc
from jdynconv._lowering import im2col
from jdynconv.functional import DATA_FORMATS, METHODS
from tests import reference
from tests.helpers import F32_RTOL, assert_close, equation_operand_shapes, equation_params


@dataclasses.dataclass(frozen=True)
class Case:
    """A per-sample conv configuration: the call's keyword arguments and the same thing made explicit."""

    name: str
    batch: int
    in_channels: int
    out_channels: int
    spatial: tuple[int, ...]
    kernel_size: tuple[int, ...]
    kwargs: dict[str, Any]
    geometry: reference.Geometry


def _geo(strides, pads, kdil=None, idil=None, groups=1) -> reference.Geometry:
    n = len(strides)
    return reference.Geometry(tuple(strides), tuple(pads), tuple(kdil or (1,) * n), tuple(idil or (1,) * n), groups)


CASES = [
    Case("seed_k1", 4, 4, 8, (16,), (1,), {"padding": "VALID"}, _geo((1,), ((0, 0),))),
    # SAME at stride 2 on an odd size: out 4, total pad (4-1)*2+3-7 = 2 -> (1, 1).
    Case("1d_same_stride2", 3, 3, 5, (7,), (3,), {"strides": 2}, _geo((2,), ((1, 1),))),
    # Even kernel: SAME's total pad 1 goes at the end (jax.lax / TF convention).
    Case("1d_same_even_kernel", 2, 2, 3, (6,), (2,), {"padding": "SAME"}, _geo((1,), ((0, 1),))),
    Case(
        "1d_causal_dilated",
        2,
        2,
        4,
        (9,),
        (3,),
        {"padding": "CAUSAL", "kernel_dilation": 2},
        _geo((1,), ((4, 0),), (2,)),
    ),
    Case(
        "1d_groups_input_dilation",
        2,
        4,
        6,
        (5,),
        (3,),
        {"padding": ((2, 1),), "input_dilation": 2, "feature_group_count": 2},
        _geo((1,), ((2, 1),), idil=(2,), groups=2),
    ),
    Case(
        "2d_groups_stride_dilation",
        3,
        4,
        4,
        (7, 6),
        (3, 2),
        {"padding": (1, (0, 2)), "strides": (2, 1), "kernel_dilation": (1, 2), "feature_group_count": 2},
        _geo((2, 1), ((1, 1), (0, 2)), kdil=(1, 2), groups=2),
    ),
    Case(
        "2d_depthwise",
        2,
        3,
        6,
        (5, 5),
        (3, 3),
        {"padding": 1, "feature_group_count": 3},
        _geo((1, 1), ((1, 1), (1, 1)), groups=3),
    ),
    Case(
        "3d_stride",
        2,
        2,
        3,
        (4, 5, 3),
        (2, 3, 1),
        {"padding": "VALID", "strides": (1, 2, 1)},
        _geo((1, 2, 1), ((0, 0),) * 3),
    ),
    Case("3d_same", 2, 2, 2, (3, 4, 4), (3, 3, 3), {}, _geo((1, 1, 1), ((1, 1),) * 3)),
    # XLA:CPU aborted the process compiling lax's input gradient of this one (see canonical.shared_conv).
    Case(
        "2d_input_dilation_strided",
        2,
        2,
        3,
        (3, 6),
        (2, 3),
        {"strides": 3, "padding": ((1, 0), (2, 2)), "input_dilation": (1, 2)},
        _geo((3, 3), ((1, 0), (2, 2)), idil=(1, 2)),
    ),
]
CASE_IDS = [c.name for c in CASES]


def _random(case: Case, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = case.geometry.groups
    x = rng.standard_normal((case.batch, *case.spatial, case.in_channels)).astype(np.float32)
    w = rng.standard_normal((case.batch, *case.kernel_size, case.in_channels // groups, case.out_channels))
    b = rng.standard_normal((case.batch, case.out_channels)).astype(np.float32)
    return x, w.astype(np.float32), b


def _conv_fn(case: Case, method: str, data_format: str = "channels_last", **extra: Any):
    """The conv as a function of channels-last arrays, whichever layout it is computed in."""
    if data_format == "channels_last":
        return jax.jit(lambda x, w, b: jdc.per_sample_conv(x, w, b, method=method, **case.kwargs, **extra))

    def in_pytorch_layout(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
        x_cf = jnp.moveaxis(x, -1, 1)
        w_cf = jnp.moveaxis(w, (-1, -2), (1, 2))  # (B, *K, I, O) -> (B, O, I, *K)
        out = jdc.per_sample_conv(x_cf, w_cf, b, data_format="channels_first", method=method, **case.kwargs, **extra)
        return jnp.moveaxis(out, 1, -1)

    return jax.jit(in_pytorch_layout)


def _with_vjp(fn):
    """``(x, w, b, cotangent) -> (fn(x, w, b), (d_x, d_w, d_b))``: ``fn`` and its vjp compiled as one program.

    ``jax.vjp`` followed by a call of the function it returns compiled the forward and the backward apart
    (measured: one program takes 10% less time over the 80 gradient cases). The same derivative rules are traced
    either way."""

    def value_and_vjp(x: jax.Array, w: jax.Array, b: jax.Array, cotangent: jax.Array) -> Any:
        out, vjp = jax.vjp(fn, x, w, b)
        return out, vjp(cotangent)

    return jax.jit(value_and_vjp)


def _output_shape(fn, *args) -> tuple[int, ...]:
    """The shape of ``fn``'s result, traced and not run (to draw a cotangent before the one compiled call)."""
    return jax.eval_shape(fn, *args).shape


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_float64_reference(case: Case, method: str) -> None:
    x, w, b = _random(case, seed=0)
    out = _conv_fn(case, method)(x, w, b)
    assert out.dtype == jnp.float32
    assert_close(out, reference.conv(x, w, b, case.geometry), F32_RTOL, f"{case.name}/{method}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradients_match_float64_reference(case: Case, method: str) -> None:
    x, w, b = _random(case, seed=1)
    fn = _conv_fn(case, method)
    cotangent = np.random.default_rng(2).standard_normal(_output_shape(fn, x, w, b)).astype(np.float32)
    _, (d_x, d_w, d_b) = _with_vjp(fn)(x, w, b, cotangent)
    ref_x, ref_w, ref_b = reference.conv_vjp(x, w, cotangent, case.geometry, bias_shape=b.shape)
    assert_close(d_x, ref_x, F32_RTOL, "d_inputs")
    assert_close(d_w, ref_w, F32_RTOL, "d_kernels")
    assert_close(d_b, ref_b, F32_RTOL, "d_bias")


@pytest.mark.parametrize("method", ["auto", "im2col"])
def test_shared_bias_and_its_gradient(method: str) -> None:
    case = CASES[5]
    x, w, _ = _random(case, seed=3)
    bias = np.random.default_rng(4).standard_normal(case.out_channels).astype(np.float32)
    fn = _conv_fn(case, method)
    assert_close(fn(x, w, bias), reference.conv(x, w, bias, case.geometry), F32_RTOL)
    out, vjp = jax.vjp(fn, x, w, bias)
    cotangent = np.ones(out.shape, np.float32)
    _, _, ref_b = reference.conv_vjp(x, w, cotangent, case.geometry, bias_shape=bias.shape)
    assert_close(vjp(cotangent)[2], ref_b, F32_RTOL, "d_bias")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_channels_first_is_the_pytorch_layout(case: Case, method: str) -> None:
    x, w, b = _random(case, seed=5)
    # Computed in PyTorch's layout (inputs (B, C, *S), kernels (B, O, I, *K)), moved back to compare.
    out_cl, vjp = jax.vjp(_conv_fn(case, method, "channels_first"), x, w, b)
    out = np.moveaxis(np.asarray(out_cl), -1, 1)
    expected = np.moveaxis(reference.conv(x, w, b, case.geometry), -1, 1)
    assert out.shape == expected.shape
    assert expected.shape[:2] == (case.batch, case.out_channels)
    assert_close(out, expected, F32_RTOL, "forward")
    # Gradients too: the im2col lowering has a PyTorch-layout form of its own.
    cotangent = np.random.default_rng(6).standard_normal(out_cl.shape).astype(np.float32)
    ref = reference.conv_vjp(x, w, cotangent, case.geometry, bias_shape=b.shape)
    for got, want, name in zip(vjp(cotangent), ref, ("x", "w", "b"), strict=True):
        assert_close(got, want, F32_RTOL, f"d_{name}")


@st.composite
def conv_configs(draw: st.DrawFn) -> tuple[Case, str, str]:
    n = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 2))
    spatial = tuple(draw(st.lists(st.integers(1, 6), min_size=n, max_size=n)))
    kernel = tuple(draw(st.lists(st.integers(1, 3), min_size=n, max_size=n)))
    strides = tuple(draw(st.lists(st.integers(1, 3), min_size=n, max_size=n)))
    kdil = tuple(draw(st.lists(st.integers(1, 2), min_size=n, max_size=n)))
    idil = tuple(draw(st.lists(st.integers(1, 2), min_size=n, max_size=n)))
    pads = tuple(draw(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=n, max_size=n)))
    geo = reference.Geometry(strides, pads, kdil, idil, groups)
    for size, k, (lo, hi), kd, d in zip(spatial, kernel, pads, kdil, idil, strict=True):
        assume((size - 1) * d + 1 + lo + hi >= (k - 1) * kd + 1)
    case = Case(
        "hypothesis",
        draw(st.integers(1, 3)),
        groups * draw(st.integers(1, 3)),
        groups * draw(st.integers(1, 3)),
        spatial,
        kernel,
        {
            "strides": strides,
            "padding": pads,
            "kernel_dilation": kdil,
            "input_dilation": idil,
            "feature_group_count": groups,
        },
        geo,
    )
    return case, draw(st.sampled_from(METHODS)), draw(st.sampled_from(DATA_FORMATS))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(conv_configs(), st.integers(0, 2**16))
def test_random_valid_configurations_match_reference(config: tuple[Case, str, str], seed: int) -> None:
    case, method, data_format = config
    x, w, b = _random(case, seed)
    fn = _conv_fn(case, method, data_format)
    out, vjp = jax.vjp(fn, x, w, b)
    assert_close(out, reference.conv(x, w, b, case.geometry), F32_RTOL, "forward")
    cotangent = np.random.default_rng(seed + 1).standard_normal(out.shape).astype(np.float32)
    # Random small configurations can make a gradient's every sum cancel (a bias gradient of a few terms
    # summing to 1e-2); rounding scales with the sums of absolute values, so those set the bound.
    magnitudes = reference.conv_vjp(np.abs(x), np.abs(w), np.abs(cotangent), case.geometry, bias_shape=b.shape)
    for got, want, magnitude, name in zip(
        vjp(cotangent),
        reference.conv_vjp(x, w, cotangent, case.geometry, bias_shape=b.shape),
        magnitudes,
        ("x", "w", "b"),
        strict=True,
    ):
        assert_close(got, want, F32_RTOL, f"d_{name}", magnitude=magnitude)


def _scalar_loss(case: Case, method: str):
    def loss(x: jax.Array, w: jax.Array) -> jax.Array:
        return jnp.sum(jnp.tanh(jdc.per_sample_conv(x, w, method=method, **case.kwargs)))

    return loss


@pytest.fixture
def reoriented_kernel_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    """``im2col``'s reoriented kernel gradient (a custom JVP) on every case, grouped ones included; by its
    rule only large, split, ungrouped batches take it, none of the small test cases."""
    monkeypatch.setattr(im2col, "reorients_kernel_grad", lambda *args: True)


@pytest.mark.parametrize("method", ["im2col", "direct"])  # direct takes im2col's derivatives, this one included
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reoriented_kernel_grad_matches_float64_reference(
    case: Case, method: str, reoriented_kernel_grad: None
) -> None:
    x, w, b = _random(case, seed=21)
    dx, dw, _ = _random(case, seed=23)
    fn = _conv_fn(case, method)
    cotangent = np.random.default_rng(22).standard_normal(_output_shape(fn, x, w, b)).astype(np.float32)
    # Reverse and forward mode in one compiled program (each its own computation in it).
    both = jax.jit(
        lambda x, w, b, cotangent, dx, dw: (_with_vjp(fn)(x, w, b, cotangent), _jvp(case, method)(x, w, dx, dw))
    )
    (out, grads), (_, tangent) = both(x, w, b, cotangent, dx, dw)
    assert_close(out, reference.conv(x, w, b, case.geometry), F32_RTOL)
    ref = reference.conv_vjp(x, w, cotangent, case.geometry, bias_shape=b.shape)
    for got, want, name in zip(grads, ref, ("d_inputs", "d_kernels", "d_bias"), strict=True):
        assert_close(got, want, F32_RTOL, name)
    # Forward mode: conv is bilinear, d conv = conv(dx, w) + conv(x, dw).
    expected = reference.conv(dx, w, None, case.geometry) + reference.conv(x, dw, None, case.geometry)
    assert_close(tangent, expected, F32_RTOL, "jvp")


def _jvp(case: Case, method: str):
    """``(x, w, dx, dw) -> (conv(x, w), its tangent)``, compiled as one program (run op by op, each
    operation of the forward-mode rules compiled on its own)."""

    def conv(x: jax.Array, w: jax.Array) -> jax.Array:
        return jdc.per_sample_conv(x, w, method=method, **case.kwargs)

    return jax.jit(lambda x, w, dx, dw: jax.jvp(conv, (x, w), (dx, dw)))


def _kernel_grad_contracts_channel_major_patches(case: Case, method: str) -> bool:
    """Whether the kernel gradient's program has a matmul operand of channel-major patches, (C * T, positions)."""
    x, w, _ = _random(case, seed=24)
    grad = jax.grad(lambda w: jnp.sum(jdc.per_sample_conv(x, w, method=method, **case.kwargs) ** 2))
    taps, positions = int(np.prod(case.kernel_size)), 3 * 4 * 4
    shapes = [shape[-2:] for shape in equation_operand_shapes("dot_general", grad, w)]
    return (case.in_channels * taps, positions) in shapes


@pytest.mark.parametrize("method", ["im2col", "direct"])  # the rule reaches direct's derivatives too
def test_reoriented_kernel_grad_contracts_channel_major_patches(method: str, reoriented_kernel_grad: None) -> None:
    assert _kernel_grad_contracts_channel_major_patches(CASES[8], method)  # 3d_same: 2 channels, 27 taps, 3x4x4


@pytest.mark.parametrize("method", ["im2col", "direct"])
def test_plain_kernel_grad_contracts_tap_major_patches(method: str) -> None:
    """The check above can fail: by default that small case takes plain autodiff."""
    assert not _kernel_grad_contracts_channel_major_patches(CASES[8], method)


@pytest.mark.parametrize(
    ("method", "reoriented"),
    [
        ("auto", False),
        ("im2col", False),
        ("scan", False),
        ("direct", False),
        ("hybrid", False),
        ("depthwise", False),
        ("im2col", True),
    ],
    ids=["auto", "im2col", "scan", "direct", "hybrid", "depthwise", "im2col-reoriented-kernel-grad"],
)
def test_nested_grad_agrees_with_vmap_reference_semantics(
    method: str, reoriented: bool, request: pytest.FixtureRequest
) -> None:
    if reoriented:
        request.getfixturevalue("reoriented_kernel_grad")
    case = CASES[5]
    x, w, _ = _random(case, seed=6)
    assert_close(_grad_norm(_scalar_loss(case, method))(x, w), _vmap_grad_norm(), 1e-4)


def _grad_norm(loss):
    """d/dx of |dL/dw|^2: a second-order derivative through both inputs."""
    return jax.jit(jax.grad(lambda x, w: jnp.sum(jax.grad(loss, argnums=1)(x, w) ** 2)))


@functools.cache
def _vmap_grad_norm() -> np.ndarray:
    """The nested-gradient test's expected value, the ``vmap`` method's (computed once for all its cases; the
    reoriented kernel gradient is im2col's and direct's, which leaves ``vmap`` alone)."""
    case = CASES[5]
    x, w, _ = _random(case, seed=6)
    return np.asarray(_grad_norm(_scalar_loss(case, "vmap"))(x, w))


@pytest.mark.parametrize("method", ["auto", "im2col", "direct", "hybrid", "depthwise"])
def test_forward_mode_jvp_matches_reference(method: str) -> None:
    case = CASES[1]
    x, w, _ = _random(case, seed=7)
    dx, dw, _ = _random(case, seed=8)
    _, tangent = _jvp(case, method)(x, w, dx, dw)
    # conv is bilinear: d conv = conv(dx, w) + conv(x, dw).
    expected = reference.conv(dx, w, None, case.geometry) + reference.conv(x, dw, None, case.geometry)
    assert_close(tangent, expected, F32_RTOL)


@pytest.mark.parametrize("method", METHODS)
def test_outer_vmap_over_an_extra_axis(method: str) -> None:
    case = CASES[5]
    xs = np.stack([_random(case, seed)[0] for seed in (9, 10)])
    ws = np.stack([_random(case, seed)[1] for seed in (11, 12)])
    out = jax.jit(jax.vmap(lambda x, w: jdc.per_sample_conv(x, w, method=method, **case.kwargs)))(xs, ws)
    for i in range(2):
        assert_close(out[i], reference.conv(xs[i], ws[i], None, case.geometry), F32_RTOL)


@pytest.mark.parametrize(("dtype", "rtol"), [(jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)])
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_within_stated_tolerance(method: str, dtype: Any, rtol: float) -> None:
    # bfloat16 keeps 8 significand bits (relative rounding 2^-8 ~ 4e-3 per product/sum): 2e-2 of the
    # output scale covers the rounding of the inputs, products and accumulation in a 36-term sum.
    case = CASES[5]
    x, w, b = _random(case, seed=13)
    x_h, w_h, b_h = (jnp.asarray(a, dtype) for a in (x, w, b))
    out = _conv_fn(case, method)(x_h, w_h, b_h)
    assert out.dtype == dtype
    expected = reference.conv(
        np.asarray(x_h, np.float64), np.asarray(w_h, np.float64), np.asarray(b_h, np.float64), case.geometry
    )
    assert_close(out, expected, rtol)


@pytest.mark.parametrize("method", METHODS)
def test_preferred_element_type_accumulates_and_returns_float32(method: str) -> None:
    case = CASES[5]
    x, w, b = _random(case, seed=14)
    x_h, w_h, b_h = (jnp.asarray(a, jnp.bfloat16) for a in (x, w, b))
    out = _conv_fn(case, method, preferred_element_type=jnp.float32)(x_h, w_h, b_h)
    assert out.dtype == jnp.float32
    expected = reference.conv(
        np.asarray(x_h, np.float64), np.asarray(w_h, np.float64), np.asarray(b_h, np.float64), case.geometry
    )
    # Products of bfloat16 values are exact in float32; only the final bias add rounds at bf16.
    assert_close(out, expected, 1e-2)


def test_precision_highest_is_accepted_by_every_method() -> None:
    case = CASES[5]
    x, w, b = _random(case, seed=15)
    expected = reference.conv(x, w, b, case.geometry)
    for method in METHODS:
        out = _conv_fn(case, method, precision=jax.lax.Precision.HIGHEST)(x, w, b)
        assert_close(out, expected, F32_RTOL, method)


def _conv_batch_group_counts(fn, *args) -> list[int]:
    """batch_group_count of every conv in the (nested) jaxpr of ``fn``."""
    return [params["batch_group_count"] for params in equation_params("conv_general_dilated", fn, *args)]


@pytest.mark.parametrize("method", ["auto", "im2col", "direct", "hybrid", "depthwise"])
@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[8]], ids=["1d", "2d", "3d"])
def test_fast_gradients_have_no_batch_group_conv(case: Case, method: str) -> None:
    """The point of "auto": its kernel gradient must not be XLA:CPU's slow batch-group conv."""
    x, w, _ = _random(case, seed=16)
    grad = jax.grad(lambda x, w: jnp.sum(jdc.per_sample_conv(x, w, method=method, **case.kwargs) ** 2), argnums=(0, 1))
    assert all(count == 1 for count in _conv_batch_group_counts(grad, x, w))
    # And the check can fail: the vmap reference's gradient does contain one.
    grad_vmap = jax.grad(
        lambda x, w: jnp.sum(jdc.per_sample_conv(x, w, method="vmap", **case.kwargs) ** 2), argnums=(0, 1)
    )
    assert any(count == case.batch * case.geometry.groups for count in _conv_batch_group_counts(grad_vmap, x, w))


IM2COL_CHUNKING_CASES = [
    # 40 samples of (20, 20) x 8 channels x 9 taps: ~115 KiB of patches and 0.1M multiply-adds each, so
    # batched chunks of 18 samples: a scan of 2 steps, and the ragged last 4 samples on their own.
    (Case("batched_chunks", 40, 8, 4, (20, 20), (3, 3), {"padding": 1}, _geo((1, 1), ((1, 1), (1, 1)))), 2),
    # 1024 positions x 9 taps x 16 x 16: 2.4M multiply-adds a sample, so two samples a step: a scan of 3
    # steps, and the odd last sample on its own.
    (Case("two_per_step", 7, 16, 16, (32, 32), (3, 3), {"padding": 1}, _geo((1, 1), ((1, 1), (1, 1)))), 3),
    # As large, but grouped (a matmul batched over groups either way): chunks of 3 by patch bytes.
    (
        Case(
            "grouped_chunks",
            5,
            16,
            32,
            (32, 32),
            (3, 3),
            {"padding": 1, "feature_group_count": 2},
            _geo((1, 1), ((1, 1), (1, 1)), groups=2),
        ),
        1,
    ),
]


@functools.cache
def _chunking_case_references(name: str) -> tuple[tuple[np.ndarray, ...], np.ndarray, tuple[np.ndarray, ...]]:
    """An :data:`IM2COL_CHUNKING_CASES` case's arrays ``(x, w, b, cotangent)``, its float64 output and its float64
    gradients: one computation for both data formats, which take the same arrays (the NumPy reference loops over
    every sample, position and tap, most of this test's time at these sizes)."""
    case = next(case for case, _ in IM2COL_CHUNKING_CASES if case.name == name)
    x, w, b = _random(case, seed=17)
    expected = reference.conv(x, w, b, case.geometry)
    cotangent = np.random.default_rng(18).standard_normal(expected.shape).astype(np.float32)
    return (x, w, b, cotangent), expected, reference.conv_vjp(x, w, cotangent, case.geometry, bias_shape=b.shape)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize(("case", "scan_length"), IM2COL_CHUNKING_CASES, ids=lambda c: getattr(c, "name", c))
def test_im2col_chunks_and_still_matches(case: Case, scan_length: int, data_format: str) -> None:
    (x, w, b, cotangent), expected, ref = _chunking_case_references(case.name)
    fn = _conv_fn(case, "im2col", data_format)
    out, vjp = jax.vjp(fn, x, w, b)
    assert_close(out, expected, F32_RTOL)
    for got, want in zip(vjp(cotangent), ref, strict=True):
        assert_close(got, want, F32_RTOL)
    # The chunking the lowering chose, read from its program: forward and backward loops of that length.
    fwd_bwd = jax.grad(lambda x, w: jnp.sum(fn(x, w, b) * cotangent), argnums=(0, 1))
    assert {params["length"] for params in equation_params("scan", fwd_bwd, x, w)} == {scan_length}
