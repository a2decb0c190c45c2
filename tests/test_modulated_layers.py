"""ModulatedConv (linen and NNX): the layer's maths against float64 NumPy, noise modes, linen == NNX, errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdynconv import linen
from jdynconv import nnx as jdc_nnx
from tests import reference
from tests.helpers import F32_RTOL, assert_close

BATCH, IN, OUT, LATENT, SIZE = 2, 3, 4, 5, 6
STYLEGAN_FILTER = np.array([1, 3, 3, 1], np.float64) / 8


def _inputs(num_spatial: int = 2):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, *(SIZE,) * num_spatial, IN)).astype(np.float32)
    latents = rng.normal(size=(BATCH, LATENT)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(latents)


def _expected(params, x, latents, *, up=1, noise=None, activation="lrelu", gain=1.0, clamp=None, demodulate=True):
    """NVIDIA's SynthesisLayer written out: affine, modulated conv, noise, bias, lrelu(0.2) * sqrt(2) * gain."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    styles = np.asarray(latents, np.float64) @ p["affine_kernel"] / math.sqrt(LATENT) + p["affine_bias"]
    out = reference.modulated_conv(
        x,
        p["kernel"],
        styles,
        demodulate=demodulate,
        up=up,
        down=1,
        padding=p["kernel"].shape[0] // 2,
        taps=STYLEGAN_FILTER,
        flip_weight=up == 1,
    )
    if noise is not None:
        out = out + np.asarray(noise, np.float64) * p["noise_strength"]
    out = out + p["bias"]
    if activation == "lrelu":
        out = np.where(out > 0, out, 0.2 * out) * math.sqrt(2)
    out = out * gain
    return np.clip(out, -clamp * gain, clamp * gain) if clamp is not None else out


@pytest.mark.parametrize("up", [1, 2])
def test_linen_layer_matches_nvidia_synthesis_layer_maths(up) -> None:
    x, latents = _inputs()
    layer = linen.ModulatedConv(features=OUT, kernel_size=3, up=up, use_noise=True, clamp=0.5)
    variables = layer.init(jax.random.key(0), x, latents)
    params = dict(variables["params"])
    assert params["kernel"].shape == (3, 3, IN, OUT)
    assert params["affine_kernel"].shape == (LATENT, IN)
    np.testing.assert_array_equal(params["affine_bias"], np.ones(IN))  # NVIDIA's bias_init=1
    assert params["noise_strength"] == 0  # NVIDIA's initial strength
    params["noise_strength"] = jnp.asarray(0.7)
    params["bias"] = jnp.arange(OUT, dtype=jnp.float32) / 10
    noise = jax.random.normal(jax.random.key(1), (BATCH, SIZE * up, SIZE * up, 1))
    out = layer.apply({"params": params}, x, latents, noise=noise, gain=1.5)
    assert_close(out, _expected(params, x, latents, up=up, noise=noise, gain=1.5, clamp=0.5), F32_RTOL)


def test_noise_modes() -> None:
    x, latents = _inputs()
    layer = linen.ModulatedConv(features=OUT, kernel_size=3, use_noise=True, noise_shape=(SIZE, SIZE))
    variables = layer.init(jax.random.key(0), x, latents)
    params = {**variables["params"], "noise_strength": jnp.asarray(1.0)}
    variables = {"params": params, "constants": variables["constants"]}
    quiet = layer.apply(variables, x, latents, noise_mode="none")
    const = layer.apply(variables, x, latents, noise_mode="const")
    added = variables["constants"]["noise_const"][None, :, :, None]

    # The noise is added before the bias and the activation: undo lrelu * sqrt(2) on both to compare.
    def pre_activation(y):
        y = np.asarray(y, np.float64) / math.sqrt(2)
        return np.where(y > 0, y, y / 0.2)

    assert_close(pre_activation(const) - pre_activation(quiet), np.broadcast_to(added, quiet.shape), F32_RTOL)
    first = layer.apply(variables, x, latents, rngs={"noise": jax.random.key(3)})
    second = layer.apply(variables, x, latents, rngs={"noise": jax.random.key(4)})
    assert not np.allclose(first, second)
    with pytest.raises(ValueError, match=r'`noise` is used only with `noise_mode` "random", got \'const\''):
        layer.apply(variables, x, latents, noise=jnp.zeros((BATCH, SIZE, SIZE, 1)), noise_mode="const")
    with pytest.raises(ValueError, match=r"`noise` must have shape \(2, 6, 6, 1\) or \(2, 6, 6, 4\)"):
        layer.apply(variables, x, latents, noise=jnp.zeros((BATCH, SIZE, SIZE, 2)))


def test_to_rgb_configuration_and_passed_styles() -> None:
    """ToRGB: no demodulation, styles times 1 / sqrt(C_in * k * k), padding 0, linear, no noise."""
    x, _ = _inputs()
    styles = jnp.asarray(np.random.default_rng(2).normal(size=(BATCH, IN)), jnp.float32)
    gain = 1 / math.sqrt(IN)
    layer = linen.ModulatedConv(
        features=OUT, kernel_size=1, demodulate=False, affine=False, style_gain=gain, padding=0, activation="linear"
    )
    variables = layer.init(jax.random.key(0), x, styles)
    assert set(variables["params"]) == {"kernel", "bias"}
    out = layer.apply(variables, x, styles)
    kernel = np.asarray(variables["params"]["kernel"], np.float64)
    expected = np.einsum("bhwi,io,bi->bhwo", np.asarray(x, np.float64), kernel[0, 0], np.asarray(styles) * gain)
    assert_close(out, expected, F32_RTOL)


@pytest.mark.parametrize(("num_spatial", "up", "data_format"), [(1, 2, "channels_last"), (2, 1, "channels_first")])
def test_linen_equals_nnx(num_spatial, up, data_format) -> None:
    x, latents = _inputs(num_spatial)
    if data_format == "channels_first":
        x = jnp.moveaxis(x, -1, 1)
    settings = {"up": up, "use_noise": True, "data_format": data_format}
    layer = linen.ModulatedConv(features=OUT, kernel_size=3, **settings)
    variables = layer.init(jax.random.key(0), x, latents)
    model = jdc_nnx.ModulatedConv(
        IN, OUT, (3,) * num_spatial, latent_features=LATENT, rngs=nnx.Rngs(params=1, noise=2), **settings
    )
    for name, value in variables["params"].items():
        assert getattr(model, name)[...].shape == value.shape, name
        getattr(model, name)[...] = value + 0.25 if name == "noise_strength" else value
    params = {**variables["params"], "noise_strength": variables["params"]["noise_strength"] + 0.25}
    out_shape = layer.apply({"params": params}, x, latents, noise_mode="none").shape
    noise_shape = (BATCH, 1, *out_shape[2:]) if data_format == "channels_first" else (*out_shape[:-1], 1)
    noise = jax.random.normal(jax.random.key(5), noise_shape)
    expected = layer.apply({"params": params}, x, latents, noise=noise)
    assert_close(model(x, latents, noise=noise), expected, F32_RTOL)
    random = model(x, latents)
    assert random.shape == expected.shape
    assert not np.allclose(random, expected)


LATENTS_WIDTH_ERROR = r"`latents` must have shape \(2, 5\) \(batch, latent_dim\), got shape \(2, 7\)"


def test_layer_errors_name_the_argument() -> None:
    x, latents = _inputs()
    layer = linen.ModulatedConv(features=OUT, kernel_size=3)
    with pytest.raises(ValueError, match=r"`noise` was passed to a ModulatedConv without `use_noise`"):
        layer.init(jax.random.key(0), x, latents, noise=jnp.zeros((BATCH, SIZE, SIZE, 1)))
    with pytest.raises(ValueError, match=r"`activation` must be one of \('lrelu', 'linear'\), got 'relu'"):
        linen.ModulatedConv(features=OUT, kernel_size=3, activation="relu").init(jax.random.key(0), x, latents)
    with pytest.raises(ValueError, match=r"`inputs` must have rank 4"):
        linen.ModulatedConv(features=OUT, kernel_size=(3, 3)).init(jax.random.key(0), x[0], latents)
    variables = layer.init(jax.random.key(0), x, latents)
    with pytest.raises(
        ValueError, match=r"`latents` must have shape \(2, 5\) \(batch, latent_dim\), got shape \(2, 7\)"
    ):
        layer.apply(variables, x, jnp.zeros((BATCH, 7)))
    model = jdc_nnx.ModulatedConv(IN, OUT, (3, 3), latent_features=LATENT, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"`latents` must have shape \(2, 5\) \(batch, latent_dim\), got shape \(2, 7\)"
    ):
        model(x, jnp.zeros((BATCH, 7)))
    with pytest.raises(ValueError, match=r"`latent_features` is required with `affine`"):
        jdc_nnx.ModulatedConv(IN, OUT, (3, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`inputs` must have 3 channels"):
        jdc_nnx.ModulatedConv(IN, OUT, (3, 3), latent_features=LATENT, rngs=nnx.Rngs(0))(x[..., :2], latents)
    with pytest.raises(ValueError, match=r'`noise_mode` must be "random", "const" or "none", got \'bogus\''):
        layer.apply(variables, x, latents, noise_mode="bogus")
    with pytest.raises(ValueError, match=r"`kernel_size` 3 is an int, but an NNX layer creates its kernel"):
        jdc_nnx.ModulatedConv(IN, OUT, 3, latent_features=LATENT, rngs=nnx.Rngs(0))
    noisy = linen.ModulatedConv(features=OUT, kernel_size=3, use_noise=True)
    with pytest.raises(ValueError, match=r'`noise_mode` "const" needs `noise_shape` \(6, 6\)'):
        noisy.init(jax.random.key(0), x, latents, noise_mode="const")
