"""jdynconv.modulated_conv and its FIR resampling against float64 NumPy definitions (NVIDIA's generic
``conv2d_resample`` path: up-sample, pad, filter, valid conv, filter, down-sample)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jdynconv as jdc
from jdynconv import _resample
from tests import reference
from tests.helpers import F32_RTOL, assert_close

STYLEGAN_FILTER = np.array([1, 3, 3, 1], np.float64) / 8
# An asymmetric, odd-length filter: a flip or an off-by-one in the padding shows.
ASYMMETRIC_FILTER = np.array([1, 2, 4], np.float64) / 7


def _arrays(num_spatial: int, kernel_size: int, size: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    batch, in_channels, out_channels = 2, 3, 4
    x = rng.normal(size=(batch, *(size,) * num_spatial, in_channels)).astype(np.float32)
    kernel = rng.normal(size=(*(kernel_size,) * num_spatial, in_channels, out_channels)).astype(np.float32)
    styles = rng.normal(size=(batch, in_channels)).astype(np.float32)
    return x, kernel, styles


@pytest.mark.parametrize(
    ("num_spatial", "up", "down", "taps"),
    [
        (1, 2, 1, ASYMMETRIC_FILTER),
        (1, 1, 2, ASYMMETRIC_FILTER),
        (2, 2, 1, STYLEGAN_FILTER),
        (2, 1, 3, ASYMMETRIC_FILTER),
        (3, 2, 1, STYLEGAN_FILTER),
        (2, 1, 1, np.outer(ASYMMETRIC_FILTER, STYLEGAN_FILTER)),
    ],
)
def test_upfirdn_matches_definition(num_spatial, up, down, taps) -> None:
    x = np.random.default_rng(1).normal(size=(2, *(5,) * num_spatial, 3)).astype(np.float32)
    pads = [(2, -1), (1, 3), (0, 0)][:num_spatial]
    gain = float(up**num_spatial)
    for flip_filter in (False, True):
        out = _resample.upfirdn(
            jnp.asarray(x), taps.astype(np.float32), up=up, down=down, padding=pads, gain=gain, flip_filter=flip_filter
        )
        filter_as_convolved = taps if not flip_filter else taps[(slice(None, None, -1),) * taps.ndim]
        assert_close(out, reference.upfirdn(x, filter_as_convolved, up, down, pads, gain=gain), F32_RTOL)


# (spatial dims, kernel size, up, down, demodulate, flip_weight, padding): NVIDIA's two kernel orientations,
# each with its usual padding (kernel_size // 2 with flip_weight True, 0 with False).
CASES = [
    (2, 3, 1, 1, True, True, 1),
    (2, 3, 2, 1, False, False, 0),
    (2, 3, 1, 2, True, True, 1),
    (2, 1, 2, 1, True, False, 0),
    (2, 1, 1, 2, False, True, 0),
    (1, 3, 2, 1, True, False, 0),
    (3, 3, 1, 2, True, True, 1),
    (2, 3, 2, 1, True, True, 1),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_both_paths_match_the_definition(case) -> None:
    num_spatial, kernel_size, up, down, demodulate, flip_weight, padding = case
    x, kernel, styles = _arrays(num_spatial, kernel_size)
    taps = ASYMMETRIC_FILTER if num_spatial != 3 else STYLEGAN_FILTER
    expected = reference.modulated_conv(
        x,
        kernel,
        styles,
        demodulate=demodulate,
        up=up,
        down=down,
        padding=padding,
        taps=taps,
        flip_weight=flip_weight,
    )
    for fused in (True, False):
        out = jax.jit(
            lambda x, k, s, fused=fused: jdc.modulated_conv(
                x,
                k,
                s,
                demodulate=demodulate,
                up=up,
                down=down,
                padding=padding,
                resample_filter=taps * 7,  # normalised to sum 1 inside, as NVIDIA's setup_filter
                flip_weight=flip_weight,
                fused=fused,
            )
        )(x, kernel, styles)
        assert_close(out, expected, F32_RTOL, f"fused={fused} flip_weight={flip_weight}")


@pytest.mark.parametrize("up_down", [(1, 1), (2, 1), (1, 2)])
def test_gradients_match_finite_differences(up_down) -> None:
    """float64 derivatives of both paths against central differences, w.r.t. inputs, kernel and styles."""
    up, down = up_down
    with jax.enable_x64(True):
        x, kernel, styles = (jnp.asarray(a, jnp.float64) for a in _arrays(2, 3, size=5))
        for fused in (True, False):

            def f(x, k, s, fused=fused):
                return jdc.modulated_conv(x, k, s, up=up, down=down, padding=1, fused=fused)

            check_grads(jax.jit(f), (x, kernel, styles), order=1, modes=("rev",), eps=1e-4)


def test_channels_first_takes_pytorch_layouts_and_noise() -> None:
    x, kernel, styles = _arrays(2, 3)
    noise = np.random.default_rng(3).normal(size=(2, 12, 12, 1)).astype(np.float32)
    expected = jdc.modulated_conv(x, kernel, styles, up=2, padding=1, noise=noise)
    out = jdc.modulated_conv(
        np.moveaxis(x, -1, 1),
        np.transpose(kernel, (3, 2, 0, 1)),  # (O, I, kh, kw)
        styles,
        up=2,
        padding=1,
        noise=np.moveaxis(noise, -1, 1),
        data_format="channels_first",
    )
    assert_close(np.moveaxis(np.asarray(out), 1, -1), expected, F32_RTOL)
    plain = jdc.modulated_conv(x, kernel, styles, up=2, padding=1)
    assert_close(np.asarray(expected) - np.asarray(plain), np.broadcast_to(noise, plain.shape), F32_RTOL)


def test_half_precision_pre_normalisation_keeps_the_non_fused_path_finite() -> None:
    """float16 with demodulation scales kernel and styles before modulating (NVIDIA's overflow guard): with
    styles of 1e5 the non-fused path's scaled activations (3 channels times 1e5 times ~3 kernel magnitude
    summed over 27 taps) would pass float16's 65504 without it. Demodulation cancels the scaling, so the result
    equals float32's to float16 rounding (2^-11 per op; the conv sums 27 products, each with ~3 roundings:
    1e-2 of the largest magnitude)."""
    x, kernel, styles = _arrays(2, 3)
    big = 1e5 * styles
    expected = jdc.modulated_conv(x, kernel, big, padding=1)
    for fused in (False, "auto", True):
        out16 = jdc.modulated_conv(x.astype(np.float16), kernel, big, padding=1, fused=fused)
        assert out16.dtype == jnp.float16
        assert_close(out16, expected, 1e-2, f"fused={fused}")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"styles": np.zeros((2, 4), np.float32)}, ValueError, r"`styles` must have shape \(2, 3\) .* got \(2, 4\)"),
        ({"styles": np.zeros((2, 3), np.float16)}, TypeError, r"`styles` must have the dtype of `kernel`"),
        ({"up": 2, "down": 2}, ValueError, r"`up` and `down` cannot both exceed 1"),
        ({"up": 0}, ValueError, r"`up` must be a positive int, got 0"),
        ({"resample_filter": np.ones((2, 2, 2))}, ValueError, r"`resample_filter` must be finite 1-D taps or a 2-D"),
        ({"resample_filter": [1.0, -1.0]}, ValueError, r"`resample_filter` \[1.0, -1.0\] sums to 0"),
        ({"kernel": np.zeros((3, 3, 5, 4), np.float32)}, ValueError, r"`kernel` must have C_in = 3"),
        ({"fused": "yes"}, ValueError, r'`fused` must be True, False or "auto"'),
        ({"noise": np.zeros((2, 6, 6, 2), np.float32)}, ValueError, r"`noise` must have shape \(2, 6, 6, 1\)"),
        ({"padding": "SAME"}, ValueError, r"`padding` must be an int, 2 ints, or 2 \(low, high\) pairs"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message) -> None:
    x, kernel, styles = _arrays(2, 3)
    arguments = {"kernel": kernel, "styles": styles, "padding": 1, **kwargs}
    with pytest.raises(error, match=message):
        jdc.modulated_conv(x, arguments.pop("kernel"), arguments.pop("styles"), **arguments)
