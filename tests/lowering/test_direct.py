"""The ``direct`` lowering: its loop, its extra rows, and what XLA:CPU does with its convs."""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdynconv._lowering import canonical, direct
from jdynconv.functional import conv_spec, per_sample_conv
from tests import reference
from tests.helpers import assert_close, equation_params


@dataclasses.dataclass(frozen=True)
class DirectCase:
    """A per-sample conv for the ``direct`` lowering: how many output rows it adds, how many loop steps it takes."""

    name: str
    batch: int
    spatial: tuple[int, ...]
    kernel_size: tuple[int, ...]
    in_channels: int
    out_channels: int
    kwargs: dict[str, Any]
    extra_rows: int
    loop_steps: int  # 0: the batch is smaller than a step, no loop

    def spec(self) -> canonical.ConvSpec:
        return conv_spec(
            self.spatial,
            self.kernel_size,
            strides=self.kwargs.get("strides", 1),
            padding=self.kwargs.get("padding", "SAME"),
            kernel_dilation=self.kwargs.get("kernel_dilation", 1),
            input_dilation=self.kwargs.get("input_dilation", 1),
            feature_group_count=self.kwargs.get("feature_group_count", 1),
        )


DIRECT_CASES = [
    # Two steps of 8 and a ragged 3; SAME keeps 8 rows, one more makes the output larger than the input.
    DirectCase("loop_and_ragged_same", 19, (8, 5), (3, 3), 3, 4, {"padding": "SAME"}, 1, 2),
    # VALID drops 2 of 34 rows, so 3 more; grouped; one step and a ragged 1.
    DirectCase("valid_grouped", 9, (34, 4), (3, 3), 4, 6, {"padding": "VALID", "feature_group_count": 2}, 3, 1),
    # Input dilation makes the conv's input 17 rows (dilated in shared_conv): output 17, one more.
    DirectCase("input_dilation", 2, (9, 3), (3, 1), 2, 3, {"padding": (1, 0), "input_dilation": (2, 1)}, 1, 0),
    # Strided rows: never larger than the input, left to XLA's choice.
    DirectCase("strided_rows", 10, (9, 8), (3, 3), 2, 3, {"strides": (2, 1), "padding": 1}, 0, 1),
    # 5 SAME rows + 1 would be 20% more work: left as it is.
    DirectCase("small_output", 3, (5, 5), (3, 3), 2, 2, {"padding": 1}, 0, 0),
    DirectCase("1d_dilated", 8, (12,), (3,), 2, 2, {"padding": 2, "kernel_dilation": 2}, 0, 1),
]


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("case", DIRECT_CASES, ids=lambda c: c.name)
def test_direct_matches_reference_through_its_loop_and_extra_rows(case: DirectCase, data_format: str) -> None:
    spec = case.spec()
    assert direct.direct_extra_rows(case.spatial, case.kernel_size, spec) == case.extra_rows
    rng = np.random.default_rng(1)
    groups = spec.feature_group_count
    x = rng.standard_normal((case.batch, *case.spatial, case.in_channels)).astype(np.float32)
    w_shape = (case.batch, *case.kernel_size, case.in_channels // groups, case.out_channels)
    w = rng.standard_normal(w_shape).astype(np.float32)

    def conv(x: jax.Array, w: jax.Array) -> jax.Array:  # channels-last arrays either way
        if data_format == "channels_last":
            return per_sample_conv(x, w, method="direct", **case.kwargs)
        x_cf, w_cf = jnp.moveaxis(x, -1, 1), jnp.moveaxis(w, (-1, -2), (1, 2))
        out = per_sample_conv(x_cf, w_cf, data_format="channels_first", method="direct", **case.kwargs)
        return jnp.moveaxis(out, 1, -1)

    geo = reference.Geometry(spec.strides, spec.pads, spec.kernel_dilation, spec.input_dilation, groups)
    out, vjp = jax.vjp(jax.jit(conv), x, w)
    assert_close(out, reference.conv(x, w, None, geo), 1e-5, "forward")
    cotangent = rng.standard_normal(out.shape).astype(np.float32)
    ref_x, ref_w, _ = reference.conv_vjp(x, w, cotangent, geo)
    d_x, d_w = jax.jit(vjp)(cotangent)
    assert_close(d_x, ref_x, 1e-5, "d_inputs")
    assert_close(d_w, ref_w, 1e-5, "d_kernels")
    _, tangent = jax.jvp(conv, (x, w), (x, w))  # bilinear: conv(dx, w) + conv(x, dw) = 2 conv(x, w) here
    assert_close(tangent, 2 * reference.conv(x, w, None, geo), 1e-5, "jvp")
    lengths = [params["length"] for params in equation_params("scan", conv, x, w)]
    assert lengths == ([case.loop_steps] if case.loop_steps else [])


def _ynnpack_convolutions(compiled_hlo: str) -> tuple[int, int]:
    """(convolutions in YNNPACK fusions, all convolutions) in XLA:CPU's compiled program text."""
    computations = dict(re.findall(r"^%(\S+) \(.*?\{\n(.*?)^\}", compiled_hlo, flags=re.M | re.S))
    called = re.findall(r"calls=%([\w.\-]+).*__ynn_fusion", compiled_hlo)
    in_ynnpack = sum(computations.get(name, "").count(" convolution(") for name in called)
    return in_ynnpack, compiled_hlo.count(" convolution(")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="YNNPACK is XLA:CPU's")
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_direct_keeps_2d_convs_from_ynnpack(data_format: str) -> None:
    """The reason for the extra rows (see :func:`direct.conv_direct_sample`), checked on XLA's program.

    If this fails after a jax upgrade, XLA changed which convs it hands to YNNPACK: re-measure ``direct``.
    """
    case = DIRECT_CASES[0]
    spec = case.spec()
    x = jnp.ones((16, *case.spatial, 24), jnp.float32)  # YNNPACK takes convs of more than 16 channels
    w = jnp.ones((16, *case.kernel_size, 24, 24), jnp.float32)
    if data_format == "channels_last":
        lowered = functools.partial(direct.conv_direct, spec=spec)
    else:
        x, w = jnp.moveaxis(x, -1, 1), jnp.moveaxis(w, (-1, -2), (1, 2))
        lowered = functools.partial(direct.conv_direct_channels_first, spec=spec)
    in_ynnpack, total = _ynnpack_convolutions(jax.jit(lowered).lower(x, w).compile().as_text())
    assert (in_ynnpack, total) == (0, 8)  # one conv per sample of the 8-sample step, none in YNNPACK
    # And the check can fail: the same per-sample conv without the extra row goes to YNNPACK.
    x1, w1 = jnp.ones((1, *case.spatial, 24), jnp.float32), jnp.ones((*case.kernel_size, 24, 24), jnp.float32)
    plain = jax.jit(lambda x, w: canonical.shared_conv(x, w, spec, 1)).lower(x1, w1).compile().as_text()
    assert _ynnpack_convolutions(plain) == (1, 1)
