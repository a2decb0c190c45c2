"""PyTorch reference for involution (d-li14/involution's naive PyTorch module), written out line by line.

Source: d-li14/involution at commit 21c3158fcbb4ecda8ed4626fcae8b01be511a598 (2021-04-22):
``cls/mmcls/models/utils/involution_naive.py`` (last changed in cdcd4b7abaf04f9349fcfdf9ab4fc728cee08132,
2021-03-10; ``det/mmdet/models/utils/involution_naive.py`` and ``seg/mmseg/models/utils/involution_naive.py`` are
the same file). Li et al., "Involution: Inverting the Inherence of Convolution for Visual Recognition", CVPR 2021.

``involution`` is the original's class: every statement is the original's, in its order, with the original's
names. The edits:

* ``reduction_ratio`` and ``group_channels``, hard-coded in the original (``reduction_ratio = 4``,
  ``self.group_channels = 16``), are keyword arguments with those defaults (``self.group_channels =
  group_channels``; the local ``reduction_ratio = 4`` line goes, the argument takes its place);
* ``pool_ceil_mode: bool = False``, passed to the stride > 1 ``nn.AvgPool2d(stride, stride, ceil_mode=...)``: the
  one edit that defines the odd-size case below (with the default the pool is the original's);
* ``ConvModule`` is a minimal plain-torch stand-in (below) for ``mmcv.cnn.ConvModule``, not mmcv's code;
* formatting (``kernel_size - 1``).

The involution: a kernel per output position and group, ``W = conv2(conv1(x or avgpool(x)))`` of shape
(B, G * K * K, H', W') (``conv1``: 1x1 conv to ``C // reduction_ratio`` channels, BN, ReLU; ``conv2``: 1x1 conv with
bias to ``K * K * G`` channels, G = C // group_channels, the channel index ``g * K * K + u * K + v``), applied to
``nn.Unfold(K, dilation 1, padding (K - 1) // 2, stride)`` patches of ``x``:
``y[b, c, i, j] = sum_{u,v} W[b, g(c), u, v, i, j] * x[b, c, i*s + u - p, j*s + v - p]`` (zero outside),
``g(c) = c // group_channels``, ``p = (K - 1) // 2``.

State dict, as mmcv's ``ConvModule`` names it (checked against mmcv-lite 2.2.0): ``conv1.conv.weight``,
``conv1.bn.weight``, ``conv1.bn.bias``, ``conv1.bn.running_mean``, ``conv1.bn.running_var``,
``conv1.bn.num_batches_tracked``, ``conv2.conv.weight``, ``conv2.conv.bias`` (``bias='auto'``: no conv bias where a
norm follows). ``avgpool`` and ``unfold`` hold no state.

Behaviour kept as the original has it (documented, not fixed; checked by running):

* Stride > 1 with a size not divisible by the stride: the kernel branch's ``AvgPool2d(s, s)`` gives
  ``floor(H / s)`` rows, while ``nn.Unfold`` gives ``floor((H + 2p - K) / s) + 1`` = ``floor((H - 1) / s) + 1`` =
  ``ceil(H / s)`` positions for odd K. The original then fails in ``forward`` at
  ``self.unfold(x).view(b, self.groups, self.group_channels, self.kernel_size**2, h, w)`` with ``RuntimeError:
  shape '[2, 2, 16, 49, 4, 4]' is invalid for input of size 78400`` (C = 32, K = 7, s = 2, 9 x 9 input: 4 x 4
  kernels, 5 x 5 patches). Sizes divisible by the stride run. ``pool_ceil_mode=True`` defines the case:
  ``AvgPool2d(s, s, ceil_mode=True)`` gives ``ceil(H / s)`` rows, the last window partial, and PyTorch divides a
  partial window by its number of in-bounds pixels (padding is 0), i.e. it averages the pixels it covers (a 9 x 9
  input, s = 2: the last row of windows averages 1 x 2 pixels, the corner 1 x 1).
* Even K: the Unfold padding ``(K - 1) // 2 = K / 2 - 1`` gives ``floor((H - 2) / s) + 1`` positions. At stride 1
  that is ``H - 1`` against ``H`` kernels and the same ``view`` fails (K = 4, 8 x 8: ``shape '[2, 2, 16, 16, 8, 8]'
  is invalid for input of size 50176``); at stride 2 it equals ``floor(H / 2)`` for every H and runs; at stride 3
  it runs for some sizes only (H = 8 fails). ``pool_ceil_mode=True`` is meant for odd K: with even K it can make a
  size that runs fail (K = 2, s = 2, H = 9: 5 kernels against 4 patches).
* ``channels`` must be a multiple of ``group_channels`` (else the same ``view`` fails), and ``channels //
  reduction_ratio`` must be at least 1.

d-li14/involution's licence notice, kept as its MIT licence asks:

    MIT License

    Copyright (c) 2021 Duo Li

    Permission is hereby granted, free of charge, to any person obtaining a copy
    of this software and associated documentation files (the "Software"), to deal
    in the Software without restriction, including without limitation the rights
    to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
    copies of the Software, and to permit persons to whom the Software is
    furnished to do so, subject to the following conditions:

    The above copyright notice and this permission notice shall be included in all
    copies or substantial portions of the Software.

    THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
    IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
    FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
    AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
    LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
    OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
    SOFTWARE.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
import torch.nn as nn

INVOLUTION_REPO = "https://github.com/d-li14/involution"
INVOLUTION_COMMIT = "21c3158fcbb4ecda8ed4626fcae8b01be511a598"
INVOLUTION_PATH = "cls/mmcls/models/utils/involution_naive.py"

__all__ = ["ConvModule", "involution"]


_RELU = MappingProxyType({"type": "ReLU"})  # mmcv's default act_cfg, dict(type='ReLU'), read-only


class ConvModule(nn.Module):
    """Stand-in for ``mmcv.cnn.ConvModule`` (mmcv 1.x and 2.x alike), for what ``involution`` uses of it.

    Not mmcv's code: a plain-torch module with its behaviour and names for these arguments. A 2-d conv
    (``conv_cfg=None``) as ``self.conv``; ``bias='auto'`` means a conv bias only without a norm; ``norm_cfg=
    {'type': 'BN'}`` adds ``nn.BatchNorm2d(out_channels, eps=1e-5)`` as ``self.bn`` (mmcv's name for a batch norm);
    ``act_cfg={'type': 'ReLU'}`` (the default) adds ``nn.ReLU(inplace=True)`` as ``self.activate``; ``None`` leaves
    either out. Order conv, norm, activation. Initialised as mmcv does: the conv weight ``kaiming_normal_``
    (``fan_out``, ReLU gain), its bias 0; the norm weight 1, bias 0. Other configs raise ``NotImplementedError``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
        dilation: int = 1, groups: int = 1, bias: bool | str = "auto", conv_cfg: Mapping[str, Any] | None = None,
        norm_cfg: Mapping[str, Any] | None = None, act_cfg: Mapping[str, Any] | None = _RELU, inplace: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        norm_cfg, act_cfg = (None if cfg is None else dict(cfg) for cfg in (norm_cfg, act_cfg))
        if conv_cfg is not None or norm_cfg not in (None, {"type": "BN"}) or act_cfg not in (None, {"type": "ReLU"}):
            raise NotImplementedError(f"ConvModule stand-in: {conv_cfg=}, {norm_cfg=}, {act_cfg=}")
        self.with_norm = norm_cfg is not None
        self.with_activation = act_cfg is not None
        if bias == "auto":
            bias = not self.with_norm
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=bias)
        self.norm_name = "bn" if self.with_norm else None
        if self.with_norm:
            self.bn = nn.BatchNorm2d(out_channels, eps=1e-5)
        if self.with_activation:
            self.activate = nn.ReLU(inplace=inplace)
        nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.constant_(self.conv.bias, 0)
        if self.with_norm:
            nn.init.constant_(self.bn.weight, 1)
            nn.init.constant_(self.bn.bias, 0)

    @property
    def norm(self) -> nn.Module | None:
        return getattr(self, self.norm_name) if self.norm_name else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.with_norm:
            x = self.bn(x)
        if self.with_activation:
            x = self.activate(x)
        return x


class involution(nn.Module):
    def __init__(self, channels, kernel_size, stride, reduction_ratio=4, group_channels=16, pool_ceil_mode=False):
        super(involution, self).__init__()  # noqa: UP008 (the original's call)
        self.kernel_size = kernel_size
        self.stride = stride
        self.channels = channels
        self.group_channels = group_channels
        self.groups = self.channels // self.group_channels
        self.conv1 = ConvModule(
            in_channels=channels,
            out_channels=channels // reduction_ratio,
            kernel_size=1,
            conv_cfg=None,
            norm_cfg=dict(type="BN"),
            act_cfg=dict(type="ReLU"),
        )
        self.conv2 = ConvModule(
            in_channels=channels // reduction_ratio,
            out_channels=kernel_size**2 * self.groups,
            kernel_size=1,
            stride=1,
            conv_cfg=None,
            norm_cfg=None,
            act_cfg=None,
        )
        if stride > 1:
            self.avgpool = nn.AvgPool2d(stride, stride, ceil_mode=pool_ceil_mode)
        self.unfold = nn.Unfold(kernel_size, 1, (kernel_size - 1) // 2, stride)

    def forward(self, x):
        weight = self.conv2(self.conv1(x if self.stride == 1 else self.avgpool(x)))
        b, c, h, w = weight.shape  # noqa: RUF059 (the original's unpacking)
        weight = weight.view(b, self.groups, self.kernel_size**2, h, w).unsqueeze(2)
        out = self.unfold(x).view(b, self.groups, self.group_channels, self.kernel_size**2, h, w)
        out = (weight * out).sum(dim=3).view(b, self.channels, h, w)
        return out
