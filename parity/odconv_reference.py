"""PyTorch reference for ODConv: the original ``Attention`` and ``ODConv2d``, written out line by line.

Source: OSVAI/ODConv, ``modules/odconv.py`` at commit 0901cc1ccd75757b40420447db20603d30bd2f74 (Li et al.,
"Omni-Dimensional Dynamic Convolution", ICLR 2022). Every statement is the original's, in its order, with
one generalisation: ``num_spatial`` (1, 2 or 3, default 2) picks ``nn.Conv{N}d``, ``nn.AdaptiveAvgPool{N}d``,
``nn.BatchNorm{N}d`` and ``F.conv{N}d``, and the views that hard-code two spatial dims (``view(B, -1, 1, 1)``,
``view(..., kernel_size, kernel_size)``, ``reshape(1, -1, height, width)``) get ``num_spatial`` of them. That
is faithful: the original's maths never mixes the spatial axes (a global average pool, 1x1 convs, one spatial
weight per tap in row-major order, one grouped conv), so the N-d form is the same function of its inputs with
one more or one less axis. With ``num_spatial=2`` every call, shape and initialiser is the original's
(``kernel_size`` is an int, a square kernel, as there); ``ODConv2d`` here is ``ODConvNd`` with
``num_spatial=2``. The original keeps the temperature as module state (``update_temperature``), as here.

Parameter names are the original's (``weight``, ``attention.fc.weight``, ``attention.bn.*``,
``attention.{channel,filter,spatial,kernel}_fc.{weight,bias}``): ``jdynconv.interop`` maps them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _conv(num_spatial: int) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[num_spatial]


def _pool(num_spatial: int) -> type[nn.Module]:
    return {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[num_spatial]


def _batch_norm(num_spatial: int) -> type[nn.Module]:
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[num_spatial]


def _functional_conv(num_spatial: int) -> Callable[..., torch.Tensor]:
    return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[num_spatial]


class Attention(nn.Module):
    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int,
        groups: int = 1,
        reduction: float = 0.0625,
        kernel_num: int = 4,
        min_channel: int = 16,
        num_spatial: int = 2,
    ) -> None:
        super().__init__()
        attention_channel = max(int(in_planes * reduction), min_channel)
        self.kernel_size = kernel_size
        self.kernel_num = kernel_num
        self.temperature = 1.0
        self.num_spatial = num_spatial
        conv = _conv(num_spatial)

        self.avgpool = _pool(num_spatial)(1)
        self.fc = conv(in_planes, attention_channel, 1, bias=False)
        self.bn = _batch_norm(num_spatial)(attention_channel)
        self.relu = nn.ReLU(inplace=True)

        self.channel_fc = conv(attention_channel, in_planes, 1, bias=True)
        self.func_channel = self.get_channel_attention

        if in_planes == groups and in_planes == out_planes:  # depth-wise convolution
            self.func_filter = self.skip
        else:
            self.filter_fc = conv(attention_channel, out_planes, 1, bias=True)
            self.func_filter = self.get_filter_attention

        if kernel_size == 1:  # point-wise convolution
            self.func_spatial = self.skip
        else:
            self.spatial_fc = conv(attention_channel, kernel_size**num_spatial, 1, bias=True)
            self.func_spatial = self.get_spatial_attention

        if kernel_num == 1:
            self.func_kernel = self.skip
        else:
            self.kernel_fc = conv(attention_channel, kernel_num, 1, bias=True)
            self.func_kernel = self.get_kernel_attention

        self._initialize_weights()

    def _initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, _conv(self.num_spatial)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            if isinstance(m, _batch_norm(self.num_spatial)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def update_temperature(self, temperature: float) -> None:
        self.temperature = temperature

    @staticmethod
    def skip(_: torch.Tensor) -> float:
        return 1.0

    def get_channel_attention(self, x: torch.Tensor) -> torch.Tensor:
        ones = (1,) * self.num_spatial
        channel_attention = torch.sigmoid(self.channel_fc(x).view(x.size(0), -1, *ones) / self.temperature)
        return channel_attention

    def get_filter_attention(self, x: torch.Tensor) -> torch.Tensor:
        ones = (1,) * self.num_spatial
        filter_attention = torch.sigmoid(self.filter_fc(x).view(x.size(0), -1, *ones) / self.temperature)
        return filter_attention

    def get_spatial_attention(self, x: torch.Tensor) -> torch.Tensor:
        taps = (self.kernel_size,) * self.num_spatial
        spatial_attention = self.spatial_fc(x).view(x.size(0), 1, 1, 1, *taps)
        spatial_attention = torch.sigmoid(spatial_attention / self.temperature)
        return spatial_attention

    def get_kernel_attention(self, x: torch.Tensor) -> torch.Tensor:
        ones = (1,) * self.num_spatial
        kernel_attention = self.kernel_fc(x).view(x.size(0), -1, 1, 1, *ones)
        kernel_attention = F.softmax(kernel_attention / self.temperature, dim=1)
        return kernel_attention

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | float, ...]:
        x = self.avgpool(x)
        x = self.fc(x)
        x = self.bn(x)
        x = self.relu(x)
        return self.func_channel(x), self.func_filter(x), self.func_spatial(x), self.func_kernel(x)


class ODConvNd(nn.Module):
    """The original ``ODConv2d`` for ``num_spatial`` spatial dims: ``x (B, C_in, *S) -> (B, C_out, *S')``."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        reduction: float = 0.0625,
        kernel_num: int = 4,
        num_spatial: int = 2,
    ) -> None:
        super().__init__()
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.kernel_num = kernel_num
        self.num_spatial = num_spatial
        self.attention = Attention(
            in_planes,
            out_planes,
            kernel_size,
            groups=groups,
            reduction=reduction,
            kernel_num=kernel_num,
            num_spatial=num_spatial,
        )
        taps = (kernel_size,) * num_spatial
        self.weight = nn.Parameter(torch.randn(kernel_num, out_planes, in_planes // groups, *taps), requires_grad=True)
        self._initialize_weights()

        if self.kernel_size == 1 and self.kernel_num == 1:
            self._forward_impl = self._forward_impl_pw1x
        else:
            self._forward_impl = self._forward_impl_common

    def _initialize_weights(self) -> None:
        for i in range(self.kernel_num):
            nn.init.kaiming_normal_(self.weight[i], mode="fan_out", nonlinearity="relu")

    def update_temperature(self, temperature: float) -> None:
        self.attention.update_temperature(temperature)

    def _forward_impl_common(self, x: torch.Tensor) -> torch.Tensor:
        # Multiplying channel attention (or filter attention) to weights and feature maps are equivalent,
        # while we observe that when using the latter method the models will run faster with less gpu memory cost.
        channel_attention, filter_attention, spatial_attention, kernel_attention = self.attention(x)
        batch_size, in_planes, *size = x.size()  # noqa: RUF059 (the original's statement)
        x = x * channel_attention
        x = x.reshape(1, -1, *size)
        aggregate_weight = spatial_attention * kernel_attention * self.weight.unsqueeze(dim=0)
        aggregate_weight = torch.sum(aggregate_weight, dim=1).view(
            [-1, self.in_planes // self.groups, *(self.kernel_size,) * self.num_spatial]
        )
        output = _functional_conv(self.num_spatial)(
            x,
            weight=aggregate_weight,
            bias=None,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups * batch_size,
        )
        output = output.view(batch_size, self.out_planes, *output.shape[2:])
        output = output * filter_attention
        return output

    def _forward_impl_pw1x(self, x: torch.Tensor) -> torch.Tensor:
        channel_attention, filter_attention, spatial_attention, kernel_attention = self.attention(x)  # noqa: RUF059
        x = x * channel_attention
        output = _functional_conv(self.num_spatial)(
            x,
            weight=self.weight.squeeze(dim=0),
            bias=None,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
        )
        output = output * filter_attention
        return output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_impl(x)
