# This module is a NumPy translation of torchvision's CPU deformable-convolution kernel,
# torchvision/csrc/ops/cpu/deform_conv2d_kernel.cpp, and carries that file's notices:
#
# torchvision is under the BSD 3-Clause License:
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
# and the kernel file itself opens with these notices (verbatim):
#
#   ******************* BEGIN Caffe Copyright Notice and Disclaimer
#   *****************
#
#   COPYRIGHT
#
#   All contributions by the University of California:
#   Copyright (c) 2014-2017 The Regents of the University of California (Regents)
#   All rights reserved.
#
#   All other contributions:
#   Copyright (c) 2014-2017, the respective contributors
#   All rights reserved.
#
#   Caffe uses a shared copyright model: each contributor holds copyright over
#   their contributions to Caffe. The project versioning records all such
#   contribution and copyright details. If a contributor wants to further mark
#   their specific copyright on a particular contribution, they should indicate
#   their copyright solely in the commit message of the change when it is
#   committed.
#
#   LICENSE
#
#   Redistribution and use in source and binary forms, with or without
#   modification, are permitted provided that the following conditions are met:
#
#   1. Redistributions of source code must retain the above copyright notice,
#   this list of conditions and the following disclaimer.
#   2. Redistributions in binary form must reproduce the above copyright notice,
#   this list of conditions and the following disclaimer in the documentation
#   and/or other materials provided with the distribution.
#
#   THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
#   AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
#   IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
#   DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT OWNER OR CONTRIBUTORS BE LIABLE
#   FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
#   DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
#   SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
#   CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
#   OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
#   OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
#
#   CONTRIBUTION AGREEMENT
#
#   By contributing to the BVLC/caffe repository through pull-request, comment,
#   or otherwise, the contributor releases their content to the
#   license and copyright terms herein.
#
#   ***************** END Caffe Copyright Notice and Disclaimer
#   *********************
#
#   Copyright (c) 2018 Microsoft
#   Licensed under The MIT License [see LICENSE for details]
#   \file modulated_deformable_im2col.cuh
#   \brief Function definitions of converting an image to
#   column matrix based on kernel, padding, dilation, and offset.
#   These functions are mainly used in deformable convolution operators.
#   \ref: https://arxiv.org/abs/1703.06211
#   \author Yuwen Xiong, Haozhi Qi, Jifeng Dai, Xizhou Zhu, Han Hu, Dazhi Cheng
#
#   modified from
#   https://github.com/chengdazhi/Deformable-Convolution-V2-PyTorch/blob/mmdetection/mmdet/ops/dcn/src/deform_conv_cuda_kernel.cu
#   modified from
#   https://github.com/open-mmlab/mmdetection/blob/master/mmdet/ops/dcn/src/deform_conv_cuda.cpp
"""Float64 NumPy reference of torchvision's ``deform_conv2d`` (v1; v2 with a mask), line by line from its CPU kernel.

Source: pytorch/vision, ``torchvision/csrc/ops/cpu/deform_conv2d_kernel.cpp`` at commit
0f030ff7c5878f747f73b6609b2b5f6e112077a4 (see the notices above; BSD-3-Clause). The only change of that file
against the older stored version 5b132056b91ea9512face7097c573babe67333ec is ``get_greatest_divisor_below_bound``
(pytorch/vision#9232: search the divisor in ``[1, min(n / 2, bound)]``), which picks the batch blocking and so
only the order of float sums. The Python entry points follow ``torchvision/ops/deform_conv.py``'s
``deform_conv2d`` (torchvision 0.28.0): ``use_mask = mask is not None``, a missing bias is zeros, the weight and
offset groups are read off the shapes.

Every function of the kernel file is here under its name, with its arguments in its order, and its statements in
their order. What differs is only how the loops run: the kernels' flat ``for (index ...)`` loops over
(channel, tap, image, output row, output column) become NumPy operations on whole arrays of those points, with an
explicit Python loop over the kernel taps ``(i, j)`` (and, in ``deformable_col2im``, over the 3x3 neighbourhood
``dy, dx``); the per-point functions ``bilinear_interpolate`` and ``get_coordinate_weight`` take arrays of
points. Pointers into flat buffers become reshapes of the same buffers; the scatter ``grad_im[grad_pos] += ...``
becomes ``np.bincount`` over the same ``grad_pos``. Sums run in a different order than the kernel's, so results
agree with torchvision's to float64 rounding (``parity/check_against_torchvision.py``), not bit for bit.

The kernel's semantics, kept exactly (positions ``y = out_y * stride_h - pad_h + i * dilation_h + offset_h`` and
likewise ``x``; images ``H x W``, values outside are zero):

* Forward (``bilinear_interpolate``): 0 when ``y <= -1 or y >= H or x <= -1 or x >= W``, otherwise bilinear over
  the corners ``floor(y), floor(y) + 1`` (and ``x``) with out-of-image corners zero. This is the continuous
  bilinear interpolation of the zero-extended image, so the border test changes no value.
* Gradient w.r.t. the input (``deformable_col2im``): the tent weights ``(1 - |y - yp|) (1 - |x - xp|)`` over the
  pixels with ``|y - yp| < 1`` and ``|x - xp| < 1`` around ``int(y)`` (truncation toward zero): the transpose of
  the forward, the same weights.
* Gradient w.r.t. the offsets (``deformable_col2im_coord`` / ``get_coordinate_weight``): the derivative of the
  bilinear formula with the corners held at ``floor(y), floor(y) + 1`` -- the one-sided derivative from above at
  integer ``y`` (or ``x``), including the border, since this function has no ``<= -1`` / ``>= H`` test. At
  ``y == -1`` exactly the forward value is 0 but the y-gradient is ``d/dy`` from inside the image (the row-0
  values); at ``y == H - 1`` it is the outward difference ``0 - v(H - 1)``; at ``y == H`` it is 0. At integer
  ``x`` the y-derivative is taken along the column ``floor(x)``.
* Gradient w.r.t. the mask: the sampled value (``bilinear_interpolate``), summed over the channels of the offset
  group; only with ``use_mask`` (a mask passed). Without a mask every tap is multiplied by 1 and there is no mask
  gradient (``None`` here; torchvision returns zeros for its internal ``(B, 1)`` placeholder).
* The bias gradient is ``grad_out.sum((0, 2, 3))``, computed whether or not a bias was passed (torchvision's
  wrapper passes zeros for a missing one).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TORCHVISION_COMMIT = "0f030ff7c5878f747f73b6609b2b5f6e112077a4"
TORCHVISION_FILE = "torchvision/csrc/ops/cpu/deform_conv2d_kernel.cpp"

K_MAX_PARALLEL_IMGS = 32  # kMaxParallelImgs


def _load(data: np.ndarray, index: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``valid ? data[index] : 0`` per point: ``data`` is ``(L, height * width)`` (one image a row), ``index`` and
    ``valid`` ``(L, M)``. Indices of invalid points are clipped before the gather so they never leave the row."""
    rows, row_size = data.shape
    safe = np.clip(index, 0, row_size - 1) + (np.arange(rows) * row_size)[:, None]
    return np.where(valid, data.reshape(-1)[safe], 0.0)


def bilinear_interpolate(in_: np.ndarray, height: int, width: int, h: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The kernel's ``bilinear_interpolate`` on arrays of points: ``in_`` is ``(L, height * width)``, one image per
    row, and ``h``, ``w`` are ``(L, M)``, ``M`` points on each image; returns ``(L, M)``."""
    outside = (h <= -1) | (height <= h) | (w <= -1) | (width <= w)  # these points return 0

    h_low = np.floor(h).astype(np.int64)
    w_low = np.floor(w).astype(np.int64)
    h_high = h_low + 1
    w_high = w_low + 1

    lh = h - h_low
    lw = w - w_low
    hh, hw = 1 - lh, 1 - lw

    inside = ~outside
    v1 = _load(in_, h_low * width + w_low, inside & (h_low >= 0) & (w_low >= 0))
    v2 = _load(in_, h_low * width + w_high, inside & (h_low >= 0) & (w_high <= width - 1))
    v3 = _load(in_, h_high * width + w_low, inside & (h_high <= height - 1) & (w_low >= 0))
    v4 = _load(in_, h_high * width + w_high, inside & (h_high <= height - 1) & (w_high <= width - 1))

    w1, w2, w3, w4 = hh * hw, hh * lw, lh * hw, lh * lw

    val = w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4
    return np.where(outside, 0.0, val)


def deformable_im2col(
    input: np.ndarray,
    data_offset: np.ndarray,
    data_mask: np.ndarray | None,
    n_in_channels: int,
    height: int,
    width: int,
    weight_h: int,
    weight_w: int,
    pad_h: int,
    pad_w: int,
    stride_h: int,
    stride_w: int,
    dilation_h: int,
    dilation_w: int,
    out_h: int,
    out_w: int,
    parallel_imgs: int,
    deformable_group: int,
    use_mask: bool,
) -> np.ndarray:
    """``deformable_im2col`` (with ``deformable_im2col_kernel``): returns ``data_col``,
    ``(n_in_channels * weight_h * weight_w, parallel_imgs * out_h * out_w)``; row ``in_c * kh * kw + i * kw + j``,
    column ``b * out_h * out_w + out_y * out_w + out_x``. ``input`` is ``(parallel_imgs, C, H, W)``."""
    batch_sz = parallel_imgs
    n_offset_grps = deformable_group

    in_c = np.arange(n_in_channels)
    c_per_offset_grp = n_in_channels // n_offset_grps
    grp_idx = in_c // c_per_offset_grp
    out_y = np.arange(out_h)[:, None]
    out_x = np.arange(out_w)[None, :]

    input_ptr = input.reshape(batch_sz * n_in_channels, height * width)
    # offset_ptr / mask_ptr of every (out_b, in_c): (batch_sz, n_in_channels, 2 * kh * kw | kh * kw, out_h, out_w)
    offset_ptr = data_offset.reshape(batch_sz, n_offset_grps, 2 * weight_h * weight_w, out_h, out_w)[:, grp_idx]
    mask_ptr = None
    if use_mask:
        assert data_mask is not None
        mask_ptr = data_mask.reshape(batch_sz, n_offset_grps, weight_h * weight_w, out_h, out_w)[:, grp_idx]

    columns = np.empty((n_in_channels, weight_h * weight_w, batch_sz, out_h * out_w))
    for i in range(weight_h):
        for j in range(weight_w):
            mask_idx = i * weight_w + j
            offset_idx = 2 * mask_idx

            mask_value = 1.0
            if use_mask:
                assert mask_ptr is not None
                mask_value = mask_ptr[:, :, mask_idx].reshape(batch_sz * n_in_channels, out_h * out_w)

            offset_h = offset_ptr[:, :, offset_idx]
            offset_w = offset_ptr[:, :, offset_idx + 1]
            y = (out_y * stride_h - pad_h) + i * dilation_h + offset_h
            x = (out_x * stride_w - pad_w) + j * dilation_w + offset_w
            y = y.reshape(batch_sz * n_in_channels, out_h * out_w)
            x = x.reshape(batch_sz * n_in_channels, out_h * out_w)
            val = mask_value * bilinear_interpolate(input_ptr, height, width, y, x)
            columns[:, mask_idx] = val.reshape(batch_sz, n_in_channels, out_h * out_w).transpose(1, 0, 2)
    return columns.reshape(n_in_channels * weight_h * weight_w, batch_sz * out_h * out_w)


def get_greatest_divisor_below_bound(n: int, bound: int) -> int:
    limit = min(n // 2, bound)
    for k in range(limit, 1, -1):
        if n % k == 0:
            return k
    return 1


def deformable_col2im(
    col: np.ndarray,
    offset: np.ndarray,
    mask: np.ndarray | None,
    channels: int,
    height: int,
    width: int,
    kernel_h: int,
    kernel_w: int,
    pad_h: int,
    pad_w: int,
    stride_h: int,
    stride_w: int,
    dilation_h: int,
    dilation_w: int,
    batch_sz: int,
    n_offset_grps: int,
    out_h: int,
    out_w: int,
    use_mask: bool,
) -> np.ndarray:
    """``deformable_col2im_kernel``: returns ``grad_im``, ``(batch_sz, channels, height, width)``, from the
    columns' gradient ``col`` (laid out as ``deformable_im2col``'s output)."""
    grad_im = np.zeros(batch_sz * channels * height * width)
    col = col.reshape(channels, kernel_h * kernel_w, batch_sz, out_h, out_w)

    c = np.arange(channels)
    c_per_offset_grp = channels // n_offset_grps
    offset_grp = c // c_per_offset_grp
    b = np.arange(batch_sz)[:, None, None, None]
    c = c[None, :, None, None]
    out_y = np.arange(out_h)[:, None]
    out_x = np.arange(out_w)[None, :]

    # offset_ptr / mask_ptr of every (b, c): (batch_sz, channels, 2 * kh * kw | kh * kw, out_h, out_w)
    offset_ptr = offset.reshape(batch_sz, n_offset_grps, 2 * kernel_h * kernel_w, out_h, out_w)[:, offset_grp]
    mask_ptr = None
    if use_mask:
        assert mask is not None
        mask_ptr = mask.reshape(batch_sz, n_offset_grps, kernel_h * kernel_w, out_h, out_w)[:, offset_grp]

    for i in range(kernel_h):
        for j in range(kernel_w):
            mask_idx = i * kernel_w + j
            offset_idx = 2 * mask_idx

            offset_h = offset_ptr[:, :, offset_idx]
            offset_w = offset_ptr[:, :, offset_idx + 1]

            mask_value = 1.0
            if use_mask:
                assert mask_ptr is not None
                mask_value = mask_ptr[:, :, mask_idx]

            y = (out_y * stride_h - pad_h) + i * dilation_h + offset_h  # (batch_sz, channels, out_h, out_w)
            x = (out_x * stride_w - pad_w) + j * dilation_w + offset_w
            col_index = col[:, mask_idx].transpose(1, 0, 2, 3)  # col[index] of every (b, c, out_y, out_x)

            int_y = np.trunc(y).astype(np.int64)  # int(y): truncation toward zero
            int_x = np.trunc(x).astype(np.int64)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yp = int_y + dy
                    xp = int_x + dx
                    ok = (
                        (0 <= yp)  # noqa: SIM300 (the kernel's spelling)
                        & (yp < height)
                        & (0 <= xp)  # noqa: SIM300
                        & (xp < width)
                        & (np.abs(y - yp) < 1)
                        & (np.abs(x - xp) < 1)
                    )
                    grad_pos = ((b * channels + c) * height + yp) * width + xp
                    weight = (1 - np.abs(y - yp)) * (1 - np.abs(x - xp))
                    contribution = mask_value * weight * col_index
                    grad_im += np.bincount(grad_pos[ok], weights=contribution[ok], minlength=grad_im.size)
    return grad_im.reshape(batch_sz, channels, height, width)


def compute_grad_input(
    columns: np.ndarray,
    offset: np.ndarray,
    mask: np.ndarray | None,
    channels: int,
    height: int,
    width: int,
    weight_h: int,
    weight_w: int,
    pad_h: int,
    pad_w: int,
    stride_h: int,
    stride_w: int,
    dilation_h: int,
    dilation_w: int,
    parallel_imgs: int,
    n_offset_grps: int,
    use_mask: bool,
) -> np.ndarray:
    out_h = (height + 2 * pad_h - (dilation_h * (weight_h - 1) + 1)) // stride_h + 1
    out_w = (width + 2 * pad_w - (dilation_w * (weight_w - 1) + 1)) // stride_w + 1
    return deformable_col2im(
        columns,
        offset,
        mask,
        channels,
        height,
        width,
        weight_h,
        weight_w,
        pad_h,
        pad_w,
        stride_h,
        stride_w,
        dilation_h,
        dilation_w,
        parallel_imgs,
        n_offset_grps,
        out_h,
        out_w,
        use_mask,
    )


def get_coordinate_weight(
    im_data: np.ndarray, height: int, width: int, y: np.ndarray, x: np.ndarray, is_y_direction: bool
) -> np.ndarray:
    """The kernel's ``get_coordinate_weight`` on arrays of points (shapes as in ``bilinear_interpolate``): the
    derivative of the bilinear formula w.r.t. ``y`` (or ``x``) with the corners at ``floor``, no border test."""
    y_l = np.floor(y).astype(np.int64)
    x_l = np.floor(x).astype(np.int64)
    y_h = y_l + 1
    x_h = x_l + 1

    valid_y_l = (0 <= y_l) & (y_l < height)  # noqa: SIM300
    valid_y_h = (0 <= y_h) & (y_h < height)  # noqa: SIM300
    valid_x_l = (0 <= x_l) & (x_l < width)  # noqa: SIM300
    valid_x_h = (0 <= x_h) & (x_h < width)  # noqa: SIM300

    v_yx = _load(im_data, y_l * width + x_l, valid_y_l & valid_x_l)
    v_yX = _load(im_data, y_l * width + x_h, valid_y_l & valid_x_h)
    v_Yx = _load(im_data, y_h * width + x_l, valid_y_h & valid_x_l)
    v_YX = _load(im_data, y_h * width + x_h, valid_y_h & valid_x_h)

    if is_y_direction:
        dx = x - x_l
        return dx * (v_YX - v_yX) + (1 - dx) * (v_Yx - v_yx)
    dy = y - y_l
    return dy * (v_YX - v_Yx) + (1 - dy) * (v_yX - v_yx)


def deformable_col2im_coord(
    col: np.ndarray,
    im: np.ndarray,
    offset: np.ndarray,
    mask: np.ndarray | None,
    channels: int,
    height: int,
    width: int,
    weight_h: int,
    weight_w: int,
    pad_h: int,
    pad_w: int,
    stride_h: int,
    stride_w: int,
    dilation_h: int,
    dilation_w: int,
    batch_sz: int,
    offset_channels: int,
    n_offset_grps: int,
    out_h: int,
    out_w: int,
    use_mask: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``deformable_col2im_coord_kernel``: returns ``(grad_offset, grad_mask)``, shaped as ``offset``
    ``(batch_sz, offset_channels, out_h, out_w)`` and the mask (``None`` without ``use_mask``).

    The kernel's ``index`` runs over (b, offset channel c, h, w); ``c`` names the offset group, the tap
    ``offset_c / 2`` and the direction ``offset_c % 2`` (0: y); its inner loop over ``col_c`` runs over the
    ``c_per_offset_grp`` input channels of the group (``im_ptr += height * width``). Here the taps and the two
    directions are a Python loop and (b, group, channel, h, w) are arrays; the channel sum is ``sum(axis=2)``."""
    c_per_offset_grp = channels // n_offset_grps
    n_taps = weight_h * weight_w
    assert offset_channels == 2 * n_taps * n_offset_grps
    out_y = np.arange(out_h)[:, None]
    out_x = np.arange(out_w)[None, :]

    # col_ptr: the group's rows, col_c = channel-in-group * (kh * kw) + tap
    col_ptr = col.reshape(n_offset_grps, c_per_offset_grp, n_taps, batch_sz, out_h, out_w)
    im_ptr = im.reshape(batch_sz * channels, height * width)  # rows (b, group, channel-in-group)
    offset_ptr = offset.reshape(batch_sz, n_offset_grps, 2 * n_taps, out_h, out_w)
    mask_ptr = None
    if use_mask:
        assert mask is not None
        mask_ptr = mask.reshape(batch_sz, n_offset_grps, n_taps, out_h, out_w)

    grad_offset = np.zeros((batch_sz, n_offset_grps, 2 * n_taps, out_h, out_w))
    grad_mask = np.zeros((batch_sz, n_offset_grps, n_taps, out_h, out_w)) if use_mask else None
    per_channel = (batch_sz, n_offset_grps, c_per_offset_grp, out_h, out_w)

    for i in range(weight_h):
        for j in range(weight_w):
            mask_idx = i * weight_w + j

            offset_h = offset_ptr[:, :, 2 * mask_idx]  # (batch_sz, n_offset_grps, out_h, out_w)
            offset_w = offset_ptr[:, :, 2 * mask_idx + 1]

            mask_value = 1.0
            if use_mask:
                assert mask_ptr is not None
                mask_value = mask_ptr[:, :, mask_idx][:, :, None]

            y = (out_y * stride_h - pad_h) + i * dilation_h + offset_h
            x = (out_x * stride_w - pad_w) + j * dilation_w + offset_w
            # every channel of the group samples the same point
            y = np.broadcast_to(y[:, :, None], per_channel).reshape(batch_sz * channels, out_h * out_w)
            x = np.broadcast_to(x[:, :, None], per_channel).reshape(batch_sz * channels, out_h * out_w)
            col_pos = col_ptr[:, :, mask_idx].transpose(2, 0, 1, 3, 4)  # (batch_sz, grp, channel-in-group, h, w)

            for offset_c, is_y_direction in ((2 * mask_idx, True), (2 * mask_idx + 1, False)):
                weight = get_coordinate_weight(im_ptr, height, width, y, x, is_y_direction).reshape(per_channel)
                grad_offset[:, :, offset_c] = (mask_value * weight * col_pos).sum(axis=2)

                if use_mask and is_y_direction:
                    assert grad_mask is not None
                    sampled = bilinear_interpolate(im_ptr, height, width, y, x).reshape(per_channel)
                    grad_mask[:, :, mask_idx] = (col_pos * sampled).sum(axis=2)

    grad_offset = grad_offset.reshape(batch_sz, offset_channels, out_h, out_w)
    if grad_mask is not None:
        grad_mask = grad_mask.reshape(batch_sz, n_offset_grps * n_taps, out_h, out_w)
    return grad_offset, grad_mask


def compute_grad_offset_and_mask(
    columns: np.ndarray,
    input: np.ndarray,
    offset: np.ndarray,
    mask: np.ndarray | None,
    channels: int,
    height: int,
    width: int,
    weight_h: int,
    weight_w: int,
    pad_h: int,
    pad_w: int,
    stride_h: int,
    stride_w: int,
    dilation_h: int,
    dilation_w: int,
    parallel_imgs: int,
    n_offset_grps: int,
    use_mask: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    out_h = (height + 2 * pad_h - (dilation_h * (weight_h - 1) + 1)) // stride_h + 1
    out_w = (width + 2 * pad_w - (dilation_w * (weight_w - 1) + 1)) // stride_w + 1
    return deformable_col2im_coord(
        columns,
        input,
        offset,
        mask,
        channels,
        height,
        width,
        weight_h,
        weight_w,
        pad_h,
        pad_w,
        stride_h,
        stride_w,
        dilation_h,
        dilation_w,
        parallel_imgs,
        2 * weight_h * weight_w * n_offset_grps,
        n_offset_grps,
        out_h,
        out_w,
        use_mask,
    )


def backward_gradient_inputs(
    input: np.ndarray,
    weight: np.ndarray,
    offset: np.ndarray,
    mask: np.ndarray | None,
    grad_out: np.ndarray,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    n_weight_grps: int,
    n_offset_grps: int,
    n_parallel_imgs: int,
    use_mask: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    batch_sz, n_in_channels, in_h, in_w = input.shape

    n_parallel_imgs = min(batch_sz, n_parallel_imgs)

    n_out_channels = weight.shape[0]
    weight_h, weight_w = weight.shape[2], weight.shape[3]

    out_h = (in_h + 2 * pad_h - (dilation_h * (weight_h - 1) + 1)) // stride_h + 1
    out_w = (in_w + 2 * pad_w - (dilation_w * (weight_w - 1) + 1)) // stride_w + 1

    grad_input = np.zeros_like(input)
    grad_offset = np.zeros_like(offset)
    grad_mask = np.zeros_like(mask) if use_mask else None

    if batch_sz == 0:
        return grad_input, grad_offset, grad_mask

    n_blocks = batch_sz // n_parallel_imgs
    # Separate into blocks
    grad_input = grad_input.reshape(n_blocks, n_parallel_imgs, n_in_channels, in_h, in_w)
    input = input.reshape(n_blocks, n_parallel_imgs, n_in_channels, in_h, in_w)

    grad_offset = grad_offset.reshape(n_blocks, n_parallel_imgs, n_offset_grps * 2 * weight_h * weight_w, out_h, out_w)
    offset = offset.reshape(n_blocks, n_parallel_imgs, n_offset_grps * 2 * weight_h * weight_w, out_h, out_w)

    if use_mask:
        assert mask is not None
        assert grad_mask is not None
        grad_mask = grad_mask.reshape(n_blocks, n_parallel_imgs, n_offset_grps * weight_h * weight_w, out_h, out_w)
        mask = mask.reshape(n_blocks, n_parallel_imgs, n_offset_grps * weight_h * weight_w, out_h, out_w)

    grad_out = grad_out.reshape(
        n_blocks, n_parallel_imgs, n_weight_grps, n_out_channels // n_weight_grps, out_h, out_w
    ).transpose(0, 2, 3, 1, 4, 5)

    weight = weight.reshape(n_weight_grps, weight.shape[0] // n_weight_grps, *weight.shape[1:])

    for elt in range(n_blocks):
        columns = np.zeros((n_in_channels * weight_w * weight_h, n_parallel_imgs * out_h * out_w))
        columns = columns.reshape(n_weight_grps, columns.shape[0] // n_weight_grps, columns.shape[1])
        # Separate into weight groups
        for g in range(n_weight_grps):
            columns[g] += weight[g].reshape(weight.shape[1], -1).T @ grad_out[elt][g].reshape(grad_out.shape[2], -1)

        grad_offset[elt], grad_mask_elt = compute_grad_offset_and_mask(
            columns,
            input[elt],
            offset[elt],
            mask[elt] if use_mask else None,
            n_in_channels,
            in_h,
            in_w,
            weight_h,
            weight_w,
            pad_h,
            pad_w,
            stride_h,
            stride_w,
            dilation_h,
            dilation_w,
            n_parallel_imgs,
            n_offset_grps,
            use_mask,
        )
        if use_mask:
            grad_mask[elt] = grad_mask_elt

        grad_input[elt] = compute_grad_input(
            columns,
            offset[elt],
            mask[elt] if use_mask else None,
            n_in_channels,
            in_h,
            in_w,
            weight_h,
            weight_w,
            pad_h,
            pad_w,
            stride_h,
            stride_w,
            dilation_h,
            dilation_w,
            n_parallel_imgs,
            n_offset_grps,
            use_mask,
        )

    grad_input = grad_input.reshape(batch_sz, n_in_channels, in_h, in_w)
    grad_offset = grad_offset.reshape(batch_sz, n_offset_grps * 2 * weight_h * weight_w, out_h, out_w)

    if use_mask:
        grad_mask = grad_mask.reshape(batch_sz, n_offset_grps * weight_h * weight_w, out_h, out_w)

    return grad_input, grad_offset, grad_mask


def backward_gradient_parameters(
    input: np.ndarray,
    weight: np.ndarray,
    offset: np.ndarray,
    mask: np.ndarray | None,
    grad_out: np.ndarray,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    n_weight_grps: int,
    n_offset_grps: int,
    n_parallel_imgs: int,
    use_mask: bool,
) -> np.ndarray:
    batch_sz, n_in_channels, in_h, in_w = input.shape

    n_parallel_imgs = min(batch_sz, n_parallel_imgs)

    n_out_channels = weight.shape[0]
    weight_h, weight_w = weight.shape[2], weight.shape[3]

    out_h, out_w = grad_out.shape[2], grad_out.shape[3]

    grad_weight = np.zeros_like(weight)
    if batch_sz == 0:
        return grad_weight

    n_blocks = batch_sz // n_parallel_imgs
    grad_out_buf = grad_out.reshape(
        n_blocks, n_parallel_imgs, n_weight_grps, n_out_channels // n_weight_grps, out_h, out_w
    ).transpose(0, 2, 3, 1, 4, 5)

    input = input.reshape(n_blocks, n_parallel_imgs, n_in_channels, in_h, in_w)

    offset = offset.reshape(n_blocks, n_parallel_imgs, n_offset_grps * 2 * weight_h * weight_w, out_h, out_w)

    if use_mask:
        assert mask is not None
        mask = mask.reshape(n_blocks, n_parallel_imgs, n_offset_grps * weight_h * weight_w, out_h, out_w)

    grad_weight = grad_weight.reshape(n_weight_grps, grad_weight.shape[0] // n_weight_grps, *grad_weight.shape[1:])

    for elt in range(n_blocks):
        columns = deformable_im2col(
            input[elt],
            offset[elt],
            mask[elt] if use_mask else None,
            n_in_channels,
            in_h,
            in_w,
            weight_h,
            weight_w,
            pad_h,
            pad_w,
            stride_h,
            stride_w,
            dilation_h,
            dilation_w,
            out_h,
            out_w,
            n_parallel_imgs,
            n_offset_grps,
            use_mask,
        )
        columns = columns.reshape(n_weight_grps, n_in_channels * weight_w * weight_h // n_weight_grps, -1)

        for g in range(n_weight_grps):
            flat = grad_weight[g].reshape(grad_weight.shape[1], -1)
            flat += grad_out_buf[elt][g].reshape(grad_out_buf.shape[2], -1) @ columns[g].T
            grad_weight[g] = flat.reshape(grad_weight[g].shape)

    return grad_weight.reshape(
        grad_weight.shape[0] * grad_weight.shape[1], grad_weight.shape[2], grad_weight.shape[3], grad_weight.shape[4]
    )


def _check_shapes(
    input: np.ndarray,
    weight: np.ndarray,
    offset: np.ndarray,
    mask: np.ndarray | None,
    n_weight_grps: int,
    n_offset_grps: int,
    out_h: int,
    out_w: int,
    use_mask: bool,
) -> None:
    """The forward kernel's ``TORCH_CHECK``s on shapes, as ``ValueError``."""
    weight_h, weight_w = weight.shape[2], weight.shape[3]
    checks = [
        (input.ndim == 4 and offset.ndim == 4 and weight.ndim == 4, "input, offset and weight must be 4-D"),
        (not use_mask or (mask is not None and mask.ndim == 4), "mask must be 4-D"),
        (weight.shape[1] * n_weight_grps == input.shape[1], "weight.shape[1] * groups != input channels"),
        (weight.shape[0] % n_weight_grps == 0, "out channels not divisible by groups"),
        (offset.shape[1] == n_offset_grps * 2 * weight_h * weight_w, "offset.shape[1] is not valid"),
        (not use_mask or mask.shape[1] == n_offset_grps * weight_h * weight_w, "mask.shape[1] is not valid"),
        (input.shape[1] % n_offset_grps == 0, "input channels not divisible by offset groups"),
        (offset.shape[0] == input.shape[0], "invalid batch size of offset"),
        (offset.shape[2:] == (out_h, out_w), "offset output dims differ from the computed output dims"),
        (not use_mask or mask.shape[0] == input.shape[0], "invalid batch size of mask"),
        (not use_mask or mask.shape[2:] == (out_h, out_w), "mask output dims differ from the computed output dims"),
        (out_h > 0 and out_w > 0, "calculated output size too small"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def deform_conv2d_forward_kernel(
    input: np.ndarray,
    weight: np.ndarray,
    offset: np.ndarray,
    mask: np.ndarray | None,
    bias: np.ndarray,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    n_weight_grps: int,
    n_offset_grps: int,
    use_mask: bool,
) -> np.ndarray:
    input_c = np.ascontiguousarray(input, np.float64)
    offset_c = np.ascontiguousarray(offset, np.float64)
    weight_c = np.ascontiguousarray(weight, np.float64)
    mask_c = np.ascontiguousarray(mask, np.float64) if use_mask else None
    bias_c = np.ascontiguousarray(bias, np.float64)

    batch_sz, n_in_channels, in_h, in_w = input_c.shape

    n_parallel_imgs = get_greatest_divisor_below_bound(batch_sz, K_MAX_PARALLEL_IMGS)

    # Unpack shapes and args
    out_channels = weight_c.shape[0]
    weight_h, weight_w = weight_c.shape[2], weight_c.shape[3]

    ker_h = dilation_h * (weight_h - 1) + 1
    ker_w = dilation_w * (weight_w - 1) + 1
    out_h = ((in_h + 2 * pad_h - ker_h) // stride_h) + 1
    out_w = ((in_w + 2 * pad_w - ker_w) // stride_w) + 1

    if not (weight_h > 0 and weight_w > 0 and stride_h > 0 and stride_w > 0):
        raise ValueError("kernel size and stride must be positive")
    if not (pad_h >= 0 and pad_w >= 0 and dilation_h > 0 and dilation_w > 0):
        raise ValueError("padding must be non-negative and dilation positive")
    _check_shapes(input_c, weight_c, offset_c, mask_c, n_weight_grps, n_offset_grps, out_h, out_w, use_mask)

    out = np.zeros((batch_sz, out_channels, out_h, out_w))
    if batch_sz == 0:
        return out

    n_blocks = batch_sz // n_parallel_imgs
    # Separate batches into blocks
    input_c = input_c.reshape(n_blocks, n_parallel_imgs, n_in_channels, in_h, in_w)
    offset_c = offset_c.reshape(n_blocks, n_parallel_imgs, n_offset_grps * 2 * weight_h * weight_w, out_h, out_w)
    if use_mask:
        assert mask_c is not None
        mask_c = mask_c.reshape(n_blocks, n_parallel_imgs, n_offset_grps * weight_h * weight_w, out_h, out_w)

    out_buf = np.zeros((n_blocks, out_channels, n_parallel_imgs * out_h, out_w))

    # Separate channels into convolution groups
    out_buf = out_buf.reshape(
        out_buf.shape[0], n_weight_grps, out_buf.shape[1] // n_weight_grps, out_buf.shape[2], out_buf.shape[3]
    )
    weight_c = weight_c.reshape(n_weight_grps, weight_c.shape[0] // n_weight_grps, *weight_c.shape[1:])

    # Sample points and perform convolution
    for b in range(n_blocks):
        columns = deformable_im2col(
            input_c[b],
            offset_c[b],
            mask_c[b] if use_mask else None,
            n_in_channels,
            in_h,
            in_w,
            weight_h,
            weight_w,
            pad_h,
            pad_w,
            stride_h,
            stride_w,
            dilation_h,
            dilation_w,
            out_h,
            out_w,
            n_parallel_imgs,
            n_offset_grps,
            use_mask,
        )

        columns = columns.reshape(n_weight_grps, columns.shape[0] // n_weight_grps, columns.shape[1])
        for g in range(n_weight_grps):
            flat = out_buf[b][g].reshape(out_buf.shape[2], -1)
            flat += weight_c[g].reshape(weight_c.shape[1], -1) @ columns[g]
            out_buf[b][g] = flat.reshape(out_buf[b][g].shape)

    out_buf = out_buf.reshape(n_blocks, out_channels, n_parallel_imgs, out_h, out_w)
    out_buf = out_buf.transpose(0, 2, 1, 3, 4)
    out = out_buf.reshape(batch_sz, out_channels, out_h, out_w)

    return out + bias_c.reshape(1, out_channels, 1, 1)


def deform_conv2d_backward_kernel(
    grad_out: np.ndarray,
    input: np.ndarray,
    weight: np.ndarray,
    offset: np.ndarray,
    mask: np.ndarray | None,
    bias: np.ndarray,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    n_weight_grps: int,
    n_offset_grps: int,
    use_mask: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    grad_out_c = np.ascontiguousarray(grad_out, np.float64)
    input_c = np.ascontiguousarray(input, np.float64)
    weight_c = np.ascontiguousarray(weight, np.float64)
    offset_c = np.ascontiguousarray(offset, np.float64)
    mask_c = np.ascontiguousarray(mask, np.float64) if use_mask else None
    bias_c = np.ascontiguousarray(bias, np.float64)

    batch_sz = input_c.shape[0]
    n_parallel_imgs = get_greatest_divisor_below_bound(batch_sz, K_MAX_PARALLEL_IMGS)

    grad_input, grad_offset, grad_mask = backward_gradient_inputs(
        input_c,
        weight_c,
        offset_c,
        mask_c,
        grad_out_c,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        dilation_h,
        dilation_w,
        n_weight_grps,
        n_offset_grps,
        n_parallel_imgs,
        use_mask,
    )

    grad_weight = backward_gradient_parameters(
        input_c,
        weight_c,
        offset_c,
        mask_c,
        grad_out_c,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        dilation_h,
        dilation_w,
        n_weight_grps,
        n_offset_grps,
        n_parallel_imgs,
        use_mask,
    )

    grad_bias = np.ones_like(bias_c) * grad_out_c.sum(axis=(0, 2, 3))

    return grad_input, grad_weight, grad_offset, grad_mask, grad_bias


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def _wrapper_args(
    input: np.ndarray,
    offset: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    stride: int | Sequence[int],
    padding: int | Sequence[int],
    dilation: int | Sequence[int],
    mask: np.ndarray | None,
) -> tuple[object, ...]:
    """What ``torchvision.ops.deform_conv2d`` passes to the kernel: the arguments after ``grad_out``."""
    out_channels = weight.shape[0]
    use_mask = mask is not None
    if bias is None:
        bias = np.zeros(out_channels)
    stride_h, stride_w = _pair(stride)
    pad_h, pad_w = _pair(padding)
    dil_h, dil_w = _pair(dilation)
    weights_h, weights_w = weight.shape[-2:]
    n_in_channels = input.shape[1]
    n_offset_grps = offset.shape[1] // (2 * weights_h * weights_w)
    n_weight_grps = n_in_channels // weight.shape[1]
    if n_offset_grps == 0:
        raise ValueError("offset.shape[1] must be a multiple of 2 * kernel_h * kernel_w")
    return (
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


def deform_conv2d_forward(
    input: np.ndarray,
    offset: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    stride: int | Sequence[int] = (1, 1),
    padding: int | Sequence[int] = (0, 0),
    dilation: int | Sequence[int] = (1, 1),
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """``torchvision.ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)`` in float64:
    input ``(B, C, H, W)``, offset ``(B, 2 * G_off * kh * kw, H_out, W_out)`` with ``(dy, dx)`` per tap and the
    taps row-major, weight ``(C_out, C / groups, kh, kw)``, mask ``(B, G_off * kh * kw, H_out, W_out)`` or None
    (v1), bias ``(C_out,)`` or None. Returns ``(B, C_out, H_out, W_out)``."""
    return deform_conv2d_forward_kernel(*_wrapper_args(input, offset, weight, bias, stride, padding, dilation, mask))


def deform_conv2d_backward(
    grad_out: np.ndarray,
    input: np.ndarray,
    offset: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    stride: int | Sequence[int] = (1, 1),
    padding: int | Sequence[int] = (0, 0),
    dilation: int | Sequence[int] = (1, 1),
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """The gradients of ``sum(deform_conv2d_forward(...) * grad_out)``, as torchvision's backward kernel computes
    them: ``(grad_input, grad_weight, grad_offset, grad_mask, grad_bias)``; ``grad_mask`` is None without a
    mask, ``grad_bias`` is ``grad_out.sum((0, 2, 3))`` even without a bias."""
    args = _wrapper_args(input, offset, weight, bias, stride, padding, dilation, mask)
    return deform_conv2d_backward_kernel(grad_out, *args)
