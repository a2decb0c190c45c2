"""jdynconv.per_sample_conv_transpose against a float64 NumPy scatter (PyTorch's conv_transposeNd per sample)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdynconv as jdc
from tests import reference
from tests.helpers import F32_RTOL, assert_close


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    spatial: tuple[int, ...]
    kernel_size: int
    strides: int
    padding: int
    output_padding: int
    dilation: int
    groups: int


CASES = [
    Case("1d_up2", (5,), 3, 2, 0, 0, 1, 1),
    Case("1d_pad_outpad_groups", (6,), 4, 2, 1, 1, 1, 2),
    Case("1d_dilated", (5,), 3, 2, 1, 1, 2, 1),
    Case("2d_up2_k3_pad1_outpad1", (4, 5), 3, 2, 1, 1, 1, 1),
    Case("2d_stride3_k2_pad_past_full", (3, 4), 2, 3, 2, 2, 1, 1),
    Case("2d_stride1", (5, 4), 3, 1, 1, 0, 1, 3),
    Case("2d_k1_up2", (4, 4), 1, 2, 0, 1, 1, 1),
    Case("2d_dilated_groups", (4, 3), 2, 2, 1, 0, 3, 2),
    Case("3d_up2", (3, 2, 3), 3, 2, 1, 1, 1, 1),
]
BATCH, GROUP_IN, GROUP_OUT = 2, 2, 3


def _arrays(case: Case, dtype=np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(len(case.name))
    n = len(case.spatial)
    x = rng.normal(size=(BATCH, *case.spatial, GROUP_IN * case.groups)).astype(dtype)
    w = rng.normal(size=(BATCH, *(case.kernel_size,) * n, GROUP_OUT, GROUP_IN * case.groups)).astype(dtype)
    bias = rng.normal(size=(BATCH, GROUP_OUT * case.groups)).astype(dtype)
    return x, w, bias


def _call(case: Case, x, w, bias, **kwargs) -> jax.Array:
    return jdc.per_sample_conv_transpose(
        x,
        w,
        bias,
        strides=case.strides,
        padding=case.padding,
        output_padding=case.output_padding,
        kernel_dilation=case.dilation,
        feature_group_count=case.groups,
        **kwargs,
    )


def _expected(case: Case, x, w, bias) -> np.ndarray:
    n = len(case.spatial)
    return reference.conv_transpose(
        x,
        w,
        bias,
        (case.strides,) * n,
        (case.padding,) * n,
        (case.output_padding,) * n,
        (case.dilation,) * n,
        case.groups,
    )


def _forms(case: Case) -> list[str]:
    return ["sub_pixel", "input_dilated"] if case.dilation == 1 else ["input_dilated"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward_matches_float64_scatter(case: Case) -> None:
    x, w, bias = _arrays(case)
    expected = _expected(case, x, w, bias)
    for form in _forms(case):
        # One lowering: both forms are a per_sample_conv call, whose methods tests/test_functional.py checks.
        out = jax.jit(lambda x, w, b, form=form: _call(case, x, w, b, form=form))(x, w, bias)
        assert_close(out, expected, F32_RTOL, form)


@pytest.mark.parametrize("case", CASES[1::2], ids=lambda c: c.name)
def test_channels_first_is_pytorchs_weight_layout(case: Case) -> None:
    x, w, bias = _arrays(case)
    expected = np.moveaxis(_expected(case, x, w, bias), -1, 1)
    x_first = np.moveaxis(x, -1, 1)
    w_first = np.moveaxis(w, (-1, -2), (1, 2))  # (B, C_in, C_out // G, *k): ConvTransposeNd.weight per sample
    out = jax.jit(lambda x, w, b: _call(case, x, w, b, data_format="channels_first"))(x_first, w_first, bias)
    assert_close(out, expected, F32_RTOL)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gradients_are_the_forward_conv_and_its_kernel_gradient(case: Case) -> None:
    """A transposed conv is the adjoint of the conv with the same kernel, so its input gradient is that conv
    of the cotangent, and its kernel gradient is that conv's kernel gradient with the roles swapped."""
    x, w, _ = _arrays(case)
    n = len(case.spatial)
    cotangent = np.random.default_rng(7).normal(size=_expected(case, x, w, None).shape).astype(np.float32)
    geometry = reference.Geometry(
        (case.strides,) * n, ((case.padding, case.padding),) * n, (case.dilation,) * n, (1,) * n, case.groups
    )
    expected_dx = reference.conv(cotangent, w, None, geometry)
    expected_dw = reference.conv_vjp(cotangent, w, x, geometry)[1]
    for form in _forms(case):

        def loss(x, w, form=form):
            return jnp.sum(_call(case, x, w, None, form=form) * cotangent)

        dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
        assert_close(dx, expected_dx, F32_RTOL, f"{form} d_inputs")
        assert_close(dw, expected_dw, F32_RTOL, f"{form} d_kernels")


def test_shared_bias_and_output_shape() -> None:
    case = CASES[3]
    x, w, _ = _arrays(case)
    bias = np.arange(GROUP_OUT, dtype=np.float32)
    out = _call(case, x, w, bias)
    assert out.shape == (BATCH, 8, 10, GROUP_OUT)  # (4 - 1) * 2 - 2 + 2 + 1 + 1 = 8; (5 - 1) * 2 - 2 + 4 = 10
    assert_close(out, _expected(case, x, w, bias), F32_RTOL)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"output_padding": 2}, r"`output_padding` \(2, 2\) must be smaller than the stride or the dilation"),
        ({"form": "sub_pixel", "kernel_dilation": 2}, r'`form` "sub_pixel" needs `kernel_dilation` 1'),
        ({"form": "fast"}, r"`form` must be one of"),
        ({"feature_group_count": 3}, r"`inputs` channels \(=4\) must be divisible by `feature_group_count` \(=3\)"),
        ({"padding": -1}, r"`padding` entries must be >= 0"),
        ({"padding": 5}, r"output would be empty"),
    ],
)
def test_bad_arguments_are_named(kwargs, message) -> None:
    x = jnp.zeros((2, 4, 4, 4))
    w = jnp.zeros((2, 3, 3, 5, 4))
    with pytest.raises(ValueError, match=message):
        jdc.per_sample_conv_transpose(x, w, strides=2, **kwargs)


def test_kernel_shape_mismatches_are_reported_with_shapes() -> None:
    x = jnp.zeros((2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"`kernels` must have C_in = 4 .* got kernels shape \(2, 3, 3, 5, 6\)"):
        jdc.per_sample_conv_transpose(x, jnp.zeros((2, 3, 3, 5, 6)))
    with pytest.raises(ValueError, match=r"`kernels` must have batch size 2"):
        jdc.per_sample_conv_transpose(x, jnp.zeros((3, 3, 3, 5, 4)))
    with pytest.raises(ValueError, match=r"`kernels` must have rank 5"):
        jdc.per_sample_conv_transpose(x, jnp.zeros((2, 3, 5, 4)))
