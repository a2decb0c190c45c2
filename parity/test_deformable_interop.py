"""Parity of ``jdynconv`` DeformConv and DCNv3 (linen and NNX) with their PyTorch originals, weights moved by interop.

References:

* ``parity/deform_conv_modules.py``: torchvision's ``DeformConv2d`` (offsets and mask passed: the layer with
  ``predict_offsets=False``) and mmcv's ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack`` (``conv_offset``
  predicts them: ``predict_offsets=True``, ``use_mask``), written line by line from the originals, computing
  through torchvision's CPU kernel in NumPy (``parity/results/deform_conv_modules_check.txt`` holds them to
  torchvision itself).
* ``parity/dcnv3_reference.py``: InternImage's ``DCNv3_pytorch`` line by line.

The layers are built here by hand (``from_torch`` builds them in ``parity/test_from_torch.py``); PyTorch weights go
in through ``interop.torch_to_linen``/``torch_to_nnx``, jdynconv's gradients come out through
``interop.linen_to_torch`` and are compared with PyTorch's ``.grad`` by PyTorch name, and random jdynconv variables
go into a fresh PyTorch module by a strict ``load_state_dict``. Compared: the output and the gradients of ``sum(out *
cotangent)`` w.r.t. the inputs (torchvision's: also the offsets and the mask) and every parameter, within ``RTOL``
(``conftest.py``). Every weight is drawn non-zero (mmcv and InternImage zero-initialise ``conv_offset`` and
``offset``/``mask``, which would sample the regular grid only), at a scale that moves the sampling points by about
a pixel, so that they fall between pixels and some outside the map.

DCNv3 with BatchNorm runs in training mode (batch statistics, running statistics updated): its running mean and
its running variance (PyTorch's unbiased one, ``test_dcnv3_batch_norm_running_var``) are compared.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jdynconv import interop
from jdynconv import linen as jdc_linen
from jdynconv import nnx as jdc_nnx
from parity import deform_conv_modules as modules
from parity.dcnv3_reference import DCNv3_pytorch

AssertClose = Callable[[object, object, str], None]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """PyTorch on one thread: at these tiny shapes its threads only contend with XLA's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rng(name: str, salt: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"deformable/{name}/{salt}".encode()))


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: runner() caches per case
class Case:
    """One PyTorch module and its jdynconv twin.

    ``inputs``: the call's arrays in PyTorch's layout (``x`` first), each differentiated; ``channels_first``:
    whether PyTorch's arrays (inputs and output) are channels-first (moved to channels-last for jdynconv);
    ``batch_norm``: the layer has a BatchNorm, in training mode with ``train``.
    """

    name: str
    torch_module: Callable[[], torch.nn.Module]
    linen: Callable[[], Any]
    nnx: Callable[[], Any]
    inputs: dict[str, tuple[int, ...]]
    channels_first: bool = True
    batch_norm: bool = False
    train: bool = False
    offset_scale: float = 0.3  # of conv_offset / offset weights: sampling points move by about a pixel


def _quiet(make: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    """InternImage warns when C / group is not a power of 2."""

    def build() -> torch.nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return make()

    return build


def _nnx(cls: type, *args: Any, **kwargs: Any) -> Callable[[], Any]:
    return lambda: nnx.eval_shape(lambda: cls(*args, **kwargs, rngs=nnx.Rngs(0)))


CASES = (
    Case(
        "torchvision_mask_groups_stride2",
        lambda: modules.DeformConv2d(4, 6, 3, stride=2, padding=1, groups=2),
        lambda: jdc_linen.DeformConv(
            6, (3, 3), strides=2, padding=((1, 1), (1, 1)), feature_group_count=2, predict_offsets=False
        ),
        _nnx(jdc_nnx.DeformConv, 4, 6, (3, 3), strides=2, padding=1, feature_group_count=2, predict_offsets=False),
        {"x": (2, 4, 8, 8), "offset": (2, 2 * 2 * 9, 4, 4), "mask": (2, 2 * 9, 4, 4)},
    ),
    Case(
        "torchvision_no_mask_no_bias_dilation",
        lambda: modules.DeformConv2d(4, 4, (2, 3), padding=(1, 0), dilation=(2, 1), bias=False),
        lambda: jdc_linen.DeformConv(
            4, (2, 3), padding=((1, 1), (0, 0)), kernel_dilation=(2, 1), use_bias=False, predict_offsets=False
        ),
        _nnx(
            jdc_nnx.DeformConv,
            4,
            4,
            (2, 3),
            padding=((1, 1), (0, 0)),
            kernel_dilation=(2, 1),
            use_bias=False,
            predict_offsets=False,
        ),
        {"x": (2, 4, 7, 6), "offset": (2, 2 * 6, 7, 4)},
    ),
    Case(
        "mmcv_deform_conv_pack",
        lambda: modules.DeformConv2dPack(4, 6, 3, padding=1, deform_groups=2),
        lambda: jdc_linen.DeformConv(6, 3, padding=1, use_bias=False, offset_groups=2),
        _nnx(jdc_nnx.DeformConv, 4, 6, (3, 3), padding=1, use_bias=False, offset_groups=2),
        {"x": (2, 4, 6, 6)},
    ),
    Case(
        "mmcv_modulated_pack_groups_stride2",
        lambda: modules.ModulatedDeformConv2dPack(8, 6, 3, stride=2, padding=1, groups=2, deform_groups=2),
        lambda: jdc_linen.DeformConv(
            6, 3, strides=2, padding=((1, 1), (1, 1)), feature_group_count=2, offset_groups=2, use_mask=True
        ),
        _nnx(
            jdc_nnx.DeformConv,
            8,
            6,
            (3, 3),
            strides=2,
            padding=1,
            feature_group_count=2,
            offset_groups=2,
            use_mask=True,
        ),
        {"x": (2, 8, 8, 7)},
    ),
    Case(
        "dcnv3_layer_norm_center_feature_scale_remove_center",
        _quiet(lambda: DCNv3_pytorch(8, group=2, offset_scale=0.5, center_feature_scale=True, remove_center=True)),
        lambda: jdc_linen.DCNv3(8, groups=2, offset_scale=0.5, center_feature_scale=True, remove_center=True),
        _nnx(jdc_nnx.DCNv3, 8, groups=2, offset_scale=0.5, center_feature_scale=True, remove_center=True),
        {"x": (2, 6, 6, 8)},
        channels_first=False,
    ),
    Case(
        "dcnv3_batch_norm_train_dilation2_silu",
        _quiet(
            lambda: DCNv3_pytorch(4, dw_kernel_size=5, pad=2, dilation=2, group=2, act_layer="SiLU", norm_layer="BN")
        ),
        lambda: jdc_linen.DCNv3(
            4, dw_kernel_size=5, padding=2, kernel_dilation=2, groups=2, activation=jax.nn.silu, norm="batch"
        ),
        _nnx(
            jdc_nnx.DCNv3,
            4,
            dw_kernel_size=5,
            padding=2,
            kernel_dilation=2,
            groups=2,
            activation=jax.nn.silu,
            norm="batch",
        ),
        {"x": (2, 6, 6, 4)},
        channels_first=False,
        batch_norm=True,
        train=True,
    ),
)
BY_NAME = {case.name: case for case in CASES}


def _perturbed(case: Case, seed: str) -> torch.nn.Module:
    """The PyTorch module with every parameter and running statistic drawn anew."""
    torch.manual_seed(0)
    module = case.torch_module()
    rng = _rng(case.name, seed)
    with torch.no_grad():
        for name, value in [*module.named_parameters(), *module.named_buffers()]:
            if not value.is_floating_point():
                continue
            if name.endswith("running_var"):
                new = rng.uniform(0.5, 1.5, value.shape)
            else:
                scale = case.offset_scale if name.startswith(("conv_offset", "offset.", "mask.")) else 0.5
                new = rng.normal(0.0, scale, value.shape)
            value.copy_(torch.from_numpy(new.astype(np.float32)))
    module.train(case.train)
    return module


def _arrays(case: Case) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The inputs (PyTorch layout) and the cotangent of the output (PyTorch layout)."""
    rng = _rng(case.name, "inputs")
    inputs = {}
    for name, shape in case.inputs.items():
        if name == "offset":
            inputs[name] = rng.normal(0.0, 1.5, shape).astype(np.float32)
        elif name == "mask":
            inputs[name] = rng.uniform(0.0, 1.0, shape).astype(np.float32)
        else:
            inputs[name] = rng.standard_normal(shape, dtype=np.float32)
    with torch.no_grad():
        module = _perturbed(case, "weights").eval()
        out_shape = module(*(torch.from_numpy(a) for a in inputs.values())).shape
    return inputs, rng.standard_normal(tuple(out_shape), dtype=np.float32)


def _to_last(case: Case, array: np.ndarray) -> jax.Array:
    return jnp.asarray(np.moveaxis(array, 1, -1) if case.channels_first else array)


def _to_torch_layout(case: Case, array: Any) -> np.ndarray:
    return np.moveaxis(np.asarray(array), -1, 1) if case.channels_first else np.asarray(array)


@dataclasses.dataclass
class Results:
    """Output, gradients w.r.t. the inputs (by input name) and the parameters (by PyTorch key), running stats."""

    output: np.ndarray
    inputs: dict[str, np.ndarray]
    params: dict[str, np.ndarray]
    stats: dict[str, np.ndarray]


def torch_results(case: Case, module: torch.nn.Module, inputs: dict[str, np.ndarray], cotangent: np.ndarray) -> Results:
    leaves = {name: torch.tensor(value, requires_grad=True) for name, value in inputs.items()}
    output = module(*leaves.values())
    (output * torch.from_numpy(cotangent)).sum().backward()
    params = {name: param.grad.numpy().copy() for name, param in module.named_parameters()}
    stats = {k: v.numpy().copy() for k, v in module.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    return Results(output.detach().numpy(), {n: leaf.grad.numpy() for n, leaf in leaves.items()}, params, stats)


@functools.cache
def runner(case: Case) -> Callable[..., dict[str, tuple[Any, ...]]]:
    """One jitted function per case: ``(linen variables, NNX state, inputs, cotangent) -> {"linen": ..., "nnx":
    ...}``, each ``(output, input grads, param grads, batch stats)``. Both APIs in one program: XLA merges their
    identical computations, so it compiles in about the time of one (the DCNv3 block's fwd+bwd takes ~3 s); new
    variables of the same shapes reuse it."""
    layer = case.linen()
    graphdef = nnx.graphdef(case.nnx())
    kwargs = {"use_running_average": not case.train} if case.batch_norm else {}

    @jax.jit
    def run(variables: Any, state: Any, inputs: tuple[jax.Array, ...], cotangent: jax.Array) -> dict[str, Any]:
        def linen_loss(params: Any, inputs: tuple[jax.Array, ...]) -> tuple[jax.Array, tuple[jax.Array, Any]]:
            out, updates = layer.apply({**variables, "params": params}, *inputs, mutable=["batch_stats"], **kwargs)
            return jnp.sum(out * cotangent), (out, updates.get("batch_stats", {}))

        (param_grads, input_grads), (out, stats) = jax.grad(linen_loss, argnums=(0, 1), has_aux=True)(
            variables["params"], inputs
        )
        model = nnx.merge(graphdef, state)
        if case.batch_norm:
            model.train() if case.train else model.eval()

        def nnx_loss(model: Any, inputs: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
            out = model(*inputs)
            return jnp.sum(out * cotangent), out

        (nnx_params, nnx_inputs), nnx_out = nnx.grad(nnx_loss, argnums=(0, 1), has_aux=True)(model, inputs)
        nnx_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        return {
            "linen": (out, input_grads, param_grads, stats),
            "nnx": (nnx_out, nnx_inputs, nnx.to_pure_dict(nnx_params), nnx_stats),
        }

    return run


def as_results(case: Case, layer: Any, names: list[str], raw: tuple[Any, ...], parameter_names: set[str]) -> Results:
    """jdynconv's raw results in PyTorch's layouts and names (the linen layer's rules serve NNX's dicts too)."""
    out, input_grads, param_grads, stats = raw
    variables = {"params": param_grads} | ({"batch_stats": stats} if stats else {})
    state_dict = interop.linen_to_torch(layer, variables)
    return Results(
        _to_torch_layout(case, out),
        {name: _to_torch_layout(case, grad) for name, grad in zip(names, input_grads, strict=True)},
        {key: value for key, value in state_dict.items() if key in parameter_names},
        {key: value for key, value in state_dict.items() if key.endswith(("running_mean", "running_var"))},
    )


def check(actual: Results, expected: Results, label: str, assert_close: AssertClose) -> None:
    assert_close(actual.output, expected.output, f"{label}: output")
    assert actual.inputs.keys() == expected.inputs.keys()
    for name, value in expected.inputs.items():
        assert_close(actual.inputs[name], value, f"{label}: d/d {name}")
    assert actual.params.keys() == expected.params.keys(), label
    for key, value in expected.params.items():
        assert_close(actual.params[key], value, f"{label}: d/d {key}")
    for key, value in expected.stats.items():
        assert_close(actual.stats[key], value, f"{label}: {key}")


def _state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy().copy() for key, value in module.state_dict().items()}


def _random_like(tree: Any, rng: np.random.Generator, scale: float) -> Any:
    return jax.tree.map(lambda leaf: jnp.asarray((scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype)), tree)


def _run(case: Case, variables: Any, model: Any, inputs: dict[str, np.ndarray], cotangent: np.ndarray) -> dict:
    """jdynconv's results, linen and NNX, in PyTorch's layouts and names."""
    data = (tuple(_to_last(case, a) for a in inputs.values()), _to_last(case, cotangent))
    raw = runner(case)(variables, nnx.state(model), *data)
    names = set(dict(_perturbed(case, "names").named_parameters()))
    return {api: as_results(case, case.linen(), list(inputs), raw[api], names) for api in ("linen", "nnx")}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_torch_weights_in_jdynconv_and_back(case: Case, assert_close: AssertClose) -> None:
    """PyTorch's weights -> linen and NNX: output, every gradient; then random jdynconv weights -> PyTorch by a
    strict ``load_state_dict``: the same comparison."""
    inputs, cotangent = _arrays(case)
    module = _perturbed(case, "weights")
    state_dict = _state_dict(module)
    expected = torch_results(case, module, inputs, cotangent)
    layer = case.linen()
    variables = interop.torch_to_linen(layer, state_dict)
    model = interop.torch_to_nnx(case.nnx(), state_dict)
    for api, actual in _run(case, variables, model, inputs, cotangent).items():
        check(actual, expected, api, assert_close)

    # jdynconv -> PyTorch: random variables, exported, loaded strictly into a fresh module.
    variables = {**variables, "params": _random_like(variables["params"], _rng(case.name, "jdynconv"), 0.3)}
    exported = interop.linen_to_torch(layer, variables)
    assert exported.keys() == state_dict.keys()
    fresh = _perturbed(case, "fresh")
    missing, unexpected = fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    assert missing == unexpected == []
    fresh.train(case.train)
    expected = torch_results(case, fresh, inputs, cotangent)
    interop.torch_to_nnx(model, exported)
    round_trip = interop.nnx_to_torch(model)
    for key, value in exported.items():
        np.testing.assert_array_equal(round_trip[key], value, err_msg=key)
    for api, actual in _run(case, variables, model, inputs, cotangent).items():
        check(actual, expected, f"{api} -> torch", assert_close)


def test_mmcv_offset_channels_are_offsets_then_mask(assert_close: AssertClose) -> None:
    """mmcv's ``chunk(3)``/``cat`` is what the layer's split assumes: the first ``2 * G_off * K`` channels of
    ``conv_offset`` are the offsets in torchvision's order, the last ``G_off * K`` the mask logits. Zeroing the mask
    rows of ``conv_offset`` (mask ``sigmoid(0) = 0.5`` everywhere) halves the plain deformable conv with the first
    channels as offsets."""
    case = BY_NAME["mmcv_modulated_pack_groups_stride2"]
    module = _perturbed(case, "weights")
    taps = 2 * 9  # deform_groups * K
    with torch.no_grad():
        module.conv_offset.weight[2 * taps :] = 0.0
        module.conv_offset.bias[2 * taps :] = 0.0
        module.bias.zero_()
        x = torch.from_numpy(_rng(case.name, "mask").standard_normal(case.inputs["x"], dtype=np.float32))
        full = module(x).numpy()
        offset = module.conv_offset(x)[:, : 2 * taps]
        plain = modules.deform_conv2d(x, offset, module.weight, stride=2, padding=1).numpy()
    assert np.abs(plain).max() > 0.1
    assert_close(full, 0.5 * plain, "mask 0.5")


def test_dcnv3_batch_norm_running_var(assert_close: AssertClose) -> None:
    case = BY_NAME["dcnv3_batch_norm_train_dilation2_silu"]
    inputs, cotangent = _arrays(case)
    module = _perturbed(case, "weights")
    state_dict = _state_dict(module)
    layer = case.linen()
    expected = torch_results(case, module, inputs, cotangent)
    model = interop.torch_to_nnx(case.nnx(), state_dict)
    results = _run(case, interop.torch_to_linen(layer, state_dict), model, inputs, cotangent)
    key = "dw_conv.1.0.running_var"
    for api, actual in results.items():
        assert_close(actual.stats[key], expected.stats[key], f"{api}: {key}")
