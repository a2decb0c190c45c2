"""Ties ``parity/involution_reference.py`` (d-li14/involution's naive module) to involution's definition, in float64.

The definition, written independently with NumPy: the kernel branch is ``x`` average-pooled over s x s blocks
(stride s > 1; with ``pool_ceil_mode`` the last, partial blocks average the pixels they cover), a 1x1 conv to
``C // r`` channels, batch norm (eval: running statistics; train: the batch's mean and biased variance), ReLU, and
a 1x1 conv with bias to ``G K K`` channels, read as ``W[b, g, u, v, i, j]`` from channel ``g K K + u K + v``; then

    y[b, c, i, j] = sum_{u,v} W[b, g(c), u, v, i, j] * x[b, c, i*s + u - p, j*s + v - p]   (zero outside)

with ``g(c) = c // group_channels`` and ``p = (K - 1) // 2``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from .involution_reference import ConvModule, involution

TOL = 1e-12


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """PyTorch on one thread, as ``test_kernel_mix.py``: at these tiny shapes intra-op threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _np(tensor: torch.Tensor | None) -> np.ndarray:
    assert tensor is not None
    return tensor.detach().numpy()


def _avg_pool(x: np.ndarray, s: int, ceil: bool) -> np.ndarray:
    """Mean over s x s blocks; ``ceil``: partial blocks at the end too, averaging the pixels they cover."""
    n, c, h, w = x.shape
    ho, wo = (-(-h // s), -(-w // s)) if ceil else (h // s, w // s)
    out = np.zeros((n, c, ho, wo))
    for i, j in np.ndindex(ho, wo):
        out[:, :, i, j] = x[:, :, i * s : min(i * s + s, h), j * s : min(j * s + s, w)].mean(axis=(2, 3))
    return out


def _definition(module: involution, x: np.ndarray, train: bool, ceil: bool) -> np.ndarray:
    k, s, gc = module.kernel_size, module.stride, module.group_channels
    n, channels, height, width = x.shape
    pooled = x if s == 1 else _avg_pool(x, s, ceil)
    z = np.einsum("oc,nchw->nohw", _np(module.conv1.conv.weight)[:, :, 0, 0], pooled)
    bn = module.conv1.bn
    if train:
        mean, var = z.mean(axis=(0, 2, 3)), z.var(axis=(0, 2, 3))
    else:
        mean, var = _np(bn.running_mean), _np(bn.running_var)
    z = (z - mean[:, None, None]) / np.sqrt(var[:, None, None] + bn.eps)
    z = np.maximum(z * _np(bn.weight)[:, None, None] + _np(bn.bias)[:, None, None], 0.0)
    kern = np.einsum("oc,nchw->nohw", _np(module.conv2.conv.weight)[:, :, 0, 0], z)
    kern += _np(module.conv2.conv.bias)[:, None, None]
    groups, ho, wo = channels // gc, kern.shape[2], kern.shape[3]
    kern = kern.reshape(n, groups, k, k, ho, wo)
    p = (k - 1) // 2
    per_channel = np.repeat(kern, gc, axis=1)  # [:, c] is group c // gc's kernel
    y = np.zeros((n, channels, ho, wo))
    for i, j, u, v in np.ndindex(ho, wo, k, k):
        r, q = i * s + u - p, j * s + v - p
        if 0 <= r < height and 0 <= q < width:
            y[:, :, i, j] += per_channel[:, :, u, v, i, j] * x[:, :, r, q]
    return y


def _randomised(module: involution, seed: int) -> involution:
    generator = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            param.copy_(1.0 + 0.2 * noise if name == "conv1.bn.weight" else 0.5 * noise)
        module.conv1.bn.running_mean.copy_(0.3 * torch.randn(module.conv1.bn.running_mean.shape, generator=generator))
        module.conv1.bn.running_var.copy_(0.5 + torch.rand(module.conv1.bn.running_var.shape, generator=generator))
    return module


@pytest.mark.parametrize(
    ("channels", "kernel", "stride", "size", "group_channels", "reduction_ratio", "train", "ceil"),
    [
        (16, 3, 1, (6, 7), 16, 4, False, False),  # the original's hard-coded group_channels 16, reduction 4
        (32, 7, 1, (5, 6), 16, 4, True, False),  # K = 7 > the image: most taps read the zero padding
        (32, 3, 2, (8, 6), 16, 4, False, False),  # stride 2, sizes divisible by it
        (8, 5, 3, (6, 9), 4, 2, True, False),
        (8, 1, 1, (4, 5), 2, 2, False, False),
        (8, 3, 2, (7, 9), 4, 2, False, True),  # odd sizes: defined by pool_ceil_mode
        (8, 5, 3, (7, 8), 2, 4, True, True),
        (12, 3, 2, (1, 3), 4, 3, False, True),  # smaller than the stride
    ],
)
def test_matches_definition(
    channels: int, kernel: int, stride: int, size: tuple[int, int], group_channels: int, reduction_ratio: int,
    train: bool, ceil: bool,
) -> None:  # fmt: skip
    module = involution(
        channels, kernel, stride, reduction_ratio=reduction_ratio, group_channels=group_channels, pool_ceil_mode=ceil
    )
    module = _randomised(module, channels + kernel).train(train)
    x = torch.randn(2, channels, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(kernel))
    want = _definition(module, x.numpy(), train, ceil)  # before the forward: train mode updates the running stats
    got = module(x).detach().numpy()
    assert got.shape == want.shape == (2, channels, -(-size[0] // stride), -(-size[1] // stride))
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL * max(1.0, np.abs(want).max()))


def test_odd_size_with_stride_fails_as_the_original_unless_pool_ceil_mode() -> None:
    """AvgPool2d(2, 2) gives floor(9 / 2) = 4 kernels a side, Unfold ceil(9 / 2) = 5 patches: ``view`` fails."""
    x = torch.randn(2, 32, 9, 9, dtype=torch.float64)
    module = _randomised(involution(32, 7, 2), 0).eval()
    with pytest.raises(RuntimeError, match=r"^shape '\[2, 2, 16, 49, 4, 4\]' is invalid for input of size 78400$"):
        module(x)
    ceil = _randomised(involution(32, 7, 2, pool_ceil_mode=True), 0).eval()
    got = ceil(x).detach().numpy()
    np.testing.assert_allclose(got, _definition(ceil, x.numpy(), False, True), rtol=0, atol=1e-12 * np.abs(got).max())
    pooled = ceil.avgpool(x)  # PyTorch's ceil_mode: a partial window averages its in-bounds pixels
    assert torch.equal(pooled[:, :, 4, 4], x[:, :, 8, 8])
    np.testing.assert_allclose(pooled[:, :, 4, 0].numpy(), x[:, :, 8, 0:2].mean(-1).numpy(), rtol=1e-15)
    # even K: padding K / 2 - 1 leaves H - 1 patches at stride 1
    with pytest.raises(RuntimeError, match=r"^shape '\[2, 2, 16, 16, 8, 8\]' is invalid for input of size 50176$"):
        involution(32, 4, 1)(torch.randn(2, 32, 8, 8))


def test_state_dict_is_mmcvs() -> None:
    module = involution(32, 7, 2)
    assert list(module.state_dict()) == [
        "conv1.conv.weight", "conv1.bn.weight", "conv1.bn.bias", "conv1.bn.running_mean", "conv1.bn.running_var",
        "conv1.bn.num_batches_tracked", "conv2.conv.weight", "conv2.conv.bias",
    ]  # fmt: skip
    assert module.conv1.conv.weight.shape == (8, 32, 1, 1)  # reduction_ratio 4
    assert module.conv2.conv.weight.shape == (49 * 2, 8, 1, 1)  # K^2 x groups, group_channels 16
    assert module.groups == 2
    assert module.avgpool.ceil_mode is False
    assert not hasattr(involution(32, 3, 1), "avgpool")


def test_conv_module_stand_in() -> None:
    default = ConvModule(8, 4, 1, norm_cfg={"type": "BN"})  # act_cfg defaults to ReLU, as mmcv's
    assert [name for name, _ in default.named_children()] == ["conv", "bn", "activate"]
    assert default.conv.bias is None
    assert default.norm is default.bn
    assert isinstance(default.activate, torch.nn.ReLU)
    assert default.activate.inplace
    assert default.bn.eps == 1e-5
    assert default.bn.weight.eq(1).all()
    assert not default.bn.bias.any()
    plain = ConvModule(8, 4, 1, norm_cfg=None, act_cfg=None)
    assert [name for name, _ in plain.named_children()] == ["conv"]
    assert plain.norm is None
    assert plain.conv.bias is not None
    assert not plain.conv.bias.any()
    x = torch.randn(2, 8, 3, 3)
    assert torch.equal(plain(x), torch.nn.functional.conv2d(x, plain.conv.weight, plain.conv.bias))
    with pytest.raises(NotImplementedError):
        ConvModule(8, 4, 1, norm_cfg={"type": "GN", "num_groups": 2})
