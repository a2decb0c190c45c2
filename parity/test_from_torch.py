"""``interop.from_torch``: one call per PyTorch layer, every setting read from the module.

Each family's PyTorch reference is built with non-default settings (stride 2 on even maps with integer padding,
groups, BatchNorm momentum and epsilon, temperatures, activation slopes, filters, clamps, noise), its weights and
statistics perturbed off their initial constants; ``from_torch`` is called with no setting given by hand, for
linen and for NNX. Compared on the same inputs (moved to the returned layer's channels-last layout): the
eval-mode outputs, and where the layer has BatchNorm, the training-mode outputs and the running statistics after
one training step (which proves PyTorch's momentum and unbiased running-variance conventions are carried over).
Tolerance: parity's ``RTOL`` (``conftest.py``).

The deformable layers: torchvision's ``DeformConv2d`` takes its offsets and mask per call, so does the port (given
in the port's channels-last layout); mmcv's Packs predict them (``conv_offset``, perturbed off mmcv's zeros, so the
sampling is off the grid); InternImage's ``DCNv3_pytorch`` is channels-last on both sides, its ``act_layer`` and
``norm_layer`` read off the types of ``dw_conv``'s children. Their eval outputs are compared, linen and NNX in one
jitted program; ``parity/test_deformable_interop.py`` compares every gradient, and DCNv3's BatchNorm in training
mode with its running statistics.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from jdynconv import interop
from jdynconv.interop._from_torch import torch_port
from parity import deform_conv_modules as deform
from parity.dcnv3_reference import DCNv3_pytorch
from parity.kernel_mix_models import CondConv2d, DynamicConvNd, RoutedCondConv2d
from parity.odconv_reference import ODConvNd
from parity.seed_model import SeedModel
from parity.stylegan2_reference import SynthesisLayer, ToRGBLayer

AssertClose = Callable[[object, object, str], None]


def _perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and float buffer moved off its initial constant, running variances kept positive."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in [*module.named_parameters(), *module.named_buffers()]:
            if not value.is_floating_point() or name.endswith("resample_filter"):
                continue
            noise = torch.rand(value.shape, generator=generator)
            if name.endswith("running_var"):
                value.copy_(0.5 + noise)
            else:
                value.add_(0.4 * (noise - 0.5))
    return module


def _channels_last(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, 1, -1)


def _inputs(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # A per-sample, per-channel offset, so pooled descriptors (gates, attentions) differ between samples.
    offset = rng.normal(size=shape[:2] + (1,) * (len(shape) - 2))
    return (rng.normal(size=shape) + offset).astype(np.float32)


def _torch(module: torch.nn.Module, *args: np.ndarray, **kwargs: Any) -> np.ndarray:
    with torch.no_grad():
        out = module(*(torch.from_numpy(a) for a in args), **{k: torch.from_numpy(v) for k, v in kwargs.items()})
    return _channels_last(out.numpy())


def _running_stats(state_dict: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
        key: np.asarray(value) for key, value in state_dict.items() if key.endswith(("running_mean", "running_var"))
    }


def _check_batch_norm_layer(module: torch.nn.Module, x: np.ndarray, assert_close: AssertClose, name: str) -> None:
    """Eval outputs, then one training step's outputs and running statistics, linen and NNX against torch."""
    layer, variables = interop.from_torch(module)
    model = interop.from_torch(module, api="nnx")
    x_last = _channels_last(x)

    module.eval()
    expected = _torch(module, x)
    apply_eval = jax.jit(functools.partial(layer.apply, use_running_average=True))
    assert_close(apply_eval(variables, x_last), expected, f"{name} linen eval")
    model.eval()
    assert_close(nnx.jit(lambda m, x: m(x))(model, x_last), expected, f"{name} nnx eval")

    module.train()
    expected = _torch(module, x)
    stats = _running_stats(module.state_dict())
    apply_train = jax.jit(functools.partial(layer.apply, use_running_average=False, mutable=["batch_stats"]))
    out, updates = apply_train(variables, x_last)
    assert_close(out, expected, f"{name} linen train")
    exported = _running_stats(interop.linen_to_torch(layer, {**variables, **updates}))
    assert exported.keys() == stats.keys()
    for key in stats:
        assert_close(exported[key], stats[key], f"{name} linen {key}")
    model.train()
    assert_close(nnx.jit(lambda m, x: m(x))(model, x_last), expected, f"{name} nnx train")
    exported = _running_stats(interop.nnx_to_torch(model))
    for key in stats:
        assert_close(exported[key], stats[key], f"{name} nnx {key}")


def test_seed_branch_mix_block(assert_close: AssertClose) -> None:
    torch.manual_seed(0)
    module = SeedModel(3, 4, num_branches=3, kernel_size=3, padding=1, input_size=(6, 6))
    for branch in module.convs:  # every branch's settings differ from the defaults
        conv, norm, activation = branch
        conv.stride = (2, 2)
        norm.momentum, norm.eps = 0.3, 1e-3
        activation.negative_slope = 0.2
    _check_batch_norm_layer(_perturb(module, 0), _inputs((4, 3, 6, 6)), assert_close, "seed")


def test_odconv_stride_2_integer_padding(assert_close: AssertClose) -> None:
    torch.manual_seed(0)
    module = ODConvNd(8, 6, 3, stride=2, padding=1, groups=2, reduction=0.25, kernel_num=3)
    module.update_temperature(5.0)
    module.attention.bn.momentum, module.attention.bn.eps = 0.25, 1e-3
    _check_batch_norm_layer(_perturb(module, 1), _inputs((4, 8, 8, 8)), assert_close, "odconv")


def _check_layer(
    module: torch.nn.Module, inputs: tuple[np.ndarray, ...], assert_close: AssertClose, name: str, **kwargs: np.ndarray
) -> None:
    """Outputs of linen and NNX against torch (no BatchNorm); inputs after the first and kwargs as they are
    given to torch, apart from arrays the caller already gave in the port's layout (``kwargs``)."""
    x, *rest = inputs
    expected = _torch(module, x, *rest)
    layer, variables = interop.from_torch(module)
    linen_out = jax.jit(lambda v, *a: layer.apply(v, *a, **kwargs))(variables, _channels_last(x), *rest)
    assert_close(linen_out, expected, f"{name} linen")
    model = interop.from_torch(module, api="nnx")
    assert_close(nnx.jit(lambda m, *a: m(*a, **kwargs))(model, _channels_last(x), *rest), expected, f"{name} nnx")


def test_timm_cond_conv_with_routing_fn(assert_close: AssertClose) -> None:
    torch.manual_seed(0)
    module = RoutedCondConv2d(4, 6, kernel_size=3, stride=2, groups=2, bias=True, num_experts=3)
    _check_layer(_perturb(module, 2), (_inputs((2, 4, 8, 8)),), assert_close, "cond_conv")


def test_timm_cond_conv_takes_routing_weights(assert_close: AssertClose) -> None:
    """timm's CondConv2d alone takes its routing weights per call: so does the port."""
    torch.manual_seed(0)
    module = _perturb(CondConv2d(4, 6, kernel_size=3, padding="same", dilation=2, num_experts=2), 3)
    x = _inputs((2, 4, 7, 7))
    routing = np.random.default_rng(4).uniform(size=(2, 2)).astype(np.float32)
    expected = _torch(module, x, routing)
    layer, variables = interop.from_torch(module)
    assert_close(jax.jit(layer.apply)(variables, _channels_last(x), routing), expected, "cond_conv linen")
    model = interop.from_torch(module, api="nnx")
    assert_close(model(_channels_last(x), routing), expected, "cond_conv nnx")
    assert not layer.use_routing  # no routing of its own: forgetting the weights is an error, not a guess
    assert "routing_kernel" not in variables["params"]
    with pytest.raises(ValueError, match=r"`routing_weights` \(2, 2\) \(batch, num_experts\) are required"):
        layer.apply(variables, _channels_last(x))
    with pytest.raises(ValueError, match="`routing_weights`"):
        model(_channels_last(x))


def test_dynamic_conv_with_its_temperature(assert_close: AssertClose) -> None:
    torch.manual_seed(0)
    module = DynamicConvNd(4, 6, (3, 3), ratio=0.5, stride=2, padding=1, groups=2, K=3, temperature=7.0)
    _check_layer(_perturb(module, 5), (_inputs((2, 4, 8, 8)),), assert_close, "dynamic_conv")


def test_synthesis_layer_up_2_with_noise(assert_close: AssertClose) -> None:
    torch.manual_seed(0)
    module = _perturb(SynthesisLayer(4, 5, 6, resolution=8, up=2, resample_filter=(1, 2, 1), conv_clamp=0.7), 6)
    rng = np.random.default_rng(7)
    x, w = _inputs((2, 4, 4, 4)), rng.normal(size=(2, 6)).astype(np.float32)
    noise = rng.normal(size=(2, 1, 8, 8)).astype(np.float32)
    expected = _torch(module, x, w, noise=noise)
    noise_last = _channels_last(noise)
    layer, variables = interop.from_torch(module)
    out = jax.jit(lambda v, x, w, n: layer.apply(v, x, w, noise=n))(variables, _channels_last(x), w, noise_last)
    assert_close(out, expected, "synthesis linen")
    model = interop.from_torch(module, api="nnx")
    assert_close(model(_channels_last(x), w, noise=noise_last), expected, "synthesis nnx")


def test_to_rgb_layer(assert_close: AssertClose) -> None:
    torch.manual_seed(0)
    module = _perturb(ToRGBLayer(4, 3, 6, kernel_size=1, conv_clamp=0.5), 8)
    w = np.random.default_rng(9).normal(size=(2, 6)).astype(np.float32)
    _check_layer(module, (_inputs((2, 4, 8, 8)), w), assert_close, "to_rgb")


def _check_ported(
    module: torch.nn.Module, inputs: tuple[np.ndarray, ...], assert_close: AssertClose, name: str, layout: str
) -> None:
    """Eval outputs of the linen and NNX ports against torch, both APIs in one jitted program (XLA merges their
    identical computations: one compile). ``inputs`` in PyTorch's layout; ``layout``: ``"channels_first"`` (moved
    channels-last for jdynconv) or ``"channels_last"`` (DCNv3: the same on both sides)."""
    layer, variables = interop.from_torch(module)
    model = interop.from_torch(module, api="nnx")
    model.eval()
    graphdef = nnx.graphdef(model)
    kwargs = {"use_running_average": True} if "batch_stats" in variables else {}

    @jax.jit
    def both(variables: Any, state: Any, *arrays: np.ndarray) -> tuple[jax.Array, jax.Array]:
        return layer.apply(variables, *arrays, **kwargs), nnx.merge(graphdef, state)(*arrays)

    module.eval()
    with torch.no_grad():
        expected = module(*(torch.from_numpy(a) for a in inputs)).numpy()
    move = _channels_last if layout == "channels_first" else np.asarray
    linen_out, nnx_out = both(variables, nnx.state(model), *(move(a) for a in inputs))
    assert_close(linen_out, move(expected), f"{name} linen")
    assert_close(nnx_out, move(expected), f"{name} nnx")


def test_torchvision_deform_conv_takes_offsets_and_mask(assert_close: AssertClose) -> None:
    """torchvision's DeformConv2d takes its offsets (and a mask) per call: so does the port (predict_offsets=False),
    with them channels-last; with and without a mask."""
    torch.manual_seed(0)
    module = _perturb(deform.DeformConv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), 10)
    rng = np.random.default_rng(11)
    x = _inputs((2, 4, 8, 8))
    offset = rng.normal(0.0, 1.5, size=(2, 2 * 2 * 9, 3, 3)).astype(np.float32)  # two offset groups
    mask = rng.uniform(size=(2, 2 * 9, 3, 3)).astype(np.float32)
    assert not interop.from_torch(module)[0].predict_offsets
    _check_ported(module, (x, offset), assert_close, "deform_conv", "channels_first")
    _check_ported(module, (x, offset, mask), assert_close, "deform_conv with mask", "channels_first")


def test_mmcv_deform_conv_pack_stride_2(assert_close: AssertClose) -> None:
    torch.manual_seed(0)
    module = _perturb(deform.DeformConv2dPack(4, 6, 3, stride=2, padding=1, groups=2, deform_groups=2), 12)
    _check_ported(module, (_inputs((2, 4, 8, 8)),), assert_close, "deform_conv_pack", "channels_first")


def test_mmcv_modulated_deform_conv_pack_dilation(assert_close: AssertClose) -> None:
    torch.manual_seed(0)
    module = deform.ModulatedDeformConv2dPack(4, 4, 3, padding=2, dilation=2, deform_groups=2, bias=False)
    _check_ported(_perturb(module, 13), (_inputs((2, 4, 7, 7)),), assert_close, "modulated_pack", "channels_first")


def test_the_mmcv_layers_that_take_offsets_port_as_deform_conv() -> None:
    """mmcv's DeformConv2d (torchvision's class name; no bias, deform_groups) and ModulatedDeformConv2d take their
    offsets (and mask) per call: DeformConv with predict_offsets=False, offset_groups from deform_groups."""
    for module, use_bias in (
        (deform.mmcv.DeformConv2d(4, 6, 3, stride=2, padding=1, deform_groups=2), False),
        (deform.ModulatedDeformConv2d(4, 6, (3, 1), padding=(1, 0), groups=2, deform_groups=4), True),
    ):
        port = torch_port(module)
        assert port.attributes["predict_offsets"] is False
        assert port.attributes["offset_groups"] == module.deform_groups
        assert port.attributes["use_bias"] is use_bias
        assert port.attributes["padding"] == tuple((p, p) for p in module.padding)
        assert sorted(port.state_dict) == sorted(module.state_dict())


def _dcnv3(seed: int, **settings: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # InternImage's advice that C / group be a power of 2
        return _perturb(DCNv3_pytorch(**settings), seed)


def test_dcnv3_layer_norm_gelu_center_feature_scale_remove_center(assert_close: AssertClose) -> None:
    module = _dcnv3(14, channels=8, group=2, offset_scale=0.5, center_feature_scale=True, remove_center=True)
    _check_ported(module, (_inputs((2, 6, 6, 8)),), assert_close, "dcnv3 LN", "channels_last")


def test_dcnv3_batch_norm_relu_dilation_2(assert_close: AssertClose) -> None:
    """Eval mode, its perturbed running statistics loaded (training mode, with the running mean after a step:
    ``parity/test_deformable_interop.py``)."""
    settings = {"channels": 4, "dw_kernel_size": 5, "pad": 2, "dilation": 2, "group": 2, "act_layer": "ReLU"}
    module = _dcnv3(15, **settings, norm_layer="BN")
    _check_ported(module, (_inputs((2, 6, 6, 4)),), assert_close, "dcnv3 BN", "channels_last")


def test_dcnv3_settings_jdynconv_fixes_are_checked() -> None:
    """jdynconv's DCNv3 has InternImage's norm settings built in (LayerNorm eps 1e-6, BatchNorm2d's defaults):
    other values are refused by name, never ported silently. The CUDA ``DCNv3`` (same parameters) is recognised."""
    module = _dcnv3(16, channels=4, group=2, norm_layer="BN")
    module.dw_conv[1][0].momentum = 0.3
    with pytest.raises(ValueError, match=r"dw_conv\.1\.0 has momentum 0\.7"):
        interop.from_torch(module)
    module = _dcnv3(16, channels=4, group=2)
    module.dw_conv[1][1].eps = 1e-5
    with pytest.raises(ValueError, match=r"dw_conv\.1\.1 has epsilon 1e-05"):
        interop.from_torch(module)

    class DCNv3(DCNv3_pytorch):  # InternImage's CUDA module's name and parameters
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        port = torch_port(DCNv3(channels=8, group=2, act_layer="SiLU", norm_layer="BN"))
    assert port.attributes["activation"] is jax.nn.silu
    assert port.attributes["norm"] == "batch"


def test_an_unknown_layer_is_refused_with_the_known_names() -> None:
    with pytest.raises(TypeError, match=r"Known layers \(by class name\): .*CondConv2d.*ODConv2d"):
        interop.from_torch(torch.nn.Conv2d(3, 4, 3))


def test_a_momentum_of_none_is_refused() -> None:
    module = SeedModel(3, 4, num_branches=2, kernel_size=3, padding=1, input_size=(4, 4))
    module.convs[1][1].momentum = None
    with pytest.raises(ValueError, match=r"convs\.1 has BatchNorm momentum=None"):
        interop.from_torch(module)


def test_settings_read_from_the_module_cannot_be_overridden() -> None:
    module = DynamicConvNd(4, 6, (3, 3), K=2)
    with pytest.raises(TypeError, match=r"from_torch reads \['padding'\]"):
        interop.from_torch(module, padding="SAME")
    layer, _ = interop.from_torch(module, mixing="mix_outputs")
    assert layer.mixing == "mix_outputs"
