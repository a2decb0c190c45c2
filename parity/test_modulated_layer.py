"""Parity of ``jdynconv.linen.ModulatedConv`` / ``jdynconv.nnx.ModulatedConv`` with StyleGAN2's ``SynthesisLayer``
and ``ToRGBLayer`` (``parity/stylegan2_reference.py``: clean-room, with stylegan2-ada-pytorch's parameter names),
through ``jdynconv.interop``.

The PyTorch layer's state dict (initialised by it, then perturbed so no value is at its initial constant) is
loaded with ``interop.torch_to_linen`` / ``torch_to_nnx``; both run on the same inputs, latents and noise.
Compared: the output, and the gradients of ``sum(y * g)`` w.r.t. inputs, latents and every parameter (the
Flax gradients exported to PyTorch's names and layouts by ``interop.linen_to_torch``). Round trip: exporting
the loaded variables gives back the state dict, key for key, and PyTorch loads it strictly.
Tolerance: parity's ``RTOL`` (``conftest.py``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jdynconv import interop, linen
from jdynconv import nnx as jdc_nnx
from parity import stylegan2_reference as reference_layers

BATCH, IN, OUT, LATENT, RES = 2, 6, 5, 8, 8

CASES = {
    "synthesis": {"kernel_size": 3, "up": 1, "conv_clamp": None},
    "synthesis_up2_clamp": {"kernel_size": 3, "up": 2, "conv_clamp": 0.8},
    "to_rgb": {"kernel_size": 1, "to_rgb": True},
}


Reference = reference_layers.SynthesisLayer | reference_layers.ToRGBLayer


def _layers(name: str) -> tuple[Reference, linen.ModulatedConv, dict]:
    case = dict(CASES[name])
    torch.manual_seed(0)
    reference: Reference
    if case.pop("to_rgb", False):
        reference = reference_layers.ToRGBLayer(IN, OUT, LATENT, kernel_size=1)
        settings = {
            "kernel_size": 1,
            "padding": 0,
            "demodulate": False,
            "style_gain": 1 / math.sqrt(IN),
            "activation": "linear",
        }
    else:
        up = case["up"]
        reference = reference_layers.SynthesisLayer(IN, OUT, LATENT, resolution=RES, use_noise=True, **case)
        settings = {
            "kernel_size": case["kernel_size"],
            "up": up,
            "clamp": case["conv_clamp"],
            "use_noise": True,
            "noise_shape": (RES, RES),
        }
    with torch.no_grad():
        for value in reference.parameters():
            value.add_(0.3 * torch.randn_like(value))
    module = linen.ModulatedConv(features=OUT, data_format="channels_first", **settings)
    return reference, module, settings


def _inputs(reference: Reference) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(1)
    size = RES // getattr(reference, "up", 1)  # ToRGBLayer keeps the size
    x = rng.normal(size=(BATCH, IN, size, size)).astype(np.float32)
    latents = rng.normal(size=(BATCH, LATENT)).astype(np.float32)
    noise = rng.normal(size=(BATCH, 1, RES, RES)).astype(np.float32)
    return x, latents, noise


@pytest.mark.parametrize("name", list(CASES))
def test_linen_layer_matches_reference(name, assert_close) -> None:
    reference, module, settings = _layers(name)
    state_dict = {key: value.detach().numpy() for key, value in reference.state_dict().items()}
    variables = interop.torch_to_linen(module, state_dict)
    x, latents, noise = _inputs(reference)
    use_noise = settings.get("use_noise", False)

    tensors = [torch.tensor(x, requires_grad=True), torch.tensor(latents, requires_grad=True)]
    expected = reference(*tensors, noise=torch.tensor(noise)) if use_noise else reference(*tensors)
    cotangent = np.random.default_rng(2).normal(size=tuple(expected.shape)).astype(np.float32)
    expected.backward(torch.tensor(cotangent))

    def apply(params, x, latents):
        kwargs = {"noise": noise} if use_noise else {}
        return module.apply({**variables, "params": params}, x, latents, **kwargs)

    out, vjp = jax.vjp(jax.jit(apply), variables["params"], x, latents)
    assert_close(out, expected.detach().numpy(), f"{name} output")
    grads, dx, dlatents = vjp(jnp.asarray(cotangent))
    assert_close(dx, tensors[0].grad.numpy(), f"{name} d_inputs")
    assert_close(dlatents, tensors[1].grad.numpy(), f"{name} d_latents")
    grad_state = interop.linen_to_torch(module, {**variables, "params": grads})
    for key, value in reference.named_parameters():
        assert_close(grad_state[key], value.grad.numpy(), f"{name} d_{key}")

    exported = interop.linen_to_torch(module, variables)
    assert exported.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    reference.load_state_dict({key: torch.tensor(value) for key, value in exported.items()}, strict=True)


@pytest.mark.parametrize("name", ["synthesis_up2_clamp", "to_rgb"])
def test_nnx_layer_matches_reference(name, assert_close) -> None:
    reference, _, settings = _layers(name)
    state_dict = {key: value.detach().numpy() for key, value in reference.state_dict().items()}
    kernel = (settings.pop("kernel_size"),) * 2
    model = jdc_nnx.ModulatedConv(
        IN, OUT, kernel, latent_features=LATENT, data_format="channels_first", rngs=nnx.Rngs(0), **settings
    )
    interop.torch_to_nnx(model, state_dict)
    x, latents, noise = _inputs(reference)
    if settings.get("use_noise"):
        expected = reference(torch.tensor(x), torch.tensor(latents), noise=torch.tensor(noise))
        out = model(x, latents, noise=noise)
    else:
        expected = reference(torch.tensor(x), torch.tensor(latents))
        out = model(x, latents)
    assert_close(out, expected.detach().numpy(), f"{name} output")
    exported = interop.nnx_to_torch(model)
    assert exported.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_a_checkpoint_with_another_filter_is_refused() -> None:
    """The filter is the layer's configuration, not a weight: a SynthesisLayer saved with another filter would
    give other outputs, so loading it is an error that names the buffer (not a silent mismatch)."""
    torch.manual_seed(0)
    other = reference_layers.SynthesisLayer(IN, OUT, LATENT, resolution=RES, up=2, resample_filter=(1, 2, 2, 1))
    module = linen.ModulatedConv(features=OUT, kernel_size=3, up=2, use_noise=True, noise_shape=(RES, RES))
    state_dict = {key: value.detach().numpy() for key, value in other.state_dict().items()}
    with pytest.raises(interop.StateDictError, match=r"value mismatch: resample_filter: expected the module's"):
        interop.torch_to_linen(module, state_dict)
    matching = linen.ModulatedConv(
        features=OUT, kernel_size=3, up=2, use_noise=True, noise_shape=(RES, RES), resample_filter=(1, 2, 2, 1)
    )
    interop.torch_to_linen(matching, state_dict)


def test_missing_and_unexpected_keys_are_reported_together() -> None:
    reference, module, _ = _layers("synthesis")
    state_dict = {key: value.detach().numpy() for key, value in reference.state_dict().items()}
    del state_dict["affine.bias"]
    state_dict["extra"] = np.zeros(3, np.float32)
    with pytest.raises(interop.StateDictError, match=r"(?s)affine\.bias.*extra"):
        interop.torch_to_linen(module, state_dict)
