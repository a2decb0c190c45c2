# This module holds PyTorch modules written line by line from two projects, and carries their notices.
#
# torchvision's DeformConv2d (torchvision/ops/deform_conv.py) is under the BSD 3-Clause License:
#
#   Copyright (c) Soumith Chintala 2016,
#   All rights reserved.
#
#   Redistribution and use in source and binary forms, with or without
#   modification, are permitted provided that the following conditions are met:
#
#   * Redistributions of source code must retain the above copyright notice, this
#     list of conditions and the following disclaimer.
#
#   * Redistributions in binary form must reproduce the above copyright notice,
#     this list of conditions and the following disclaimer in the documentation
#     and/or other materials provided with the distribution.
#
#   * Neither the name of the copyright holder nor the names of its
#     contributors may be used to endorse or promote products derived from
#     this software without specific prior written permission.
#
#   THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
#   AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
#   IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
#   DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
#   FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
#   DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
#   SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
#   CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
#   OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
#   OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
#
# mmcv's DeformConv2d, DeformConv2dPack (mmcv/ops/deform_conv.py), ModulatedDeformConv2d and
# ModulatedDeformConv2dPack (mmcv/ops/modulated_deform_conv.py) carry this notice:
#
#   Copyright (c) OpenMMLab. All rights reserved.
#
# and are licensed under the Apache License, Version 2.0 (the "License"); you may not use these parts except in
# compliance with the License. You may obtain a copy of the License at
#
#   http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software distributed under the License is distributed
# on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for
# the specific language governing permissions and limitations under the License.
#
# Changes made to the mmcv code here (as section 4(b) of that License asks): the compiled ``ext_module`` kernels
# are replaced by the NumPy translation of torchvision's CPU kernel (see below); the mmengine decorators
# (``MODELS.register_module``, ``deprecated_api_warning``), the ``print_log`` call, the ONNX ``symbolic``, the
# NPU and MLU paths and the ``__repr__`` methods are left out; formatting.
"""torchvision's ``DeformConv2d`` and mmcv's ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack``, line by line.

Sources:

* pytorch/vision ``torchvision/ops/deform_conv.py`` as shipped in torchvision 0.28.0 (its ``version.git_version``
  8fb87713a24951e639c494b0f2a8a81b5f8e33a6): :func:`deform_conv2d` and :class:`DeformConv2d` (``__init__``,
  ``reset_parameters``, ``forward(input, offset, mask=None)``). The stored main-branch version
  09cedc28a86e8116fcf6867ebd1ebcf1b1682b9f differs only where ``deform_conv2d`` makes its mask placeholder
  (``(B, 0)`` there, ``(B, 1)`` in 0.28.0; unused either way) and checks ``n_offset_grps`` (``torch._assert``
  there, ``RuntimeError`` in 0.28.0).
* open-mmlab/mmcv at commit a8073c74bf83d62ec36a103f835faa4837fb6585 (2026-01-16; both files last changed in
  cf1c168fcb3b22b69ca6290571e4ef68782a989a): ``mmcv/ops/deform_conv.py`` (``DeformConv2dFunction.forward``'s
  checks, ``DeformConv2d``, ``DeformConv2dPack``) and ``mmcv/ops/modulated_deform_conv.py``
  (``ModulatedDeformConv2dFunction.forward``'s checks, ``ModulatedDeformConv2d``, ``ModulatedDeformConv2dPack``).
  Apache-2.0 (notice above).

Class names, constructor arguments, attributes, parameters and so state-dict keys are the originals':
torchvision's ``weight (C_out, C_in // G, kh, kw)`` and ``bias``; mmcv's ``weight`` (``DeformConv2d``: no bias, as
mmcv asserts), ``bias`` (``ModulatedDeformConv2d``) and ``conv_offset.{weight, bias}``. mmcv's base class
``DeformConv2d`` has torchvision's class name; it is :class:`mmcv.DeformConv2d` here (a namespace), so
``type(module).__name__`` is ``"DeformConv2d"`` for both, as in the originals.

**The kernels.** torchvision's compiled ops do not load with the CPU torch wheel of CI, and mmcv's need a build.
Every module here therefore computes through :class:`DeformConv2dFunction`, a ``torch.autograd.Function`` whose
forward and backward are ``parity/deform_conv_reference.py``'s ``deform_conv2d_forward_kernel`` /
``deform_conv2d_backward_kernel`` (torchvision's CPU kernel in NumPy, float64; the result cast back to the input's
dtype). It takes the arguments of ``torch.ops.torchvision.deform_conv2d`` in their order. mmcv's
``deform_conv2d`` (``DeformConv2dFunction.apply``) and ``modulated_deform_conv2d`` are :func:`mmcv_deform_conv2d`
and :func:`modulated_deform_conv2d`: their forwards' argument handling, then the same kernel (mmcv's kernels are
the same arithmetic as torchvision's, which grew out of them: sampling ``y = out_y * stride - pad + i * dilation +
offset`` with the offsets ``(dy, dx)`` per tap, per deformable group). ``parity/check_modules_against_torchvision.py``
holds :class:`DeformConv2d` to ``torchvision.ops.DeformConv2d`` and the mmcv modules to their arithmetic computed
with ``torchvision.ops.deform_conv2d`` (``parity/results/deform_conv_modules_check.txt``).

mmcv's Packs predict their sampling from the input: ``conv_offset``, an ``nn.Conv2d`` with the layer's kernel size,
stride, padding and dilation, zero-initialised (``init_offset`` / ``init_weights``), gives ``2 * G_off * K``
offsets (``DeformConv2dPack``) or ``3 * G_off * K`` channels (``ModulatedDeformConv2dPack``), which
``torch.chunk(out, 3, dim=1)`` splits into ``o1, o2, mask``: the offsets are ``cat(o1, o2)``, the first
``2 * G_off * K`` channels in torchvision's order, and the mask ``sigmoid`` of the last ``G_off * K``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init
from torch.nn.modules.utils import _pair, _single
from torch.nn.parameter import Parameter

from parity import deform_conv_reference as ref

TORCHVISION_VERSION = "0.28.0"
TORCHVISION_GIT_VERSION = "8fb87713a24951e639c494b0f2a8a81b5f8e33a6"
TORCHVISION_FILE = "torchvision/ops/deform_conv.py"
MMCV_REPO = "https://github.com/open-mmlab/mmcv"
MMCV_COMMIT = "a8073c74bf83d62ec36a103f835faa4837fb6585"
MMCV_FILES = ("mmcv/ops/deform_conv.py", "mmcv/ops/modulated_deform_conv.py")

__all__ = [
    "DeformConv2d",
    "DeformConv2dFunction",
    "DeformConv2dPack",
    "ModulatedDeformConv2d",
    "ModulatedDeformConv2dPack",
    "deform_conv2d",
    "mmcv",
    "mmcv_deform_conv2d",
    "modulated_deform_conv2d",
]


def _numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def _tensor(array: np.ndarray | None, like: Tensor) -> Tensor | None:
    if array is None:
        return None
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype=like.dtype, device=like.device)


class DeformConv2dFunction(torch.autograd.Function):
    """``torch.ops.torchvision.deform_conv2d`` (same arguments, same order) on ``parity/deform_conv_reference.py``.

    Computes in float64 and returns the input's dtype. Gradients: w.r.t. ``input``, ``weight``, ``offset``,
    ``mask`` (with ``use_mask``; the placeholder mask gets none) and ``bias``, as torchvision's backward kernel
    computes them; each only where autograd asks for it.
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: Tensor,
        weight: Tensor,
        offset: Tensor,
        mask: Tensor,
        bias: Tensor,
        stride_h: int,
        stride_w: int,
        pad_h: int,
        pad_w: int,
        dil_h: int,
        dil_w: int,
        n_weight_grps: int,
        n_offset_grps: int,
        use_mask: bool,
    ) -> Tensor:
        args = (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, n_weight_grps, n_offset_grps, use_mask)
        ctx.save_for_backward(input, weight, offset, mask, bias)
        ctx.args = args
        out = ref.deform_conv2d_forward_kernel(
            _numpy(input), _numpy(weight), _numpy(offset), _numpy(mask) if use_mask else None, _numpy(bias), *args
        )
        return _tensor(out, input)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        input, weight, offset, mask, bias = ctx.saved_tensors
        use_mask = ctx.args[-1]
        grad_input, grad_weight, grad_offset, grad_mask, grad_bias = ref.deform_conv2d_backward_kernel(
            _numpy(grad_out),
            _numpy(input),
            _numpy(weight),
            _numpy(offset),
            _numpy(mask) if use_mask else None,
            _numpy(bias),
            *ctx.args,
        )
        needs = ctx.needs_input_grad
        grads = (
            _tensor(grad_input, input) if needs[0] else None,
            _tensor(grad_weight, weight) if needs[1] else None,
            _tensor(grad_offset, offset) if needs[2] else None,
            _tensor(grad_mask, mask) if needs[3] and use_mask else None,
            _tensor(grad_bias, bias) if needs[4] else None,
        )
        return (*grads, *(None,) * len(ctx.args))


# ---------------------------------------------------------------------------------------------------------------
# torchvision/ops/deform_conv.py (torchvision 0.28.0)
# ---------------------------------------------------------------------------------------------------------------


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    mask: Tensor | None = None,
) -> Tensor:
    """``torchvision.ops.deform_conv2d``: the original's statements, with ``torch.ops.torchvision.deform_conv2d``
    replaced by :class:`DeformConv2dFunction` (and its ``_log_api_usage_once`` / ``_assert_has_ops`` left out)."""
    out_channels = weight.shape[0]

    use_mask = mask is not None

    if mask is None:
        mask = torch.zeros((input.shape[0], 1), device=input.device, dtype=input.dtype)

    if bias is None:
        bias = torch.zeros(out_channels, device=input.device, dtype=input.dtype)

    stride_h, stride_w = _pair(stride)
    pad_h, pad_w = _pair(padding)
    dil_h, dil_w = _pair(dilation)
    weights_h, weights_w = weight.shape[-2:]
    _, n_in_channels, _, _ = input.shape

    n_offset_grps = offset.shape[1] // (2 * weights_h * weights_w)
    n_weight_grps = n_in_channels // weight.shape[1]

    if n_offset_grps == 0:
        raise RuntimeError(
            "the shape of the offset tensor at dimension 1 is not valid. It should "
            "be a multiple of 2 * weight.size[2] * weight.size[3].\n"
            f"Got offset.shape[1]={offset.shape[1]}, while 2 * weight.size[2] * weight.size[3]="
            f"{2 * weights_h * weights_w}"
        )

    return DeformConv2dFunction.apply(
        input,
        weight,
        offset,
        mask,
        bias,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        dil_h,
        dil_w,
        n_weight_grps,
        n_offset_grps,
        use_mask,
    )


class DeformConv2d(nn.Module):
    """
    See :func:`deform_conv2d`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
    ):
        super().__init__()

        if in_channels % groups != 0:
            raise ValueError("in_channels must be divisible by groups")
        if out_channels % groups != 0:
            raise ValueError("out_channels must be divisible by groups")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups

        self.weight = Parameter(
            torch.empty(out_channels, in_channels // groups, self.kernel_size[0], self.kernel_size[1])
        )

        if bias:
            self.bias = Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)

        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))

        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in)
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        """
        Args:
            input (Tensor[batch_size, in_channels, in_height, in_width]): input tensor
            offset (Tensor[batch_size, 2 * offset_groups * kernel_height * kernel_width, out_height, out_width]):
                offsets to be applied for each position in the convolution kernel.
            mask (Tensor[batch_size, offset_groups * kernel_height * kernel_width, out_height, out_width]):
                masks to be applied for each position in the convolution kernel.
        """
        return deform_conv2d(
            input,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask,
        )


# ---------------------------------------------------------------------------------------------------------------
# mmcv/ops/deform_conv.py and mmcv/ops/modulated_deform_conv.py (mmcv a8073c74)
# ---------------------------------------------------------------------------------------------------------------


def _check_groups(input: Tensor, offset: Tensor, weight: Tensor, groups: int, deform_groups: int) -> None:
    """The shape checks of mmcv's C++ entry points (``shape_check``) that torchvision reads off the shapes instead:
    the explicit ``groups`` and ``deform_groups`` must be the ones the shapes imply."""
    taps = weight.size(2) * weight.size(3)
    if weight.size(1) * groups != input.size(1):
        raise ValueError(f"input channels {input.size(1)} != weight.size(1) {weight.size(1)} * groups {groups}")
    if offset.size(1) != deform_groups * 2 * taps:
        raise ValueError(f"offset.size(1) {offset.size(1)} != deform_groups {deform_groups} * 2 * {taps}")


def mmcv_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    deform_groups: int = 1,
    bias: bool = False,
    im2col_step: int = 32,
) -> Tensor:
    """mmcv's ``deform_conv2d`` (``DeformConv2dFunction.apply``): its forward's checks and casts, then the kernel
    (DCNv1: no mask, no bias)."""
    if input is not None and input.dim() != 4:
        raise ValueError(f"Expected 4D tensor as input, got {input.dim()}D tensor instead.")
    assert bias is False, "Only support bias is False."
    stride = _pair(stride)
    padding = _pair(padding)
    dilation = _pair(dilation)

    input = input.type_as(offset)
    weight = weight.type_as(input)

    cur_im2col_step = min(im2col_step, input.size(0))
    assert (input.size(0) % cur_im2col_step) == 0, "batch size must be divisible by im2col_step"
    _check_groups(input, offset, weight, groups, deform_groups)
    return DeformConv2dFunction.apply(
        input,
        weight,
        offset,
        input.new_zeros((input.size(0), 1)),
        input.new_zeros(weight.size(0)),
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        dilation[0],
        dilation[1],
        groups,
        deform_groups,
        False,
    )


def modulated_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    deform_groups: int = 1,
) -> Tensor:
    """mmcv's ``modulated_deform_conv2d`` (``ModulatedDeformConv2dFunction.apply``): its forward's checks and casts,
    then the kernel (DCNv2: with the mask; no bias gradient without a bias)."""
    if input is not None and input.dim() != 4:
        raise ValueError(f"Expected 4D tensor as input, got {input.dim()}D tensor instead.")
    stride = _pair(stride)
    padding = _pair(padding)
    dilation = _pair(dilation)
    with_bias = bias is not None
    if not with_bias:
        bias = input.new_zeros(weight.size(0))  # mmcv: an empty fake tensor, i.e. no bias
    input = input.type_as(offset)
    weight = weight.type_as(input)
    bias = bias.type_as(input)
    mask = mask.type_as(input)
    _check_groups(input, offset, weight, groups, deform_groups)
    return DeformConv2dFunction.apply(
        input,
        weight,
        offset,
        mask,
        bias,
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        dilation[0],
        dilation[1],
        groups,
        deform_groups,
        True,
    )


class mmcv:
    """mmcv's classes whose names clash with torchvision's: ``mmcv.DeformConv2d``."""

    class DeformConv2d(nn.Module):
        r"""mmcv's deformable 2D convolution (``mmcv.ops.DeformConv2d``): DCNv1, offsets passed, no bias."""

        def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int | tuple[int, ...],
            stride: int | tuple[int, ...] = 1,
            padding: int | tuple[int, ...] = 0,
            dilation: int | tuple[int, ...] = 1,
            groups: int = 1,
            deform_groups: int = 1,
            bias: bool = False,
            im2col_step: int = 32,
        ) -> None:
            super().__init__()

            assert not bias, f"bias={bias} is not supported in DeformConv2d."
            assert in_channels % groups == 0, f"in_channels {in_channels} cannot be divisible by groups {groups}"
            assert out_channels % groups == 0, f"out_channels {out_channels} cannot be divisible by groups {groups}"

            self.in_channels = in_channels
            self.out_channels = out_channels
            self.kernel_size = _pair(kernel_size)
            self.stride = _pair(stride)
            self.padding = _pair(padding)
            self.dilation = _pair(dilation)
            self.groups = groups
            self.deform_groups = deform_groups
            self.im2col_step = im2col_step
            # enable compatibility with nn.Conv2d
            self.transposed = False
            self.output_padding = _single(0)

            # only weight, no bias
            self.weight = nn.Parameter(torch.Tensor(out_channels, in_channels // self.groups, *self.kernel_size))

            self.reset_parameters()

        def reset_parameters(self):
            # switch the initialization of `self.weight` to the standard kaiming
            # method described in `Delving deep into rectifiers: Surpassing
            # human-level performance on ImageNet classification` - He, K. et al.
            # (2015), using a uniform distribution
            nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

        def forward(self, x: Tensor, offset: Tensor) -> Tensor:
            # To fix an assert error in deform_conv_cuda.cpp:128
            # input image is smaller than kernel
            input_pad = (x.size(2) < self.kernel_size[0]) or (x.size(3) < self.kernel_size[1])
            if input_pad:
                pad_h = max(self.kernel_size[0] - x.size(2), 0)
                pad_w = max(self.kernel_size[1] - x.size(3), 0)
                x = F.pad(x, (0, pad_w, 0, pad_h), "constant", 0).contiguous()
                offset = F.pad(offset, (0, pad_w, 0, pad_h), "constant", 0)
                offset = offset.contiguous()
            out = mmcv_deform_conv2d(
                x,
                offset,
                self.weight,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
                self.deform_groups,
                False,
                self.im2col_step,
            )
            if input_pad:
                out = out[:, :, : out.size(2) - pad_h, : out.size(3) - pad_w].contiguous()
            return out


def _upgrade_offset_keys(state_dict: dict[str, Tensor], prefix: str, local_metadata: dict[str, Any]) -> None:
    """The Packs' ``_load_from_state_dict``: state dicts before version 2 name ``conv_offset`` ``<name>_offset``."""
    version = local_metadata.get("version")

    if version is None or version < 2:
        # the key is different in early versions
        # In version < 2, DeformConvPack loads previous benchmark models.
        if prefix + "conv_offset.weight" not in state_dict and prefix[:-1] + "_offset.weight" in state_dict:
            state_dict[prefix + "conv_offset.weight"] = state_dict.pop(prefix[:-1] + "_offset.weight")
        if prefix + "conv_offset.bias" not in state_dict and prefix[:-1] + "_offset.bias" in state_dict:
            state_dict[prefix + "conv_offset.bias"] = state_dict.pop(prefix[:-1] + "_offset.bias")


class DeformConv2dPack(mmcv.DeformConv2d):
    """A Deformable Conv Encapsulation that acts as normal Conv layers (mmcv's ``DCN``).

    The offset tensor is like `[y0, x0, y1, x1, y2, x2, ..., y8, x8]`.
    """

    _version = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_offset = nn.Conv2d(
            self.in_channels,
            self.deform_groups * 2 * self.kernel_size[0] * self.kernel_size[1],
            kernel_size=self.kernel_size,
            stride=_pair(self.stride),
            padding=_pair(self.padding),
            dilation=_pair(self.dilation),
            bias=True,
        )
        self.init_offset()

    def init_offset(self):
        self.conv_offset.weight.data.zero_()
        self.conv_offset.bias.data.zero_()

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        offset = self.conv_offset(x)
        return mmcv_deform_conv2d(
            x,
            offset,
            self.weight,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.deform_groups,
            False,
            self.im2col_step,
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        _upgrade_offset_keys(state_dict, prefix, local_metadata)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class ModulatedDeformConv2d(nn.Module):
    """mmcv's modulated deformable 2D convolution (DCNv2): offsets and mask passed, optional bias."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int],
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool | str = True,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deform_groups = deform_groups
        # enable compatibility with nn.Conv2d
        self.transposed = False
        self.output_padding = _single(0)

        self.weight = nn.Parameter(torch.Tensor(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.Tensor(out_channels))
        else:
            self.register_parameter("bias", None)
        self.init_weights()

    def init_weights(self):
        n = self.in_channels
        for k in self.kernel_size:
            n *= k
        stdv = 1.0 / math.sqrt(n)
        self.weight.data.uniform_(-stdv, stdv)
        if self.bias is not None:
            self.bias.data.zero_()

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return modulated_deform_conv2d(
            x,
            offset,
            mask,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.deform_groups,
        )


class ModulatedDeformConv2dPack(ModulatedDeformConv2d):
    """A ModulatedDeformable Conv Encapsulation that acts as normal Conv layers (mmcv's ``DCNv2``)."""

    _version = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_offset = nn.Conv2d(
            self.in_channels,
            self.deform_groups * 3 * self.kernel_size[0] * self.kernel_size[1],
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        if hasattr(self, "conv_offset"):
            self.conv_offset.weight.data.zero_()
            self.conv_offset.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = self.conv_offset(x)
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        mask = torch.sigmoid(mask)
        return modulated_deform_conv2d(
            x,
            offset,
            mask,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.deform_groups,
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        _upgrade_offset_keys(state_dict, prefix, local_metadata)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
