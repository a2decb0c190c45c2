"""``parity/stylegan2_reference.py`` against the float64 NumPy definitions of ``tests/reference.py``.

The reference is what jdynconv's modulated convolution is held to in ``test_modulated_conv.py`` and
``test_modulated_layer.py``; here it is held to the definitions, written as loops, without any other code:

* ``setup_filter``: the outer product below 8 taps, 1-D from 8, normalised to sum 1.
* ``upfirdn2d``: ``reference.upfirdn`` (zero insertion, pad or crop, a true convolution with the filter times
  ``gain``, every ``down``-th pixel); ``flip_filter`` is the same with the filter flipped.
* ``conv2d_resample`` (its transposed-conv, strided and plain forms, and up and down together) against the
  definition: the alignment padding of its docstring added to ``padding``, ``reference.upfirdn`` up (gain
  ``up ** 2``), ``reference.conv`` (the kernel flipped when not ``flip_weight``), ``reference.upfirdn`` down.
* ``modulated_conv2d``, fused and not, against ``reference.modulated_conv`` plus the noise; its gradients by
  ``torch.autograd.gradcheck`` (finite differences, float64).
* ``FullyConnectedLayer``, ``SynthesisLayer`` and ``ToRGBLayer``: state-dict names and order (those of
  stylegan2-ada-pytorch's checkpoints), initial values, and the forward pass (affine, noise modes, bias,
  activation gain, ``gain``, clamp) against the definitions.

Tolerance ``TOL = 1e-12`` relative to the largest reference value: both sides run in float64 and differ only in
the order of their sums, each of at most a few hundred terms, so by a few hundred ulps (2.2e-16 each) at most.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from parity import stylegan2_reference as sg
from tests import reference

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


def _last(x: np.ndarray) -> np.ndarray:
    """``(B, C, H, W)`` -> ``(B, H, W, C)``, the layout of ``tests/reference.py``."""
    return np.moveaxis(x, 1, -1)


def _first(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, -1, 1)


def _hwio(w: np.ndarray) -> np.ndarray:
    """PyTorch ``(O, I, kh, kw)`` -> ``(kh, kw, I, O)``."""
    return np.transpose(w, (2, 3, 1, 0))


def _taps(f: torch.Tensor | None, flip_filter: bool) -> np.ndarray:
    """The filter ``reference.upfirdn`` convolves with: ``flip_filter`` (a correlation) is the flipped filter."""
    taps = np.ones((1, 1)) if f is None else f.double().numpy()
    return np.flip(taps).copy() if flip_filter else taps


def test_setup_filter() -> None:
    taps = np.array([1.0, 3.0, 3.0, 1.0])
    binomial = sg.setup_filter([1, 3, 3, 1])
    assert binomial.dtype == torch.float32
    np.testing.assert_array_equal(binomial.numpy(), np.outer(taps, taps) / 64)  # exact in float32
    asym = np.array([[1.0, 2.0, 0.0], [4.0, 1.0, 2.0]])
    np.testing.assert_allclose(sg.setup_filter(asym).numpy(), asym / asym.sum(), rtol=1e-7)
    np.testing.assert_array_equal(sg.setup_filter(asym, normalize=False).numpy(), asym)
    eight = np.arange(1.0, 9.0)
    separable = sg.setup_filter(eight)
    assert separable.shape == (8,)
    np.testing.assert_allclose(separable.numpy(), eight / eight.sum(), rtol=1e-7)
    with pytest.raises(ValueError, match="1-D or 2-D"):
        sg.setup_filter(np.ones((2, 2, 2)))


FILTERS = {
    "binomial4": sg.setup_filter([1, 3, 3, 1]),
    "asym3x2": sg.setup_filter([[1.0, 2.0, 0.5], [3.0, 7.0, 1.0]], normalize=False),
    "separable8": sg.setup_filter([1, 2, 3, 4, 5, 6, 7, 8]),
    "none": None,
}
UPFIRDN_CASES = [
    # (filter, up, down, padding (x0, x1, y0, y1), flip_filter, gain)
    ("binomial4", 2, 1, (2, 1, 2, 1), False, 4),
    ("binomial4", 1, 2, (1, 1, 1, 1), False, 1),
    ("asym3x2", 1, 1, (1, 2, 0, 1), False, 1),
    ("asym3x2", 1, 1, (1, 2, 0, 1), True, 2.5),
    ("asym3x2", 2, 1, (3, -1, 0, 2), False, 1),
    ("separable8", 2, 2, (4, 3, 4, 3), False, 4),
    ("separable8", 1, 1, (4, 4, 4, 4), True, 1),
    ("none", 3, 2, (0, -1, 1, 0), False, 1),
]


@pytest.mark.parametrize(
    ("fname", "up", "down", "padding", "flip_filter", "gain"),
    UPFIRDN_CASES,
    ids=[f"{c[0]}-up{c[1]}-down{c[2]}-pad{c[3]}-flip{int(c[4])}-gain{c[5]}" for c in UPFIRDN_CASES],
)
def test_upfirdn2d_is_upsample_pad_convolve_downsample(
    fname: str, up: int, down: int, padding: tuple[int, int, int, int], flip_filter: bool, gain: float
) -> None:
    f = FILTERS[fname]
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 6))
    got = sg.upfirdn2d(torch.from_numpy(x), f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain)
    x0, x1, y0, y1 = padding
    expected = reference.upfirdn(_last(x), _taps(f, flip_filter), up, down, [(y0, y1), (x0, x1)], gain=gain)
    _assert_close64(got, _first(expected))


def _conv2d_resample_definition(
    x: np.ndarray,
    w: np.ndarray,
    f: torch.Tensor,
    up: int,
    down: int,
    padding: tuple[int, int, int, int],
    groups: int,
    flip_weight: bool,
    flip_filter: bool,
) -> np.ndarray:
    taps = _taps(f, flip_filter)
    fh, fw = taps.shape
    x0, x1, y0, y1 = padding
    pads = [[y0, y1], [x0, x1]]
    for axis, n in enumerate((fh, fw)):
        if up > 1:
            pads[axis][0] += (n + up - 1) // 2
            pads[axis][1] += (n - up) // 2
        if down > 1:
            pads[axis][0] += (n - down + 1) // 2
            pads[axis][1] += (n - down) // 2
    y = reference.upfirdn(_last(x), taps if up > 1 else np.ones((1, 1)), up, 1, [tuple(p) for p in pads], up**2)
    kernel = _hwio(w if flip_weight else w[:, :, ::-1, ::-1])
    kernel = np.broadcast_to(kernel, (x.shape[0], *kernel.shape))
    y = reference.conv(y, kernel, None, reference.Geometry.simple(2, groups=groups))
    if down > 1:
        y = reference.upfirdn(y, taps, 1, down, [(0, 0), (0, 0)])
    return _first(y)


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
def test_conv2d_resample_is_the_definition(k: int, updown: tuple[int, int], groups: int, flip_weight: bool) -> None:
    up, down = updown
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 6, 6))
    w = rng.standard_normal((6, 4 // groups, k, k))
    f = FILTERS["asym3x2"]  # asymmetric: a filter or kernel flipped the wrong way, or misaligned, would show
    for padding, flip_filter in [((1, 1, 1, 1), False), ((2, 0, 1, 3), True)]:
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
        expected = _conv2d_resample_definition(x, w, f, up, down, padding, groups, flip_weight, flip_filter)
        _assert_close64(got, expected)


MODCONV_CASES = list(itertools.product([3, 1], [(1, 1), (2, 1), (1, 2)], [True, False], [True, False], [True, False]))


@pytest.mark.parametrize(
    ("k", "updown", "demodulate", "flip_weight", "fused"),
    MODCONV_CASES,
    ids=[f"k{k}-up{u}-down{d}-demod{int(dm)}-flipw{int(fw)}-fused{int(fu)}" for k, (u, d), dm, fw, fu in MODCONV_CASES],
)
def test_modulated_conv2d_is_per_sample_weights(
    k: int, updown: tuple[int, int], demodulate: bool, flip_weight: bool, fused: bool
) -> None:
    up, down = updown
    b, i, o, h = 2, 3, 4, 8
    rng = np.random.default_rng(2)
    x, weight = rng.standard_normal((b, i, h, h)), rng.standard_normal((o, i, k, k))
    styles = rng.standard_normal((b, i)) + 1
    out_size = h * up // down  # padding k // 2: exactly 2x up, 1/2 down
    noise = rng.standard_normal((b, 1, out_size, out_size))
    f = sg.setup_filter([1, 3, 3, 1])
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
    expected = reference.modulated_conv(
        _last(x),
        _hwio(weight),
        styles,
        demodulate=demodulate,
        up=up,
        down=down,
        padding=k // 2,
        taps=f.double().numpy(),
        flip_weight=flip_weight,
    )
    _assert_close64(got, _first(expected) + noise)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("updown", [(2, 1), (1, 2)])
def test_modulated_conv2d_gradients_are_finite_differences(updown: tuple[int, int], fused: bool) -> None:
    up, down = updown
    rng = np.random.default_rng(3)
    tensors = [
        torch.tensor(rng.standard_normal(shape), requires_grad=True) for shape in [(2, 2, 4, 4), (3, 2, 3, 3), (2, 2)]
    ]
    f = sg.setup_filter([1, 3, 3, 1])

    def fn(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
        return sg.modulated_conv2d(
            x, weight, styles, up=up, down=down, padding=1, resample_filter=f, flip_weight=up == 1, fused_modconv=fused
        )

    assert torch.autograd.gradcheck(fn, tuple(tensors))


def test_fully_connected_layer() -> None:
    torch.manual_seed(0)
    layer = sg.FullyConnectedLayer(5, 3, activation="lrelu", lr_multiplier=0.01, bias_init=0.5).double()
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
    assert layer.weight_gain == pytest.approx(0.01 / math.sqrt(5))
    assert layer.bias_gain == 0.01
    assert layer.lr_multiplier == 0.01
    assert layer.activation == "lrelu"
    assert layer.bias.tolist() == [0.5] * 3
    with torch.no_grad():
        layer.bias.add_(torch.randn(3, dtype=torch.float64))
    x = np.random.default_rng(4).standard_normal((4, 5))
    pre = x @ (layer.weight.detach().numpy() * 0.01 / math.sqrt(5)).T + layer.bias.detach().numpy() * 0.01
    _assert_close64(layer(torch.from_numpy(x)), reference.leaky_relu(pre, 0.2) * math.sqrt(2))
    assert sg.FullyConnectedLayer(5, 3, bias=False).bias is None


def _synthesis_definition(
    layer: sg.SynthesisLayer, x: np.ndarray, w: np.ndarray, noise: np.ndarray | None, gain: float
) -> np.ndarray:
    """The layer by its definition in float64: affine (equalised lr), modulated conv, noise, bias, lrelu, gains,
    clamp."""
    params = {name: value.detach().double().numpy() for name, value in layer.state_dict().items()}
    styles = w @ (params["affine.weight"] / math.sqrt(w.shape[1])).T + params["affine.bias"]
    out = reference.modulated_conv(
        _last(x),
        _hwio(params["weight"]),
        styles,
        demodulate=True,
        up=layer.up,
        down=1,
        padding=layer.padding,
        taps=params["resample_filter"],
        flip_weight=layer.up == 1,
    )
    out = _first(out)
    if noise is not None:
        out = out + noise * params["noise_strength"]
    out = reference.leaky_relu(out + params["bias"][None, :, None, None], 0.2) * math.sqrt(2) * gain
    return out if layer.conv_clamp is None else np.clip(out, -layer.conv_clamp * gain, layer.conv_clamp * gain)


def test_synthesis_layer_names_and_initial_values() -> None:
    torch.manual_seed(0)
    layer = sg.SynthesisLayer(3, 4, 5, resolution=8, up=2, conv_clamp=0.5)
    names = ["weight", "noise_strength", "bias", "resample_filter", "noise_const", "affine.weight", "affine.bias"]
    assert list(layer.state_dict()) == names
    assert layer.state_dict()["resample_filter"].shape == (4, 4)
    assert layer.noise_const.shape == (8, 8)
    assert (layer.resolution, layer.up, layer.use_noise, layer.activation) == (8, 2, True, "lrelu")
    assert (layer.conv_clamp, layer.padding) == (0.5, 1)
    assert layer.act_gain == pytest.approx(math.sqrt(2))
    assert layer.affine.bias.tolist() == [1.0, 1.0, 1.0]  # the affine's bias starts at 1
    assert layer.affine.weight_gain == pytest.approx(1 / math.sqrt(5))
    assert layer.bias.tolist() == [0.0] * 4
    assert layer.noise_strength.item() == 0.0
    quiet = sg.SynthesisLayer(3, 4, 5, resolution=8, kernel_size=1, use_noise=False, channels_last=True)
    assert list(quiet.state_dict()) == ["weight", "bias", "resample_filter", "affine.weight", "affine.bias"]
    assert quiet.padding == 0
    assert quiet.weight.is_contiguous(memory_format=torch.channels_last)
    rgb = sg.ToRGBLayer(3, 4, 5, kernel_size=1)
    assert list(rgb.state_dict()) == ["weight", "bias", "affine.weight", "affine.bias"]
    assert rgb.weight_gain == pytest.approx(1 / math.sqrt(3))
    assert rgb.conv_clamp is None


@pytest.mark.parametrize(("up", "conv_clamp", "gain"), [(1, None, 1.0), (2, 0.5, 1.0), (2, 0.5, 0.7), (1, 2.0, 2.0)])
@pytest.mark.parametrize("fused", [True, False])
def test_synthesis_layer_is_the_definition(up: int, conv_clamp: float | None, gain: float, fused: bool) -> None:
    torch.manual_seed(0)
    layer = sg.SynthesisLayer(3, 4, 5, resolution=8, up=up, conv_clamp=conv_clamp).double()
    with torch.no_grad():
        for value in layer.parameters():
            value.add_(0.3 * torch.randn_like(value))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 8 // up, 8 // up))
    w = rng.standard_normal((2, 5))
    noise = rng.standard_normal((2, 1, 8, 8))
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    with torch.no_grad():
        given = layer(tx, tw, fused_modconv=fused, gain=gain, noise=torch.from_numpy(noise))
        const = layer(tx, tw, noise_mode="const", fused_modconv=fused, gain=gain)
        none = layer(tx, tw, noise_mode="none", fused_modconv=fused, gain=gain)
    _assert_close64(given, _synthesis_definition(layer, x, w, noise, gain))
    _assert_close64(const, _synthesis_definition(layer, x, w, layer.noise_const.numpy()[None, None], gain))
    _assert_close64(none, _synthesis_definition(layer, x, w, None, gain))
    if conv_clamp is not None:
        assert given.abs().max() <= conv_clamp * gain
        assert given.abs().max() == pytest.approx(conv_clamp * gain)  # the clamp is reached: it was tested


def test_synthesis_layer_random_noise() -> None:
    """``noise_mode="random"`` draws ``torch.randn([B, 1, resolution, resolution])``: the same draw given as
    ``noise`` gives the same output; each call draws anew."""
    torch.manual_seed(0)
    layer = sg.SynthesisLayer(3, 4, 5, resolution=8)
    with torch.no_grad():
        layer.noise_strength.fill_(0.7)
    x, w = torch.randn([2, 3, 8, 8]), torch.randn([2, 5])
    with torch.no_grad():
        torch.manual_seed(1)
        drawn = layer(x, w)
        again = layer(x, w)
        torch.manual_seed(1)
        given = layer(x, w, noise=torch.randn([2, 1, 8, 8]))
    assert torch.equal(drawn, given)
    assert not torch.equal(drawn, again)
    with pytest.raises(ValueError, match="noise_mode='random'"):
        layer(x, w, noise_mode="const", noise=torch.randn([2, 1, 8, 8]))
    with pytest.raises(ValueError, match="noise_mode"):
        layer(x, w, noise_mode="fixed")
    with pytest.raises(ValueError, match=r"\(B, 3, 8, 8\)"):
        layer(x[:, :, :4, :4], w)


@pytest.mark.parametrize("fused", [True, False])
def test_to_rgb_layer_is_the_definition(fused: bool) -> None:
    torch.manual_seed(0)
    layer = sg.ToRGBLayer(3, 4, 5, conv_clamp=0.9).double()
    with torch.no_grad():
        for value in layer.parameters():
            value.add_(0.3 * torch.randn_like(value))
    rng = np.random.default_rng(6)
    x, w = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((2, 5))
    with torch.no_grad():
        got = layer(torch.from_numpy(x), torch.from_numpy(w), fused_modconv=fused)
    params = {name: value.numpy() for name, value in layer.state_dict().items()}
    styles = (w @ (params["affine.weight"] / math.sqrt(5)).T + params["affine.bias"]) / math.sqrt(3)
    out = reference.modulated_conv(
        _last(x), _hwio(params["weight"]), styles, demodulate=False, up=1, down=1, padding=0, taps=np.ones(1),
        flip_weight=True,
    )  # fmt: skip
    expected = np.clip(_first(out) + params["bias"][None, :, None, None], -0.9, 0.9)
    _assert_close64(got, expected)
    assert got.abs().max() == pytest.approx(0.9)
