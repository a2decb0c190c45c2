"""Ties ``parity/dcnv3_reference.py`` (InternImage's DCNv3, pure-PyTorch path) to DCNv3's definition, in float64.

``parity/check_against_internimage.py`` holds the reference to InternImage's own code (not run in CI: it needs a
checkout); these tests hold it to the definition written independently with NumPy loops:

* ``dcnv3_core_pytorch`` with fixed offsets and masks: for output ``(y, x)``, group ``g`` and tap ``p``, the
  offset channels are ``(g * P + p) * 2 + {0: x, 1: y}`` and the taps run x-major (``p = j_x * k_h + i_y``, the
  centre left out by ``remove_center``); the tap samples the zero-extended input bilinearly at
  ``col = x * stride + c + s * (j_x * dilation - c + off_x) - pad`` (rows likewise), ``c = dilation (k - 1) // 2``,
  ``s = offset_scale``, and the output is the mask-weighted sum over taps.
* ``DCNv3_pytorch`` with its zero-initialised offset layer and ``offset_scale`` 1 samples the regular grid: a gather
  of ``x = input_proj(input)`` at ``(y + i dilation - pad, x + j dilation - pad)`` (zero outside), weighted by
  ``softmax`` over each group's taps of ``mask(dw_conv(input))``, mixed with ``x`` by ``center_feature_scale``,
  then ``output_proj``.

The reference builds its regular grid in float32 (as the original does); with padded sizes that are powers of 2
and ``offset_scale`` 0.5 or 1 that grid is exact, so those cases compare at 1e-12. One case with padded sizes 7 x 9
compares at 1e-5: the float32 grid points ``(c + 0.5 + i) / 7`` round, up to ~1e-6 pixel off (measured: 1.6e-6 on
outputs of magnitude 4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .dcnv3_reference import DCNv3_pytorch, dcnv3_core_pytorch


def _bilinear(image: np.ndarray, row: float, col: float) -> np.ndarray:
    """``image`` (H, W, C) sampled at pixel ``(row, col)`` (pixel centres at integers), zero outside the image."""
    height, width, _ = image.shape
    r0, c0 = int(np.floor(row)), int(np.floor(col))
    total = np.zeros(image.shape[-1])
    for r, wr in ((r0, 1 - (row - r0)), (r0 + 1, row - r0)):
        for c, wc in ((c0, 1 - (col - c0)), (c0 + 1, col - c0)):
            if 0 <= r < height and 0 <= c < width:
                total += wr * wc * image[r, c]
    return total


def _taps(kernel: int, remove_center: bool) -> list[tuple[int, int]]:
    """``(j_x, i_y)`` per tap, in the channel order of the offset and mask layers: x-major."""
    taps = [(j, i) for j in range(kernel) for i in range(kernel)]
    if remove_center:
        taps.remove((kernel // 2, kernel // 2))
    return taps


def _definition(
    x: np.ndarray, offset: np.ndarray, mask: np.ndarray, kernel: int, stride: int, pad: int, dilation: int,
    group: int, offset_scale: float, remove_center: bool,
) -> np.ndarray:  # fmt: skip
    n, height, width, channels = x.shape
    gc = channels // group
    h_out = (height + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    w_out = (width + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    taps = _taps(kernel, remove_center)
    c = dilation * (kernel - 1) // 2
    out = np.zeros((n, h_out, w_out, channels))
    for b, y, xo, g in np.ndindex(n, h_out, w_out, group):
        for p, (j, i) in enumerate(taps):
            q = g * len(taps) + p
            col = xo * stride + c + offset_scale * (j * dilation - c + offset[b, y, xo, 2 * q]) - pad
            row = y * stride + c + offset_scale * (i * dilation - c + offset[b, y, xo, 2 * q + 1]) - pad
            value = _bilinear(x[b, :, :, g * gc : (g + 1) * gc], row, col)
            out[b, y, xo, g * gc : (g + 1) * gc] += mask[b, y, xo, q] * value
    return out


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "pad", "dilation", "group", "offset_scale", "remove_center", "tol"),
    [
        ((6, 6), 3, 1, 1, 1, 2, 1.0, False, 1e-12),  # padded 8 x 8
        ((14, 6), 5, 2, 1, 1, 2, 0.5, True, 1e-12),  # padded 16 x 8; (16 - 5) / 2 leaves a row unreached
        ((5, 7), 3, 1, 1, 2, 1, 1.0, False, 1e-5),  # padded 7 x 9: the float32 grid rounds
    ],
)
def test_core_matches_definition(
    size: tuple[int, int], kernel: int, stride: int, pad: int, dilation: int, group: int, offset_scale: float,
    remove_center: bool, tol: float,
) -> None:  # fmt: skip
    rng = np.random.default_rng(0)
    gc, n = 3, 2
    h_out, w_out = ((s + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1 for s in size)
    taps = kernel * kernel - remove_center
    x = rng.standard_normal((n, *size, group * gc))
    offset = 1.5 * rng.standard_normal((n, h_out, w_out, group * taps * 2))  # off the grid and off the image
    mask = rng.standard_normal((n, h_out, w_out, group * taps))
    got = dcnv3_core_pytorch(
        torch.from_numpy(x), torch.from_numpy(offset), torch.from_numpy(mask), kernel, kernel, stride, stride,
        pad, pad, dilation, dilation, group, gc, offset_scale, int(remove_center),
    ).numpy()  # fmt: skip
    want = _definition(x, offset, mask, kernel, stride, pad, dilation, group, offset_scale, remove_center)
    assert got.shape == want.shape == (n, h_out, w_out, group * gc)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize(
    ("kernel", "pad", "dilation", "center_feature_scale", "remove_center"),
    [(3, 1, 1, False, False), (3, 2, 2, True, True), (5, 2, 1, True, False)],
)
def test_module_zero_offsets_sample_the_regular_grid(
    kernel: int, pad: int, dilation: int, center_feature_scale: bool, remove_center: bool
) -> None:
    torch.manual_seed(0)
    # padded 8 x 16: the reference's float32 grid is exact (see the module docstring), so 1e-12 holds
    channels, group, n, height, width = 8, 2, 2, 8 - 2 * pad, 16 - 2 * pad
    module = DCNv3_pytorch(
        channels, kernel, pad=pad, dilation=dilation, group=group, center_feature_scale=center_feature_scale,
        remove_center=remove_center,
    ).double()  # fmt: skip
    assert not module.offset.weight.any()  # the original's zero init
    assert not module.offset.bias.any()
    with torch.no_grad():  # non-uniform masks and a non-trivial centre-feature scale
        for param in (module.mask.weight, module.mask.bias, *module.dw_conv.parameters()):
            param.normal_()
        if center_feature_scale:
            module.center_feature_scale_proj_weight.normal_()
            module.center_feature_scale_proj_bias.normal_()
    inp = torch.randn(n, height, width, channels, dtype=torch.float64)
    with torch.no_grad():
        got = module(inp).numpy()
        x = module.input_proj(inp).numpy()
        x1 = module.dw_conv(inp.permute(0, 3, 1, 2))  # (N, H, W, C): the conv, then LN and GELU channels-last
        logits = module.mask(x1).numpy()
        scale = None
        if center_feature_scale:
            w, bias = module.center_feature_scale_proj_weight, module.center_feature_scale_proj_bias
            scale = torch.sigmoid(x1 @ w.T + bias).numpy()  # (N, H, W, group)

    taps = _taps(kernel, remove_center)
    logits = logits.reshape(n, height, width, group, len(taps))  # softmax over each group's taps
    mask = np.exp(logits - logits.max(-1, keepdims=True))
    mask /= mask.sum(-1, keepdims=True)
    gc = channels // group
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    sampled = np.zeros_like(x)
    for b, y, xo, g in np.ndindex(n, height, width, group):
        for p, (j, i) in enumerate(taps):  # pixel (y + i d - pad, x + j d - pad) of x, i.e. (y + i d, x + j d) padded
            sampled[b, y, xo, g * gc : (g + 1) * gc] += (
                mask[b, y, xo, g, p] * padded[b, y + i * dilation, xo + j * dilation, g * gc : (g + 1) * gc]
            )
    if scale is not None:
        scale = np.repeat(scale, gc, axis=-1)  # (N, H, W, group) -> (N, H, W, C), group-major
        sampled = sampled * (1 - scale) + x * scale
    want = sampled @ module.output_proj.weight.detach().numpy().T + module.output_proj.bias.detach().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * max(1.0, np.abs(want).max()))


def test_state_dict_keys_are_internimages() -> None:
    """The names ``jdynconv.interop`` maps: the original's, in its order (a module's own parameters first)."""
    linears = ["offset.weight", "offset.bias", "mask.weight", "mask.bias"]
    linears += ["input_proj.weight", "input_proj.bias", "output_proj.weight", "output_proj.bias"]
    ln = DCNv3_pytorch(16, group=4, center_feature_scale=True)
    ln_keys = ["center_feature_scale_proj_weight", "center_feature_scale_proj_bias", "dw_conv.0.weight"]
    ln_keys += ["dw_conv.0.bias", "dw_conv.1.1.weight", "dw_conv.1.1.bias", *linears]  # 1.0 is to_channels_last
    assert list(ln.state_dict()) == ln_keys
    bn = DCNv3_pytorch(16, kernel_size=5, group=2, norm_layer="BN", remove_center=True)
    bn_keys = ["dw_conv.0.weight", "dw_conv.0.bias"]  # 1.1 is to_channels_last
    bn_keys += [f"dw_conv.1.0.{name}" for name in ("weight", "bias", "running_mean", "running_var")]
    assert list(bn.state_dict()) == [*bn_keys, "dw_conv.1.0.num_batches_tracked", *linears]
    assert bn.offset.out_features == 2 * 2 * 24  # group * (k * k - 1) * 2
    assert bn.mask.out_features == 2 * 24
