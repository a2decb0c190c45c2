"""PyTorch references for CondConv and DynamicConv.

**CondConv** is timm's own ``CondConv2d`` (``timm/layers/cond_conv2d.py``, timm 1.0.31), imported from
the installed package without running ``timm/__init__.py``: that imports ``timm.models``, which needs
torchvision, which has no CPU wheel here. ``cond_conv2d.py`` itself needs only torch and four sibling
modules (``_fx``, ``helpers``, ``conv2d_same``, ``padding``, ``config``), so :func:`load_timm_cond_conv2d`
registers empty stand-ins for the parent packages ``timm`` and ``timm.layers`` whose ``__path__`` is the
installed one, imports ``timm.layers.cond_conv2d`` from its file, then takes the stand-ins out of
``sys.modules`` again (the loaded module keeps its own references). Install it with
``pip install --no-deps timm==1.0.31``.

:class:`RoutedCondConv2d` adds timm's routing to it, as timm's ``CondConvResidual`` block computes it:
``routing_fn = nn.Linear(C_in, k)``, ``routing = sigmoid(routing_fn(adaptive_avg_pool2d(x, 1).flatten(1)))``.

**DynamicConv** follows kaijieshi7/Dynamic-convolution-Pytorch (``dynamic_conv.py``: ``attention1d/2d/3d``
and ``Dynamic_conv1d/2d/3d``), written once for 1-D to 3-D: attention = adaptive average pool -> ``fc1``
(1x1 conv, no bias) -> relu -> ``fc2`` (1x1 conv with bias) -> ``softmax(logits / temperature)``; the
per-sample kernels ``attention @ weight.view(k, -1)`` run as one conv with ``groups = G * B`` over the
batch folded into channels; bias ``attention @ bias``. Parameter names and shapes are that code's. Two
deliberate differences: the hidden width is always ``int(C_in * ratio) + 1`` (that code uses ``k`` when
C_in is 3), and the temperature is a plain attribute without that code's ``assert temperature % 3 == 1``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TIMM_VERSION = "1.0.31"
TIMM_INSTALL = f"pip install --no-deps timm=={TIMM_VERSION}"


def load_timm_cond_conv2d() -> types.ModuleType:
    """``timm.layers.cond_conv2d`` from the installed timm, without executing ``timm/__init__.py``.

    Raises:
      ImportError: timm is not installed (with the command that installs it).
    """
    spec = importlib.util.find_spec("timm")  # finds the package; runs none of its code
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The CondConv parity tests need timm's CondConv2d: {TIMM_INSTALL}")
    root = Path(next(iter(spec.submodule_search_locations)))
    saved = {name: module for name, module in sys.modules.items() if name == "timm" or name.startswith("timm.")}
    for name, path in (("timm", root), ("timm.layers", root / "layers")):
        stand_in = types.ModuleType(name)
        stand_in.__path__ = [str(path)]
        sys.modules[name] = stand_in
    try:
        return importlib.import_module("timm.layers.cond_conv2d")
    finally:
        for name in [name for name in sys.modules if name == "timm" or name.startswith("timm.")]:
            del sys.modules[name]
        sys.modules.update(saved)


_timm_cond_conv2d = load_timm_cond_conv2d()
CondConv2d: type[nn.Module] = _timm_cond_conv2d.CondConv2d
TIMM_FILE = _timm_cond_conv2d.__file__


class RoutedCondConv2d(CondConv2d):
    """timm's ``CondConv2d`` with its routing (``CondConvResidual``'s): ``x (B, C, H, W) -> (B, F, H', W')``.

    State dict: ``weight (k, F * C // G * kh * kw)``, ``bias (k, F)`` (if ``bias``), ``routing_fn.weight
    (k, C)``, ``routing_fn.bias (k,)``. ``forward(x, routing_weights=None)``: the given ``(B, k)`` weights
    or ``sigmoid(routing_fn(mean of x over H, W))``.
    """

    def __init__(self, in_channels: int, out_channels: int, **kwargs: Any) -> None:
        super().__init__(in_channels, out_channels, **kwargs)
        self.routing_fn = nn.Linear(in_channels, self.num_experts)

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        if routing_weights is None:
            pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
            routing_weights = torch.sigmoid(self.routing_fn(pooled))
        return super().forward(x, routing_weights)


def _conv_nd(num_spatial: int) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[num_spatial]


class AttentionNd(nn.Module):
    """kaijieshi7's ``attention{1,2,3}d``: ``x (B, C, *spatial) -> softmax(fc2(relu(fc1(avgpool(x)))) / T)``."""

    def __init__(self, in_planes: int, ratio: float, num_experts: int, temperature: float, num_spatial: int) -> None:
        super().__init__()
        pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[num_spatial]
        hidden_planes = int(in_planes * ratio) + 1
        self.avgpool = pool(1)
        self.fc1 = _conv_nd(num_spatial)(in_planes, hidden_planes, 1, bias=False)
        self.fc2 = _conv_nd(num_spatial)(hidden_planes, num_experts, 1, bias=True)
        self.temperature = temperature
        for conv in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.constant_(self.fc2.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(x)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.fc2(x).view(x.size(0), -1)
        return F.softmax(x / self.temperature, 1)


class DynamicConvNd(nn.Module):
    """kaijieshi7's ``Dynamic_conv{1,2,3}d``: ``x (B, C_in, *spatial) -> (B, C_out, *out_spatial)``.

    State dict: ``attention.fc1.weight (hidden, C_in, 1...)``, ``attention.fc2.weight (k, hidden, 1...)``,
    ``attention.fc2.bias (k,)``, ``weight (k, C_out, C_in // G, *K)``, ``bias (k, C_out)`` (if ``bias``).
    ``stride``, ``padding`` (symmetric ints), ``dilation``: ints or one per spatial dim.
    """

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: tuple[int, ...],
        ratio: float = 0.25,
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        K: int = 4,  # the reference's name for num_experts
        temperature: float = 34.0,
    ) -> None:
        super().__init__()
        assert in_planes % groups == 0
        self.num_spatial = len(kernel_size)
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.K = K
        self.attention = AttentionNd(in_planes, ratio, K, temperature, self.num_spatial)
        self.weight = nn.Parameter(torch.empty(K, out_planes, in_planes // groups, *kernel_size))
        self.bias = nn.Parameter(torch.empty(K, out_planes)) if bias else None
        fan_in = in_planes // groups * math.prod(kernel_size)
        for i in range(K):
            nn.init.kaiming_uniform_(self.weight[i])
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        softmax_attention = self.attention(x)
        batch_size, _, *size = x.size()
        x = x.view(1, -1, *size)
        weight = self.weight.view(self.K, -1)
        aggregate_weight = torch.mm(softmax_attention, weight).view(
            batch_size * self.out_planes, self.in_planes // self.groups, *self.kernel_size
        )
        aggregate_bias = torch.mm(softmax_attention, self.bias).view(-1) if self.bias is not None else None
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[self.num_spatial]
        output = conv(
            x,
            weight=aggregate_weight,
            bias=aggregate_bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups * batch_size,
        )
        return output.view(batch_size, self.out_planes, *output.shape[2:])
