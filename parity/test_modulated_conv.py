"""Parity of ``jdynconv.modulated_conv`` and ``jdynconv.per_sample_conv_transpose`` with PyTorch references.

* ``modulated_conv``: ``modulated_conv2d`` of ``parity/stylegan2_reference.py``, a clean-room PyTorch reference of
  StyleGAN2's modulated convolution (held to float64 definitions in ``test_stylegan2_reference.py``; compared
  with NVIDIA's stylegan2-ada-pytorch by ``check_against_nvidia.py``). Both of its paths (``fused_modconv``
  True and False) against both of jdynconv's, forward and the gradients of ``sum(y * g)`` w.r.t. inputs,
  weight and styles.
* ``per_sample_conv_transpose``: ``F.conv_transpose{1,2,3}d`` per sample, in a Python loop.

Tolerance: parity's ``RTOL`` (``conftest.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jdynconv as jdc
from parity import stylegan2_reference as reference

MODULATED_CASES = [
    # kernel size, up, down, padding, demodulate, flip_weight (SynthesisLayer's: up == 1)
    (3, 1, 1, 1, True, True),
    (3, 2, 1, 1, True, False),
    (3, 1, 2, 1, True, True),
    (1, 1, 1, 0, False, True),  # ToRGB
    (1, 2, 1, 0, True, False),
    (1, 1, 2, 0, True, True),
    (3, 2, 1, 0, False, True),
    (3, 1, 1, 1, False, False),
]


@pytest.mark.parametrize("case", MODULATED_CASES, ids=str)
def test_modulated_conv_matches_reference(case, assert_close) -> None:
    kernel_size, up, down, padding, demodulate, flip_weight = case
    rng = np.random.default_rng(kernel_size * 10 + up * 3 + down)
    batch, in_channels, out_channels, size = 3, 5, 4, 8
    x = rng.normal(size=(batch, in_channels, size, size)).astype(np.float32)
    weight = rng.normal(size=(out_channels, in_channels, kernel_size, kernel_size)).astype(np.float32)
    styles = (1 + 0.5 * rng.normal(size=(batch, in_channels))).astype(np.float32)
    resample_filter = reference.setup_filter([1, 3, 3, 1])
    cotangent = None
    results = {}
    for fused in (True, False):

        def jax_fn(x, weight, styles, fused=fused):
            return jdc.modulated_conv(
                x,
                weight,
                styles,
                up=up,
                down=down,
                padding=padding,
                demodulate=demodulate,
                flip_weight=flip_weight,
                fused=fused,
                data_format="channels_first",
            )

        out, vjp = jax.vjp(jax.jit(jax_fn), x, weight, styles)
        if cotangent is None:
            cotangent = rng.normal(size=out.shape).astype(np.float32)
        results[fused] = (out, vjp(jnp.asarray(cotangent)))

    for torch_fused in (True, False):
        tensors = [torch.tensor(a, requires_grad=True) for a in (x, weight, styles)]
        expected = reference.modulated_conv2d(
            *tensors,
            up=up,
            down=down,
            padding=padding,
            resample_filter=resample_filter,
            demodulate=demodulate,
            flip_weight=flip_weight,
            fused_modconv=torch_fused,
        )
        expected_grads = torch.autograd.grad(expected, tensors, torch.tensor(cotangent))
        for fused, (out, grads) in results.items():
            label = f"jdynconv fused={fused} vs reference fused_modconv={torch_fused}"
            assert_close(out, expected.detach().numpy(), f"{label}: output")
            for name, grad, want in zip(("x", "weight", "styles"), grads, expected_grads, strict=True):
                assert_close(grad, want.numpy(), f"{label}: d_{name}")


TORCH_TRANSPOSES: dict[int, Callable[..., torch.Tensor]] = {
    1: F.conv_transpose1d,
    2: F.conv_transpose2d,
    3: F.conv_transpose3d,
}


@pytest.mark.parametrize(
    ("spatial", "kernel_size", "stride", "padding", "output_padding", "dilation", "groups"),
    [
        ((7,), 4, 2, 1, 0, 1, 1),
        ((5, 6), 3, 2, 1, 1, 1, 2),
        ((4, 4), 3, 2, 2, 1, 2, 1),
        ((3, 3, 2), 3, 2, 0, 1, 1, 1),
    ],
)
def test_conv_transpose_matches_torch(
    spatial, kernel_size, stride, padding, output_padding, dilation, groups, assert_close
) -> None:
    rng = np.random.default_rng(len(spatial) + kernel_size)
    batch, in_channels, group_out = 3, 4, 3
    x = rng.normal(size=(batch, in_channels, *spatial)).astype(np.float32)
    w = rng.normal(size=(batch, in_channels, group_out, *(kernel_size,) * len(spatial))).astype(np.float32)
    bias = rng.normal(size=(batch, group_out * groups)).astype(np.float32)
    settings = {"stride": stride, "padding": padding, "output_padding": output_padding, "dilation": dilation}

    def torch_fn(x, w, bias):
        conv = TORCH_TRANSPOSES[len(spatial)]
        return torch.cat([conv(x[b : b + 1], w[b], bias[b], groups=groups, **settings) for b in range(batch)])

    tensors = [torch.tensor(a, requires_grad=True) for a in (x, w, bias)]
    expected = torch_fn(*tensors)
    cotangent = rng.normal(size=tuple(expected.shape)).astype(np.float32)
    expected_grads = torch.autograd.grad(expected, tensors, torch.tensor(cotangent))

    def jax_fn(x, w, bias):
        return jdc.per_sample_conv_transpose(
            x,
            w,
            bias,
            strides=stride,
            padding=padding,
            output_padding=output_padding,
            kernel_dilation=dilation,
            feature_group_count=groups,
            data_format="channels_first",
        )

    out, vjp = jax.vjp(jax.jit(jax_fn), x, w, bias)
    assert_close(out, expected.detach().numpy(), "output")
    for name, grad, want in zip(("x", "w", "bias"), vjp(jnp.asarray(cotangent)), expected_grads, strict=True):
        assert_close(grad, want.numpy(), f"d_{name}")
