"""``parity/nvidia/stylegan2.py`` against definitions written independently here in float64 NumPy.

The reference is a line-by-line re-write of NVIDIA's StyleGAN2-ADA ops; its equality with NVIDIA's own
code was checked outside this repository (NVIDIA's code is not vendored). What is checked here, without it:

* ``setup_filter``: normalise, outer product, flip and gain, as documented.
* ``upfirdn2d`` against "insert ``up - 1`` zeros after each pixel, pad or crop ``[x0, x1, y0, y1]``, convolve
  (a true convolution, the filter flipped, unless ``flip_filter``) with ``f * gain`` over the valid
  positions, keep every ``down``-th pixel", by explicit loops over the taps.
* ``conv2d_resample`` (every fast path: 1x1 with down, 1x1 with up, strided, transposed, plain, fallback)
  against one definition: its padding rule (``[(fw+up-1)//2, (fw-up)//2]`` if ``up > 1``, ``[(fw-down+1)//2,
  (fw-down)//2]`` if ``down > 1``, added to ``padding``), ``upfirdn2d`` up with ``gain = up**2``, a valid
  correlation with the weight (flipped when ``flip_weight=False``), then ``upfirdn2d`` down.
* ``modulated_conv2d``, fused and not, against per-sample weights ``weight * style``, demodulated by
  ``rsqrt(sum w^2 + 1e-8)`` over ``(I, kh, kw)``, then the noise; and the output sizes ``2H`` (up 2) and
  ``H / 2`` (down 2) with ``padding = k // 2``.
* ``ModulatedConvLayer``: the originals' state-dict names, the noise modes and the explicit noise input.

All in float64, compared at ``1e-12`` relative to the largest reference value.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from parity.nvidia import stylegan2 as sg

TOL = 1e-12


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """PyTorch on one thread, as ``test_kernel_mix.py``: at these tiny shapes intra-op threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_close64(actual: torch.Tensor, expected: np.ndarray) -> None:
    got = actual.detach().numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL * max(1.0, float(np.abs(expected).max(initial=0))))


def _np_upfirdn2d(
    x: np.ndarray,
    f: np.ndarray | None,
    up: tuple[int, int] = (1, 1),
    down: tuple[int, int] = (1, 1),
    pad: tuple[int, int, int, int] = (0, 0, 0, 0),
    flip_filter: bool = False,
    gain: float = 1.0,
) -> np.ndarray:
    """``(B, C, H, W)``; ``up``/``down`` as ``(x, y)``; ``pad`` as ``(x0, x1, y0, y1)``; 1-D ``f`` is separable."""
    f2 = np.ones((1, 1)) if f is None else (np.outer(f, f) if f.ndim == 1 else np.asarray(f, np.float64))
    f2 = f2 * gain
    upx, upy = up
    b, c, h, w = x.shape
    u = np.zeros((b, c, h * upy, w * upx))
    u[:, :, ::upy, ::upx] = x
    x0, x1, y0, y1 = pad
    u = np.pad(u, ((0, 0), (0, 0), (max(y0, 0), max(y1, 0)), (max(x0, 0), max(x1, 0))))
    u = u[:, :, max(-y0, 0) : u.shape[2] - max(-y1, 0), max(-x0, 0) : u.shape[3] - max(-x1, 0)]
    taps = f2 if flip_filter else f2[::-1, ::-1]  # a convolution reads the filter backwards
    fh, fw = taps.shape
    oh, ow = u.shape[2] - fh + 1, u.shape[3] - fw + 1
    out = np.zeros((b, c, oh, ow))
    for i, j in itertools.product(range(fh), range(fw)):
        out += u[:, :, i : i + oh, j : j + ow] * taps[i, j]
    return out[:, :, :: down[1], :: down[0]]


def _np_correlate(x: np.ndarray, w: np.ndarray, groups: int = 1) -> np.ndarray:
    """Valid cross-correlation, ``x (B, I, H, W)``, ``w (O, I // groups, kh, kw)``."""
    o, ipg, kh, kw = w.shape
    oh, ow = x.shape[2] - kh + 1, x.shape[3] - kw + 1
    out = np.zeros((x.shape[0], o, oh, ow))
    opg = o // groups
    for g, i, j in itertools.product(range(groups), range(kh), range(kw)):
        patch = x[:, g * ipg : (g + 1) * ipg, i : i + oh, j : j + ow]
        out[:, g * opg : (g + 1) * opg] += np.einsum("bihw,oi->bohw", patch, w[g * opg : (g + 1) * opg, :, i, j])
    return out


def _np_conv2d_resample(
    x: np.ndarray,
    w: np.ndarray,
    f: np.ndarray | None,
    up: int,
    down: int,
    padding: tuple[int, int, int, int],
    groups: int = 1,
    flip_weight: bool = True,
    flip_filter: bool = False,
) -> np.ndarray:
    fh, fw = (1, 1) if f is None else (f.shape[0], f.shape[-1])
    x0, x1, y0, y1 = padding
    if up > 1:
        x0, x1, y0, y1 = x0 + (fw + up - 1) // 2, x1 + (fw - up) // 2, y0 + (fh + up - 1) // 2, y1 + (fh - up) // 2
    if down > 1:
        x0, x1 = x0 + (fw - down + 1) // 2, x1 + (fw - down) // 2
        y0, y1 = y0 + (fh - down + 1) // 2, y1 + (fh - down) // 2
    y = _np_upfirdn2d(x, f if up > 1 else None, (up, up), (1, 1), (x0, x1, y0, y1), flip_filter, float(up**2))
    y = _np_correlate(y, w if flip_weight else w[:, :, ::-1, ::-1], groups)
    if down > 1:
        y = _np_upfirdn2d(y, f, (1, 1), (down, down), (0, 0, 0, 0), flip_filter)
    return y


def _filter_np(f: torch.Tensor) -> np.ndarray:
    return f.double().numpy()


def test_setup_filter() -> None:
    taps = np.array([1.0, 3.0, 3.0, 1.0])
    np.testing.assert_allclose(sg.setup_filter([1, 3, 3, 1]).numpy(), np.outer(taps, taps) / 64, rtol=1e-7)
    asym = np.array([[1.0, 2.0, 0.0], [4.0, 1.0, 2.0]])
    got = sg.setup_filter(asym.copy(), flip_filter=True, gain=3).numpy()
    np.testing.assert_allclose(got, asym[::-1, ::-1] / asym.sum() * 3, rtol=1e-6)
    eight = np.arange(1.0, 9.0)
    sep = sg.setup_filter(eight, gain=4)  # >= 8 taps: separable, gain ** (1 / 2) per axis
    assert sep.shape == (8,)
    np.testing.assert_allclose(sep.numpy(), eight / eight.sum() * 2, rtol=1e-6)
    assert sg.setup_filter(None).tolist() == [[1.0]]


FILTERS = {
    "binomial4": sg.setup_filter([1, 3, 3, 1]),
    "asym3x2": sg.setup_filter([[1.0, 2.0, 0.5], [3.0, 7.0, 1.0]], normalize=False),
    "separable8": sg.setup_filter([1, 2, 3, 4, 5, 6, 7, 8]),
    "none": None,
}
UPFIRDN_CASES = [
    # (filter, up, down, padding, flip_filter, gain)
    ("binomial4", 2, 1, [2, 1, 2, 1], False, 4),
    ("binomial4", 1, 2, [1, 1, 1, 1], False, 1),
    ("asym3x2", 1, 1, [1, 2, 0, 1], False, 1),
    ("asym3x2", 1, 1, [1, 2, 0, 1], True, 2.5),
    ("asym3x2", [2, 3], [1, 2], [3, -1, 0, 2], False, 1),
    ("separable8", 2, 2, [4, 3, 4, 3], False, 4),
    ("separable8", 1, 1, 4, True, 1),
    ("none", 3, 2, [0, -1, 1, 0], False, 1),
]


@pytest.mark.parametrize(
    ("fname", "up", "down", "padding", "flip_filter", "gain"),
    UPFIRDN_CASES,
    ids=[f"{c[0]}-up{c[1]}-down{c[2]}-pad{c[3]}-flip{int(c[4])}-gain{c[5]}" for c in UPFIRDN_CASES],
)
def test_upfirdn2d_is_upsample_pad_convolve_downsample(
    fname: str, up: int | list[int], down: int | list[int], padding: int | list[int], flip_filter: bool, gain: float
) -> None:
    f = FILTERS[fname]
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 6))
    got = sg.upfirdn2d(torch.from_numpy(x), f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain)
    pad = sg._parse_padding(padding)
    expected = _np_upfirdn2d(
        x, None if f is None else _filter_np(f), sg._parse_scaling(up), sg._parse_scaling(down), pad, flip_filter, gain
    )
    _assert_close64(got, expected)


RESAMPLE_CASES = list(
    itertools.product(
        [3, 1, 2],  # kernel
        [(1, 1), (2, 1), (1, 2), (2, 2)],  # (up, down)
        [1, 2],  # groups
        [True, False],  # flip_weight
    )
)


@pytest.mark.parametrize(
    ("k", "updown", "groups", "flip_weight"),
    RESAMPLE_CASES,
    ids=[f"k{k}-up{u}-down{d}-g{g}-flipw{int(fw)}" for k, (u, d), g, fw in RESAMPLE_CASES],
)
def test_conv2d_resample_every_path_is_the_definition(
    k: int, updown: tuple[int, int], groups: int, flip_weight: bool
) -> None:
    up, down = updown
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 6, 6))
    w = rng.standard_normal((6, 4 // groups, k, k))
    f = FILTERS["asym3x2"]  # asymmetric: a filter flipped the wrong way would show
    for padding, flip_filter in [([1, 1, 1, 1], False), ([2, 0, 1, 3], True)]:
        got = sg.conv2d_resample(
            torch.from_numpy(x),
            torch.from_numpy(w),
            f=f,
            up=up,
            down=down,
            padding=padding,
            groups=groups,
            flip_weight=flip_weight,
            flip_filter=flip_filter,
        )
        expected = _np_conv2d_resample(x, w, _filter_np(f), up, down, tuple(padding), groups, flip_weight, flip_filter)
        _assert_close64(got, expected)


MODCONV_CASES = list(itertools.product([3, 1], [(1, 1), (2, 1), (1, 2)], [True, False], [True, False]))


@pytest.mark.parametrize(
    ("k", "updown", "demodulate", "fused"),
    MODCONV_CASES,
    ids=[f"k{k}-up{u}-down{d}-demod{int(dm)}-fused{int(fu)}" for k, (u, d), dm, fu in MODCONV_CASES],
)
def test_modulated_conv2d_is_per_sample_weights(k: int, updown: tuple[int, int], demodulate: bool, fused: bool) -> None:
    up, down = updown
    b, i, o, h = 2, 3, 4, 8
    rng = np.random.default_rng(2)
    x, weight = rng.standard_normal((b, i, h, h)), rng.standard_normal((o, i, k, k))
    styles = rng.standard_normal((b, i)) + 1
    out_size = h * up // down
    noise = rng.standard_normal((b, 1, out_size, out_size))
    f = sg.setup_filter([1, 3, 3, 1])
    flip_weight = up == 1  # as SynthesisLayer
    got = sg.modulated_conv2d(
        torch.from_numpy(x),
        torch.from_numpy(weight),
        torch.from_numpy(styles),
        noise=torch.from_numpy(noise),
        up=up,
        down=down,
        padding=k // 2,
        resample_filter=f,
        demodulate=demodulate,
        flip_weight=flip_weight,
        fused_modconv=fused,
    )
    assert got.shape == (b, o, out_size, out_size)
    expected = np.empty_like(got.detach().numpy())
    for n in range(b):
        wn = weight * styles[n][None, :, None, None]
        if demodulate:
            wn = wn / np.sqrt((wn**2).sum(axis=(1, 2, 3), keepdims=True) + 1e-8)
        pad = (k // 2,) * 4
        expected[n] = _np_conv2d_resample(x[n : n + 1], wn, _filter_np(f), up, down, pad, flip_weight=flip_weight)[0]
    _assert_close64(got, expected + noise)


def test_modulated_conv_layer_state_dict_and_noise() -> None:
    torch.manual_seed(0)
    layer = sg.ModulatedConvLayer(3, 4, 5, resolution=8, up=2, conv_clamp=0.5)
    for param in layer.parameters():  # not layer.double(): upfirdn2d takes only the float32 filter buffer
        param.data = param.data.double()
    layer.noise_const = layer.noise_const.double()
    names = {"affine.weight", "affine.bias", "weight", "bias", "noise_strength", "noise_const", "resample_filter"}
    assert set(layer.state_dict()) == names
    rgb = sg.ModulatedConvLayer(
        3, 4, 5, kernel_size=1, use_noise=False, activation="linear", resample_filter=None, demodulate=False
    )
    assert set(rgb.state_dict()) == {"affine.weight", "affine.bias", "weight", "bias"}
    assert layer.affine.bias.tolist() == [1.0, 1.0, 1.0]  # bias_init = 1
    assert layer.act_gain == pytest.approx(np.sqrt(2))

    rng = torch.Generator().manual_seed(1)
    x = torch.randn([2, 3, 4, 4], generator=rng, dtype=torch.float64)
    w = torch.randn([2, 5], generator=rng, dtype=torch.float64)
    noise = torch.randn([2, 1, 8, 8], generator=rng, dtype=torch.float64)
    with torch.no_grad():
        layer.noise_strength.fill_(0.0)
        quiet = layer(x, w, noise_mode="none")
        assert torch.equal(layer(x, w, noise=noise), quiet)  # strength 0: no noise
        layer.noise_strength.fill_(0.7)
        loud = layer(x, w, noise=noise)
        const = layer(x, w, noise_mode="const")
        assert quiet.abs().max() <= 0.5  # conv_clamp
        assert not torch.equal(loud, quiet)
        assert not torch.equal(const, quiet)
        # 'random' with the noise given: the same noise scaled by noise_strength, added before bias and lrelu.
        styles = layer.affine(w)
        pre = sg.modulated_conv2d(
            x, layer.weight, styles, up=2, padding=1, resample_filter=layer.resample_filter, flip_weight=False
        )
        expected = sg.bias_act(pre + 0.7 * noise, layer.bias, act="lrelu", gain=np.sqrt(2), clamp=0.5)
        _assert_close64(loud, expected.numpy())
    with pytest.raises(ValueError, match="noise_mode='random'"):
        layer(x, w, noise_mode="const", noise=noise)
