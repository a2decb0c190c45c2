"""PyTorch reference of StyleGAN2-ADA's modulated convolution, re-written line by line from NVIDIA's code.

Source: https://github.com/NVlabs/stylegan2-ada-pytorch, commit ``d72cc7d041b42ec8e806021a205ed9349f87c6a4``.
Copyright (c) 2021, NVIDIA CORPORATION. All rights reserved. The originals are under the NVIDIA Source Code
License for StyleGAN2 with Adaptive Discriminator Augmentation (ADA) (``LICENSE.txt`` of that repository):
this file is a derivative work of them, usable non-commercially (research or evaluation) only, and it is
kept here solely as a test reference, with a complete copy of that licence beside it (``LICENSE.txt``,
as its section 3.1 requires). It is not part of the ``jdynconv`` package.

Which original each piece follows (all paths relative to that repository, at that commit):

* ``torch_utils/misc.py``: ``assert_shape`` (the ``torch.jit.trace`` symbolic branches left out).
* ``torch_utils/ops/upfirdn2d.py``: ``_parse_scaling``, ``_parse_padding``, ``_get_filter_size``,
  ``setup_filter``, ``upfirdn2d`` (its reference path ``_upfirdn2d_ref``), ``filter2d``, ``upsample2d``,
  ``downsample2d``.
* ``torch_utils/ops/conv2d_resample.py``: ``_get_weight_shape``, ``_conv2d_wrapper``, ``conv2d_resample``.
* ``torch_utils/ops/bias_act.py``: ``activation_funcs``, ``bias_act`` (its reference path ``_bias_act_ref``).
* ``torch_utils/ops/fma.py``: ``fma``, ``_FusedMultiplyAdd``, ``_unbroadcast``.
* ``training/networks.py``: ``normalize_2nd_moment``, ``modulated_conv2d``, ``FullyConnectedLayer``, and
  ``SynthesisLayer`` / ``ToRGBLayer``, both expressed by ``ModulatedConvLayer`` here.

What differs from the originals, none of it numerical on CPU:

* No CUDA plugins: ``upfirdn2d`` and ``bias_act`` are the originals' reference implementations, which are
  what the originals run for CPU tensors (their ``impl='cuda'`` default falls back to them off-GPU).
* ``torch_utils/ops/conv2d_gradfix.py``'s ``conv2d``/``conv_transpose2d`` are ``torch.nn.functional``'s
  (what ``conv2d_gradfix`` calls for CPU tensors); ``misc.profiled_function`` (a profiler label) and
  ``misc.suppress_tracer_warnings`` (``torch.jit.trace`` only) are left out; ``persistence`` is left out.
* ``modulated_conv2d`` takes a keyword-only ``prenormalize`` (default ``None`` = the original's condition,
  ``x.dtype == torch.float16 and demodulate``) so that the FP16 pre-normalisation can be run in float32/64.
* ``ModulatedConvLayer`` adds ``down``, ``padding``, ``demodulate``, ``weight_gain`` and ``noise`` options so
  one class expresses both ``SynthesisLayer`` and ``ToRGBLayer``; the defaults are ``SynthesisLayer``'s.

Layouts are NVIDIA's (PyTorch's): activations ``(B, C, H, W)``, conv weights ``(O, I, kh, kw)``, styles
``(B, I)``, ``FullyConnectedLayer`` weights ``(out_features, in_features)``, FIR filters ``(fh, fw)`` or
``(taps,)`` (separable), paddings ``[x0, x1, y0, y1]``.
"""

# The originals' compound asserts are kept as written.
# ruff: noqa: PT018

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------
# torch_utils/misc.py


def assert_shape(tensor: torch.Tensor, ref_shape: Sequence[int | None]) -> None:
    """Follows ``misc.assert_shape``: ``None`` entries may vary (no ``torch.jit.trace`` branches)."""
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f"Wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)}")
    for idx, (size, ref_size) in enumerate(zip(tensor.shape, ref_shape, strict=True)):
        if ref_size is None:
            pass
        elif size != ref_size:
            raise AssertionError(f"Wrong size for dimension {idx}: got {size}, expected {ref_size}")


# ----------------------------------------------------------------------------
# torch_utils/ops/upfirdn2d.py

Scaling = int | Sequence[int]
Padding = int | Sequence[int]


def _parse_scaling(scaling: Scaling) -> tuple[int, int]:
    """Follows ``upfirdn2d._parse_scaling``: ``int`` or ``[x, y]`` -> ``(sx, sy)``."""
    if isinstance(scaling, int):
        scaling = [scaling, scaling]
    assert isinstance(scaling, (list, tuple))
    assert all(isinstance(x, int) for x in scaling)
    sx, sy = scaling
    assert sx >= 1 and sy >= 1
    return sx, sy


def _parse_padding(padding: Padding) -> tuple[int, int, int, int]:
    """Follows ``upfirdn2d._parse_padding``: ``int``, ``[x, y]`` or ``[x0, x1, y0, y1]`` -> ``(x0, x1, y0, y1)``."""
    if isinstance(padding, int):
        padding = [padding, padding]
    assert isinstance(padding, (list, tuple))
    assert all(isinstance(x, int) for x in padding)
    if len(padding) == 2:
        padx, pady = padding
        padding = [padx, padx, pady, pady]
    padx0, padx1, pady0, pady1 = padding
    return padx0, padx1, pady0, pady1


def _get_filter_size(f: torch.Tensor | None) -> tuple[int, int]:
    """Follows ``upfirdn2d._get_filter_size``: ``(fw, fh)`` (width first); ``None`` -> ``(1, 1)``."""
    if f is None:
        return 1, 1
    assert isinstance(f, torch.Tensor) and f.ndim in [1, 2]
    fw = int(f.shape[-1])
    fh = int(f.shape[0])
    assert_shape(f, [fh, fw][: f.ndim])
    assert fw >= 1 and fh >= 1
    return fw, fh


def setup_filter(
    f: Any,
    device: torch.device | str = torch.device("cpu"),  # noqa: B008 (the original's default)
    normalize: bool = True,
    flip_filter: bool = False,
    gain: float = 1,
    separable: bool | None = None,
) -> torch.Tensor:
    """Follows ``upfirdn2d.setup_filter``: a float32 FIR filter ``(fh, fw)`` or ``(taps,)`` (separable).

    ``None`` is the identity ``[1.]``; a 0-d value becomes ``(1,)``. A 1-D filter is made 2-D by the outer
    product ``f.ger(f)`` unless separable (default: separable iff 1-D with >= 8 taps). ``normalize`` divides
    by the sum (after the outer product), ``flip_filter`` flips every dimension, ``gain`` multiplies by
    ``gain ** (f.ndim / 2)``. As in the original, ``f /= f.sum()`` is in place, so a float32 tensor or
    array passed in 2-D (or separable) form is normalised in place too.
    """
    # Validate.
    if f is None:
        f = 1
    f = torch.as_tensor(f, dtype=torch.float32)
    assert f.ndim in [0, 1, 2]
    assert f.numel() > 0
    if f.ndim == 0:
        f = f[np.newaxis]

    # Separable?
    if separable is None:
        separable = f.ndim == 1 and f.numel() >= 8
    if f.ndim == 1 and not separable:
        f = f.ger(f)
    assert f.ndim == (1 if separable else 2)

    # Apply normalize, flip, gain, and device.
    if normalize:
        f /= f.sum()
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f * (gain ** (f.ndim / 2))
    f = f.to(device=device)
    return f


def upfirdn2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    up: Scaling = 1,
    down: Scaling = 1,
    padding: Padding = 0,
    flip_filter: bool = False,
    gain: float = 1,
) -> torch.Tensor:
    """Follows ``upfirdn2d._upfirdn2d_ref`` (what ``upfirdn2d.upfirdn2d`` runs off-GPU).

    Per channel of ``x (B, C, H, W)``: insert ``up - 1`` zeros after each pixel; pad by ``[x0, x1, y0, y1]``
    (negative crops); convolve with ``f * gain ** (f.ndim / 2)`` (a true convolution: ``f`` is flipped
    before ``F.conv2d`` unless ``flip_filter``), valid positions only; keep every ``down``-th pixel starting
    at 0. Out size per axis: ``(H * up + p0 + p1 - fh) // down + 1``. ``f`` must be float32 without grad.
    """
    # Validate arguments.
    assert isinstance(x, torch.Tensor) and x.ndim == 4
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    assert isinstance(f, torch.Tensor) and f.ndim in [1, 2]
    assert f.dtype == torch.float32 and not f.requires_grad
    batch_size, num_channels, in_height, in_width = x.shape
    upx, upy = _parse_scaling(up)
    downx, downy = _parse_scaling(down)
    padx0, padx1, pady0, pady1 = _parse_padding(padding)

    # Upsample by inserting zeros.
    x = x.reshape([batch_size, num_channels, in_height, 1, in_width, 1])
    x = F.pad(x, [0, upx - 1, 0, 0, 0, upy - 1])
    x = x.reshape([batch_size, num_channels, in_height * upy, in_width * upx])

    # Pad or crop.
    x = F.pad(x, [max(padx0, 0), max(padx1, 0), max(pady0, 0), max(pady1, 0)])
    x = x[:, :, max(-pady0, 0) : x.shape[2] - max(-pady1, 0), max(-padx0, 0) : x.shape[3] - max(-padx1, 0)]

    # Setup filter.
    f = f * (gain ** (f.ndim / 2))
    f = f.to(x.dtype)
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))

    # Convolve with the filter.
    f = f[np.newaxis, np.newaxis].repeat([num_channels, 1] + [1] * f.ndim)
    if f.ndim == 4:
        x = F.conv2d(input=x, weight=f, groups=num_channels)
    else:
        x = F.conv2d(input=x, weight=f.unsqueeze(2), groups=num_channels)
        x = F.conv2d(input=x, weight=f.unsqueeze(3), groups=num_channels)

    # Downsample by throwing away pixels.
    x = x[:, :, ::downy, ::downx]
    return x


def filter2d(
    x: torch.Tensor, f: torch.Tensor | None, padding: Padding = 0, flip_filter: bool = False, gain: float = 1
) -> torch.Tensor:
    """Follows ``upfirdn2d.filter2d``: same-size FIR filtering, pads ``[fw//2, (fw-1)//2, fh//2, (fh-1)//2]``."""
    padx0, padx1, pady0, pady1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    p = [
        padx0 + fw // 2,
        padx1 + (fw - 1) // 2,
        pady0 + fh // 2,
        pady1 + (fh - 1) // 2,
    ]
    return upfirdn2d(x, f, padding=p, flip_filter=flip_filter, gain=gain)


def upsample2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    up: Scaling = 2,
    padding: Padding = 0,
    flip_filter: bool = False,
    gain: float = 1,
) -> torch.Tensor:
    """Follows ``upfirdn2d.upsample2d``: out ``H * up``; pads ``[(fw+up-1)//2, (fw-up)//2, ...]``, gain ``*upx*upy``."""
    upx, upy = _parse_scaling(up)
    padx0, padx1, pady0, pady1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    p = [
        padx0 + (fw + upx - 1) // 2,
        padx1 + (fw - upx) // 2,
        pady0 + (fh + upy - 1) // 2,
        pady1 + (fh - upy) // 2,
    ]
    return upfirdn2d(x, f, up=up, padding=p, flip_filter=flip_filter, gain=gain * upx * upy)


def downsample2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    down: Scaling = 2,
    padding: Padding = 0,
    flip_filter: bool = False,
    gain: float = 1,
) -> torch.Tensor:
    """Follows ``upfirdn2d.downsample2d``: out ``H // down``; pads ``[(fw-down+1)//2, (fw-down)//2, ...]``."""
    downx, downy = _parse_scaling(down)
    padx0, padx1, pady0, pady1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    p = [
        padx0 + (fw - downx + 1) // 2,
        padx1 + (fw - downx) // 2,
        pady0 + (fh - downy + 1) // 2,
        pady1 + (fh - downy) // 2,
    ]
    return upfirdn2d(x, f, down=down, padding=p, flip_filter=flip_filter, gain=gain)


# ----------------------------------------------------------------------------
# torch_utils/ops/conv2d_resample.py


def _get_weight_shape(w: torch.Tensor) -> list[int]:
    """Follows ``conv2d_resample._get_weight_shape``."""
    shape = [int(sz) for sz in w.shape]
    assert_shape(w, shape)
    return shape


def _conv2d_wrapper(
    x: torch.Tensor,
    w: torch.Tensor,
    stride: int = 1,
    padding: int | Sequence[int] = 0,
    groups: int = 1,
    transpose: bool = False,
    flip_weight: bool = True,
) -> torch.Tensor:
    """Follows ``conv2d_resample._conv2d_wrapper``.

    ``flip_weight=True``: ``F.conv2d``'s correlation; ``False``: the weight flipped on (kh, kw) first, i.e. a
    true convolution. ``transpose`` uses ``F.conv_transpose2d`` (then ``w`` is ``(I, O // groups, kh, kw)``).
    ``padding`` here is ``F.conv2d``'s (``int`` or ``[py, px]``).
    """
    out_channels, in_channels_per_group, kh, kw = _get_weight_shape(w)

    # Flip weight if requested.
    # conv2d() actually performs correlation (flip_weight=True) not convolution (flip_weight=False).
    if not flip_weight:
        w = w.flip([2, 3])

    # Workaround performance pitfall in cuDNN 8.0.5, triggered when using
    # 1x1 kernel + memory_format=channels_last + less than 64 channels.
    if (
        kw == 1
        and kh == 1
        and stride == 1
        and padding in [0, [0, 0], (0, 0)]
        and not transpose
        and x.stride()[1] == 1
        and min(out_channels, in_channels_per_group) < 64
    ):
        if out_channels <= 4 and groups == 1:
            in_shape = x.shape
            x = w.squeeze(3).squeeze(2) @ x.reshape([in_shape[0], in_channels_per_group, -1])
            x = x.reshape([in_shape[0], out_channels, in_shape[2], in_shape[3]])
        else:
            x = x.to(memory_format=torch.contiguous_format)
            w = w.to(memory_format=torch.contiguous_format)
            x = F.conv2d(x, w, groups=groups)
        return x.to(memory_format=torch.channels_last)

    # Otherwise => execute using conv2d_gradfix.
    if transpose:
        return F.conv_transpose2d(x, w, stride=stride, padding=padding, groups=groups)
    return F.conv2d(x, w, stride=stride, padding=padding, groups=groups)


def conv2d_resample(
    x: torch.Tensor,
    w: torch.Tensor,
    f: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: Padding = 0,
    groups: int = 1,
    flip_weight: bool = True,
    flip_filter: bool = False,
) -> torch.Tensor:
    """Follows ``conv2d_resample.conv2d_resample``: 2-D conv with optional up/downsampling, padding once.

    ``x (B, I, H, W)``, ``w (O, I // groups, kh, kw)``, ``f`` from ``setup_filter`` (float32) or ``None``.
    ``padding`` (``[x0, x1, y0, y1]`` or shorter) is with respect to the upsampled image, and grows by
    ``[(fw+up-1)//2, (fw-up)//2, ...]`` if ``up > 1`` and by ``[(fw-down+1)//2, (fw-down)//2, ...]`` if
    ``down > 1``. Every path equals the general fallback: ``upfirdn2d(x, f if up > 1 else None, up, padding,
    gain=up**2)``, then the conv (valid), then ``upfirdn2d(f, down)`` if ``down > 1``.
    """
    # Validate arguments.
    assert isinstance(x, torch.Tensor) and (x.ndim == 4)
    assert isinstance(w, torch.Tensor) and (w.ndim == 4) and (w.dtype == x.dtype)
    assert f is None or (isinstance(f, torch.Tensor) and f.ndim in [1, 2] and f.dtype == torch.float32)
    assert isinstance(up, int) and (up >= 1)
    assert isinstance(down, int) and (down >= 1)
    assert isinstance(groups, int) and (groups >= 1)
    out_channels, in_channels_per_group, kh, kw = _get_weight_shape(w)
    fw, fh = _get_filter_size(f)
    px0, px1, py0, py1 = _parse_padding(padding)

    # Adjust padding to account for up/downsampling.
    if up > 1:
        px0 += (fw + up - 1) // 2
        px1 += (fw - up) // 2
        py0 += (fh + up - 1) // 2
        py1 += (fh - up) // 2
    if down > 1:
        px0 += (fw - down + 1) // 2
        px1 += (fw - down) // 2
        py0 += (fh - down + 1) // 2
        py1 += (fh - down) // 2

    # Fast path: 1x1 convolution with downsampling only => downsample first, then convolve.
    if kw == 1 and kh == 1 and (down > 1 and up == 1):
        x = upfirdn2d(x=x, f=f, down=down, padding=[px0, px1, py0, py1], flip_filter=flip_filter)
        x = _conv2d_wrapper(x=x, w=w, groups=groups, flip_weight=flip_weight)
        return x

    # Fast path: 1x1 convolution with upsampling only => convolve first, then upsample.
    if kw == 1 and kh == 1 and (up > 1 and down == 1):
        x = _conv2d_wrapper(x=x, w=w, groups=groups, flip_weight=flip_weight)
        x = upfirdn2d(x=x, f=f, up=up, padding=[px0, px1, py0, py1], gain=up**2, flip_filter=flip_filter)
        return x

    # Fast path: downsampling only => use strided convolution.
    if down > 1 and up == 1:
        x = upfirdn2d(x=x, f=f, padding=[px0, px1, py0, py1], flip_filter=flip_filter)
        x = _conv2d_wrapper(x=x, w=w, stride=down, groups=groups, flip_weight=flip_weight)
        return x

    # Fast path: upsampling with optional downsampling => use transpose strided convolution.
    if up > 1:
        if groups == 1:
            w = w.transpose(0, 1)
        else:
            w = w.reshape(groups, out_channels // groups, in_channels_per_group, kh, kw)
            w = w.transpose(1, 2)
            w = w.reshape(groups * in_channels_per_group, out_channels // groups, kh, kw)
        px0 -= kw - 1
        px1 -= kw - up
        py0 -= kh - 1
        py1 -= kh - up
        pxt = max(min(-px0, -px1), 0)
        pyt = max(min(-py0, -py1), 0)
        x = _conv2d_wrapper(
            x=x, w=w, stride=up, padding=[pyt, pxt], groups=groups, transpose=True, flip_weight=(not flip_weight)
        )
        x = upfirdn2d(
            x=x, f=f, padding=[px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt], gain=up**2, flip_filter=flip_filter
        )
        if down > 1:
            x = upfirdn2d(x=x, f=f, down=down, flip_filter=flip_filter)
        return x

    # Fast path: no up/downsampling, padding supported by the underlying implementation => use plain conv2d.
    if up == 1 and down == 1 and px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:
        return _conv2d_wrapper(x=x, w=w, padding=[py0, px0], groups=groups, flip_weight=flip_weight)

    # Fallback: Generic reference implementation.
    x = upfirdn2d(
        x=x, f=(f if up > 1 else None), up=up, padding=[px0, px1, py0, py1], gain=up**2, flip_filter=flip_filter
    )
    x = _conv2d_wrapper(x=x, w=w, groups=groups, flip_weight=flip_weight)
    if down > 1:
        x = upfirdn2d(x=x, f=f, down=down, flip_filter=flip_filter)
    return x


# ----------------------------------------------------------------------------
# torch_utils/ops/bias_act.py


@dataclasses.dataclass(frozen=True)
class _ActivationSpec:
    """One entry of ``bias_act.activation_funcs`` (the CUDA-only fields left out)."""

    func: Callable[..., torch.Tensor]
    def_alpha: float
    def_gain: float


activation_funcs: dict[str, _ActivationSpec] = {
    "linear": _ActivationSpec(func=lambda x, **_: x, def_alpha=0, def_gain=1),
    "relu": _ActivationSpec(func=lambda x, **_: F.relu(x), def_alpha=0, def_gain=float(np.sqrt(2))),
    "lrelu": _ActivationSpec(
        func=lambda x, alpha, **_: F.leaky_relu(x, alpha), def_alpha=0.2, def_gain=float(np.sqrt(2))
    ),
    "tanh": _ActivationSpec(func=lambda x, **_: torch.tanh(x), def_alpha=0, def_gain=1),
    "sigmoid": _ActivationSpec(func=lambda x, **_: torch.sigmoid(x), def_alpha=0, def_gain=1),
    "elu": _ActivationSpec(func=lambda x, **_: F.elu(x), def_alpha=0, def_gain=1),
    "selu": _ActivationSpec(func=lambda x, **_: F.selu(x), def_alpha=0, def_gain=1),
    "softplus": _ActivationSpec(func=lambda x, **_: F.softplus(x), def_alpha=0, def_gain=1),
    "swish": _ActivationSpec(func=lambda x, **_: torch.sigmoid(x) * x, def_alpha=0, def_gain=float(np.sqrt(2))),
}


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    dim: int = 1,
    act: str = "linear",
    alpha: float | None = None,
    gain: float | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """Follows ``bias_act._bias_act_ref``: ``clamp(act(x + b, alpha) * gain, -clamp, clamp)``.

    ``b (C,)`` is added along ``dim``; ``alpha``/``gain`` ``None`` take the activation's defaults (lrelu:
    0.2 and sqrt(2)); the gain multiply is skipped when ``gain == 1``; ``clamp`` ``None`` disables clamping.
    """
    assert isinstance(x, torch.Tensor)
    assert clamp is None or clamp >= 0
    spec = activation_funcs[act]
    alpha = float(alpha if alpha is not None else spec.def_alpha)
    gain = float(gain if gain is not None else spec.def_gain)
    clamp = float(clamp if clamp is not None else -1)

    # Add bias.
    if b is not None:
        assert isinstance(b, torch.Tensor) and b.ndim == 1
        assert 0 <= dim < x.ndim
        assert b.shape[0] == x.shape[dim]
        x = x + b.reshape([-1 if i == dim else 1 for i in range(x.ndim)])

    # Evaluate activation function.
    alpha = float(alpha)
    x = spec.func(x, alpha=alpha)

    # Scale by gain.
    gain = float(gain)
    if gain != 1:
        x = x * gain

    # Clamp.
    if clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


# ----------------------------------------------------------------------------
# torch_utils/ops/fma.py


def fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Follows ``fma.fma``: ``a * b + c`` (``torch.addcmul``) with gradients unbroadcast to each shape."""
    return _FusedMultiplyAdd.apply(a, b, c)


class _FusedMultiplyAdd(torch.autograd.Function):
    """Follows ``fma._FusedMultiplyAdd``."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        out = torch.addcmul(c, a, b)
        ctx.save_for_backward(a, b)
        ctx.c_shape = c.shape
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, b = ctx.saved_tensors
        c_shape = ctx.c_shape
        da = None
        db = None
        dc = None

        if ctx.needs_input_grad[0]:
            da = _unbroadcast(dout * b, a.shape)

        if ctx.needs_input_grad[1]:
            db = _unbroadcast(dout * a, b.shape)

        if ctx.needs_input_grad[2]:
            dc = _unbroadcast(dout, c_shape)

        return da, db, dc


def _unbroadcast(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Follows ``fma._unbroadcast``."""
    extra_dims = x.ndim - len(shape)
    assert extra_dims >= 0
    dim = [i for i in range(x.ndim) if x.shape[i] > 1 and (i < extra_dims or shape[i - extra_dims] == 1)]
    if len(dim):
        x = x.sum(dim=dim, keepdim=True)
    if extra_dims:
        x = x.reshape(-1, *x.shape[extra_dims + 1 :])
    assert x.shape == shape
    return x


# ----------------------------------------------------------------------------
# training/networks.py


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Follows ``networks.normalize_2nd_moment``."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    noise: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: Padding = 0,
    resample_filter: torch.Tensor | None = None,
    demodulate: bool = True,
    flip_weight: bool = True,
    fused_modconv: bool = True,
    *,
    prenormalize: bool | None = None,
) -> torch.Tensor:
    """Follows ``networks.modulated_conv2d``.

    Args:
      x: ``(B, I, H, W)``.
      weight: ``(O, I, kh, kw)``, shared by the batch.
      styles: ``(B, I)``, multiplies the weight's input channels per sample.
      noise: added to the output (broadcast, e.g. ``(B, 1, H', W')`` or ``(H', W')``), after demodulation.
      up, down, padding, resample_filter, flip_weight: ``conv2d_resample``'s.
      demodulate: scale each sample's output channel by ``rsqrt(sum_{I,kh,kw} (weight * style)^2 + 1e-8)``.
      fused_modconv: True: one grouped conv (``groups = B``) with per-sample weights; False: ``x * styles``,
        the shared conv, then ``fma(x, dcoefs, noise)`` / ``x * dcoefs`` / ``x + noise``.
      prenormalize: not in the original: ``None`` (default) runs the original's FP16 pre-normalisation iff
        ``x.dtype == torch.float16 and demodulate``; ``True``/``False`` forces it on/off, for any dtype.
    """
    batch_size = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    assert_shape(weight, [out_channels, in_channels, kh, kw])  # [OIkk]
    assert_shape(x, [batch_size, in_channels, None, None])  # [NIHW]
    assert_shape(styles, [batch_size, in_channels])  # [NI]

    # Pre-normalize inputs to avoid FP16 overflow.
    if prenormalize is None:
        prenormalize = x.dtype == torch.float16 and demodulate
    if prenormalize:
        weight = weight * (
            1 / np.sqrt(in_channels * kh * kw) / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True)
        )  # max_Ikk
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)  # max_I

    # Calculate per-sample weights and demodulation coefficients.
    w = None
    dcoefs = None
    if demodulate or fused_modconv:
        w = weight.unsqueeze(0)  # [NOIkk]
        w = w * styles.reshape(batch_size, 1, -1, 1, 1)  # [NOIkk]
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()  # [NO]
    if demodulate and fused_modconv:
        w = w * dcoefs.reshape(batch_size, -1, 1, 1, 1)  # [NOIkk]

    # Execute by scaling the activations before and after the convolution.
    if not fused_modconv:
        x = x * styles.to(x.dtype).reshape(batch_size, -1, 1, 1)
        x = conv2d_resample(
            x=x,
            w=weight.to(x.dtype),
            f=resample_filter,
            up=up,
            down=down,
            padding=padding,
            flip_weight=flip_weight,
        )
        if demodulate and noise is not None:
            x = fma(x, dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1), noise.to(x.dtype))
        elif demodulate:
            x = x * dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1)
        elif noise is not None:
            x = x.add_(noise.to(x.dtype))
        return x

    # Execute as one fused op using grouped convolution.
    batch_size = int(batch_size)
    assert_shape(x, [batch_size, in_channels, None, None])
    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_channels, kh, kw)
    x = conv2d_resample(
        x=x,
        w=w.to(x.dtype),
        f=resample_filter,
        up=up,
        down=down,
        padding=padding,
        groups=batch_size,
        flip_weight=flip_weight,
    )
    x = x.reshape(batch_size, -1, *x.shape[2:])
    if noise is not None:
        x = x.add_(noise)
    return x


class FullyConnectedLayer(torch.nn.Module):
    """Follows ``networks.FullyConnectedLayer``: ``act(x @ (weight * weight_gain).T + bias * bias_gain)``.

    ``weight (out_features, in_features)`` is initialised ``randn / lr_multiplier``; ``weight_gain =
    lr_multiplier / sqrt(in_features)``, ``bias_gain = lr_multiplier``; ``bias`` is initialised to
    ``bias_init``. ``'linear'`` with a bias runs ``torch.addmm``; otherwise matmul then ``bias_act``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "linear",
        lr_multiplier: float = 1,
        bias_init: float = 0,
    ) -> None:
        super().__init__()
        self.activation = activation
        self.weight = torch.nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = torch.nn.Parameter(torch.full([out_features], np.float32(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / np.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain

        if self.activation == "linear" and b is not None:
            x = torch.addmm(b.unsqueeze(0), x, w.t())
        else:
            x = x.matmul(w.t())
            x = bias_act(x, b, act=self.activation)
        return x


class ModulatedConvLayer(torch.nn.Module):
    """``networks.SynthesisLayer`` (the defaults) and ``networks.ToRGBLayer``, as one configurable layer.

    Forward: ``styles = affine(w) * weight_gain``; ``y = modulated_conv2d(x, weight, styles, noise, up, down,
    padding, resample_filter, demodulate, flip_weight=(up == 1), fused_modconv)``; then ``bias_act(y, bias,
    activation, gain=act_gain * gain, clamp=conv_clamp * gain)``.

    ``SynthesisLayer(in, out, w_dim, res, kernel_size, up, use_noise, activation, resample_filter, conv_clamp)``
    is ``ModulatedConvLayer`` with the same arguments. ``ToRGBLayer(in, out, w_dim, kernel_size=1, conv_clamp)``
    is ``ModulatedConvLayer(in, out, w_dim, kernel_size=kernel_size, use_noise=False, activation='linear',
    resample_filter=None, conv_clamp=conv_clamp, padding=0, demodulate=False, weight_gain=True)`` (``ToRGBLayer``
    pads 0 whatever its kernel size; ``up == down == 1`` and no filter; act ``'linear'``, gain 1).

    Args:
      in_channels, out_channels, w_dim: ``weight (out, in, k, k)``, ``affine: w_dim -> in_channels``
        (``FullyConnectedLayer`` with ``bias_init=1``).
      resolution: output size (square); needed only with ``use_noise`` (``noise_const (res, res)``, random
        noise ``(B, 1, res, res)``), and then ``x`` must be ``(B, in, res * down // up, res * down // up)``.
      kernel_size: k.
      up, down: resampling factors (``down`` is not in ``SynthesisLayer``, which has ``down = 1``).
      use_noise: registers ``noise_const`` (buffer, ``randn``) and ``noise_strength`` (parameter, 0).
      activation: ``bias_act``'s; its default gain (``sqrt(2)`` for ``'lrelu'``, 1 for ``'linear'``) is
        ``act_gain``.
      resample_filter: taps for ``setup_filter`` (buffer ``resample_filter``), or ``None`` for no buffer
        (``ToRGBLayer`` has none; then ``up`` and ``down`` must be 1).
      conv_clamp: clamps the output to ``+-conv_clamp * gain``; ``None`` disables.
      padding: ``conv2d_resample``'s padding; ``None`` (default) is ``kernel_size // 2``.
      demodulate: ``modulated_conv2d``'s.
      weight_gain: if True (``ToRGBLayer``), styles are multiplied by ``1 / sqrt(in_channels * k * k)``;
        ``SynthesisLayer`` has no such factor (``weight_gain = 1``).

    As with the originals, do not ``.double()``/``.to(dtype)`` the whole module: ``upfirdn2d`` accepts only the
    float32 ``resample_filter`` buffer. Cast the parameters (and ``noise_const``) instead.

    State-dict names are the originals': ``affine.weight``, ``affine.bias``, ``weight``, ``bias``,
    ``noise_strength``, ``noise_const``, ``resample_filter``. Parameters are created in the originals' order,
    so under the same seed ``SynthesisLayer``'s initial values come out the same.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int | None = None,
        kernel_size: int = 3,
        up: int = 1,
        down: int = 1,
        use_noise: bool = True,
        activation: str = "lrelu",
        resample_filter: Sequence[float] | None = (1, 3, 3, 1),
        conv_clamp: float | None = None,
        padding: Padding | None = None,
        demodulate: bool = True,
        weight_gain: bool = False,
    ) -> None:
        super().__init__()
        if use_noise and resolution is None:
            raise ValueError("use_noise needs the layer's output resolution")
        if resample_filter is None and (up > 1 or down > 1):
            raise ValueError("resampling needs a resample_filter")
        self.resolution = resolution
        self.up = up
        self.down = down
        self.use_noise = use_noise
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.demodulate = demodulate
        if resample_filter is not None:
            self.register_buffer("resample_filter", setup_filter(list(resample_filter)))
        else:
            self.resample_filter = None
        self.padding = kernel_size // 2 if padding is None else padding
        self.act_gain = activation_funcs[activation].def_gain

        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = torch.nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = torch.nn.Parameter(torch.zeros([]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = float(1 / np.sqrt(in_channels * (kernel_size**2))) if weight_gain else 1.0

    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        noise_mode: str = "random",
        fused_modconv: bool = True,
        gain: float = 1,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x (B, in, H, W)``, ``w (B, w_dim)`` -> ``(B, out, H * up // down, W * up // down)``.

        ``noise_mode``: ``'random'`` adds ``noise * noise_strength`` where ``noise`` is the given
        ``(B, 1, res, res)`` tensor, or ``torch.randn`` of that shape if ``None`` (the original always draws);
        ``'const'`` adds ``noise_const * noise_strength``; ``'none'`` adds nothing. Without ``use_noise``,
        nothing is added in any mode. ``noise`` is refused in the other modes.
        """
        assert noise_mode in ["random", "const", "none"]
        if noise is not None and noise_mode != "random":
            raise ValueError("an explicit noise tensor is used only with noise_mode='random'")
        if self.use_noise:
            in_resolution = self.resolution * self.down // self.up
            assert_shape(x, [None, self.weight.shape[1], in_resolution, in_resolution])
        styles = self.affine(w)
        if self.weight_gain != 1:
            styles = styles * self.weight_gain

        noise_term = None
        if self.use_noise and noise_mode == "random":
            if noise is None:
                noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device)
            assert_shape(noise, [x.shape[0], 1, self.resolution, self.resolution])
            noise_term = noise * self.noise_strength
        if self.use_noise and noise_mode == "const":
            noise_term = self.noise_const * self.noise_strength

        flip_weight = self.up == 1  # slightly faster
        x = modulated_conv2d(
            x=x,
            weight=self.weight,
            styles=styles,
            noise=noise_term,
            up=self.up,
            down=self.down,
            padding=self.padding,
            resample_filter=self.resample_filter,
            demodulate=self.demodulate,
            flip_weight=flip_weight,
            fused_modconv=fused_modconv,
        )

        act_gain = self.act_gain * gain
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        x = bias_act(x, self.bias.to(x.dtype), act=self.activation, gain=act_gain, clamp=act_clamp)
        return x
