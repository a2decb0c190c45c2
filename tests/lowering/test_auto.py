"""``auto``'s rule: which lowering it takes, by platform and on CPU by shape."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import pytest

from jdynconv import _lowering
from jdynconv._lowering import auto, canonical, methods
from tests.helpers import equation_params


@pytest.mark.parametrize(
    ("spatial", "in_channels", "out_channels", "strides", "groups", "dtype", "channels_first", "expected"),
    [
        ((32, 32), 64, 64, 1, 1, jnp.float32, False, True),  # the kernel-mixing conv
        ((32, 32), 64, 64, 1, 1, jnp.float32, True, True),  # the same in PyTorch's layout
        ((128,), 64, 64, 1, 1, jnp.float32, True, True),  # 1d-a
        ((16, 16), 128, 128, 1, 1, jnp.float32, False, False),  # more than 64 channels
        ((16, 16), 128, 128, 1, 1, jnp.float32, True, False),  # the same in PyTorch's layout
        ((32, 32), 32, 128, 1, 1, jnp.float32, False, False),  # more than 64 channels out only
        ((32, 32), 128, 32, 1, 1, jnp.float32, True, False),  # more than 64 channels in only
        ((32, 32), 64, 64, 2, 1, jnp.float32, False, False),  # 2-D, stride 2: YNNPACK's, not measured
        ((8, 8, 8), 32, 32, 1, 1, jnp.float32, False, False),  # 3d-a: 3-D stays im2col
        ((32, 32), 64, 64, 1, 2, jnp.float32, False, False),  # grouped: not measured
        ((32, 32), 64, 64, 1, 1, jnp.bfloat16, False, False),  # not float32: not measured
        ((16,), 8, 8, 1, 1, jnp.float32, False, False),  # seed-sized: too small a sample to loop over
    ],
)
def test_direct_rule(spatial, in_channels, out_channels, strides, groups, dtype, channels_first, expected) -> None:
    n = len(spatial)
    if channels_first:
        inputs = jax.ShapeDtypeStruct((64, in_channels, *spatial), dtype)
        kernels = jax.ShapeDtypeStruct((64, out_channels, in_channels // groups, *(3,) * n), dtype)
    else:
        inputs = jax.ShapeDtypeStruct((64, *spatial, in_channels), dtype)
        kernels = jax.ShapeDtypeStruct((64, *(3,) * n, in_channels // groups, out_channels), dtype)
    spec = canonical.ConvSpec((strides,) * n, ((1, 1),) * n, (1,) * n, (1,) * n, groups)
    assert auto.uses_direct(inputs, kernels, spec, channels_first=channels_first) is expected


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_cpu_auto_takes_direct_where_the_rule_says(data_format: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` on CPU: a conv per sample where :func:`uses_direct` holds, im2col's matmuls otherwise; the rule
    asked about the arguments' own layout."""
    channels_first = data_format == "channels_first"
    x = jnp.ones((3, 2, 5, 6) if channels_first else (3, 5, 6, 2), jnp.float32)
    w = jnp.ones((3, 4, 2, 3, 3) if channels_first else (3, 3, 3, 2, 4), jnp.float32)
    spec = canonical.ConvSpec((1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 1)
    cpu_auto = _lowering.CHANNELS_FIRST_FORMS[auto.conv_cpu_auto] if channels_first else auto.conv_cpu_auto
    asked = []

    def convs(answer: bool) -> int:
        def rule(inputs: Any, kernels: Any, spec: Any, *, channels_first: bool) -> bool:
            asked.append(channels_first)
            return answer

        monkeypatch.setattr(auto, "uses_direct", rule)
        return len(equation_params("conv_general_dilated", functools.partial(cpu_auto, spec=spec), x, w))

    assert convs(True) == 3
    assert convs(False) == 0
    assert asked == [channels_first, channels_first]


def test_auto_rule_by_platform() -> None:
    """``"default"`` is what :func:`jdynconv._platform.by_platform` asks for every platform but CPU."""
    assert auto.choose_lowering("cpu") is auto.conv_cpu_auto
    for platform in ("default", "cuda", "rocm", "tpu"):
        assert auto.choose_lowering(platform) is methods.conv_grouped_im2col_grad
