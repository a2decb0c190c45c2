"""Parity of ``jdynconv`` ODConv (linen and NNX) with the original PyTorch ``ODConv2d``.

Reference: ``parity/odconv_reference.py``, the original ``modules/odconv.py`` of OSVAI/ODConv (commit
0901cc1ccd75757b40420447db20603d30bd2f74) written out line by line, N-d through ``num_spatial`` (2-D: the
original's code path exactly). Cases: 3x3 and 1x1 kernels with 1 and 4 experts (1x1 with one expert is the
original's ``_forward_impl_pw1x``, a shared conv), groups with stride 2, depthwise (no filter attention),
dilation, 1-D; each at temperatures 30, 4 and 1, in train mode (BatchNorm batch statistics, running statistics
updated as PyTorch's: ``momentum=0.9``, ``unbiased_running_var=True``) and in eval mode (random running
statistics). ``attention_placement="auto"`` scales the activations in the 3x3 4- and 1-expert and 1-D cases
and folds into the kernel in the 1x1 4-expert, depthwise and grouped ones (the channel attention there), so
both placements meet the original.

PyTorch weights go in through ``interop.torch_to_linen``/``torch_to_nnx``; jdynconv's gradients come out
through ``interop.linen_to_torch`` and are compared with PyTorch's ``.grad`` by PyTorch name; jdynconv's own
variables go into a fresh PyTorch layer by a strict ``load_state_dict``. Compared: the output, the gradients of
``sum(output * cotangent)`` w.r.t. the input and every parameter, and in train mode the updated running mean
and variance, each within ``RTOL`` (``conftest.py``). One jitted function per case and API serves every
temperature (traced) and both modes.

Batch 6: the gradients through a train-mode BatchNorm of a few samples cancel; with 3 samples, PyTorch and
jdynconv each drifted up to 4e-6 (relative to the largest value) from a float64 PyTorch run at the attention's
first 1x1 conv, 8e-6 apart; with 6, the largest difference is 2.3e-6.
"""

from __future__ import annotations

import dataclasses
import functools
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
from parity.odconv_reference import ODConvNd

AssertClose = Callable[[object, object, str], None]
TEMPERATURES = (30.0, 4.0, 1.0)
MODES = ("eval", "train")
RUNNING_STATS = ("attention.bn.running_mean", "attention.bn.running_var")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """PyTorch on one thread: at these tiny shapes its threads only contend with XLA's (as test_kernel_mix)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclasses.dataclass(frozen=True)
class Case:
    """x ``(batch, in_channels, *size)`` through ``ODConvNd(in_channels, features, kernel_size, stride, padding,
    dilation, groups, kernel_num=num_experts, num_spatial=len(size))``; ``nnx``: also run the NNX layer."""

    name: str
    in_channels: int
    features: int
    kernel_size: int
    num_experts: int
    padding: int = 0
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    size: tuple[int, ...] = (6, 5)
    batch: int = 6
    nnx: bool = False

    @property
    def output_shape(self) -> tuple[int, ...]:
        effective = self.dilation * (self.kernel_size - 1) + 1
        out = tuple((s + 2 * self.padding - effective) // self.stride + 1 for s in self.size)
        return (self.batch, self.features, *out)


CASES = (
    Case("3x3_k4", 8, 6, 3, 4, padding=1, nnx=True),
    Case("1x1_k1_pw1x", 8, 6, 1, 1, nnx=True),
    Case("1x1_k4", 8, 6, 1, 4),
    Case("3x3_k1_dilation2", 8, 6, 3, 1, padding=2, dilation=2),
    Case("3x3_k4_groups2_stride2", 8, 8, 3, 4, padding=1, stride=2, groups=2, size=(8, 7)),
    Case("3x3_k4_depthwise", 8, 8, 3, 4, padding=1, groups=8),
    Case("1d_k3_k4", 8, 6, 3, 4, padding=1, size=(9,)),
)


def _rng(case: Case, salt: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"odconv/{case.name}/{salt}".encode()))


def make_torch(case: Case, seed: int = 0) -> ODConvNd:
    """The reference with its own initialisation; BatchNorm and the heads' biases randomised (PyTorch starts them
    at 1 and 0), so a swapped or dropped tensor cannot go unnoticed."""
    torch.manual_seed(seed)
    model = ODConvNd(
        case.in_channels,
        case.features,
        case.kernel_size,
        stride=case.stride,
        padding=case.padding,
        dilation=case.dilation,
        groups=case.groups,
        kernel_num=case.num_experts,
        num_spatial=len(case.size),
    )
    with torch.no_grad():
        for name, param in model.attention.named_parameters():
            if name.endswith("bias") and not name.startswith("bn"):
                param.uniform_(-1.0, 1.0)
        model.attention.bn.weight.uniform_(0.5, 1.5)
        model.attention.bn.bias.uniform_(-0.5, 0.5)
        model.attention.bn.running_mean.uniform_(-0.5, 0.5)
        model.attention.bn.running_var.uniform_(0.5, 2.0)
    return model


def make_linen(case: Case) -> jdc_linen.ODConv:
    return jdc_linen.ODConv(
        features=case.features,
        kernel_size=case.kernel_size,
        num_experts=case.num_experts,
        strides=case.stride,
        padding=case.padding,
        kernel_dilation=case.dilation,
        feature_group_count=case.groups,
        momentum=0.9,
        unbiased_running_var=True,
    )


def make_nnx(case: Case) -> jdc_nnx.ODConv:
    """Abstract (``nnx.eval_shape``), to be filled: no initialiser runs."""
    return nnx.eval_shape(
        lambda: jdc_nnx.ODConv(
            case.in_channels,
            case.features,
            (case.kernel_size,) * len(case.size),
            case.num_experts,
            strides=case.stride,
            padding=case.padding,
            kernel_dilation=case.dilation,
            feature_group_count=case.groups,
            momentum=0.9,
            unbiased_running_var=True,
            rngs=nnx.Rngs(0),
        )
    )


def data(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """Channels-first inputs (normal plus a per-sample, per-channel offset, so the pooled descriptors are O(1) and
    differ per sample) and a cotangent of the output's shape."""
    rng = _rng(case, "x")
    shape = (case.batch, case.in_channels, *case.size)
    x = rng.standard_normal(shape, dtype=np.float32) + rng.standard_normal(
        (*shape[:2], *(1,) * len(case.size)), dtype=np.float32
    )
    return x, _rng(case, "cotangent").standard_normal(case.output_shape, dtype=np.float32)


def channels_last(x: np.ndarray) -> jax.Array:
    return jnp.asarray(np.moveaxis(x, 1, -1))


def channels_first(y: Any) -> np.ndarray:
    return np.moveaxis(np.asarray(y), -1, 1)


@dataclasses.dataclass
class Results:
    """One mode at one temperature, channels-first and by PyTorch name; ``stats``: the new running statistics."""

    output: np.ndarray
    inputs: np.ndarray
    params: dict[str, np.ndarray]
    stats: dict[str, np.ndarray]


def torch_expected(model: ODConvNd, case: Case) -> dict[tuple[float, str], Results]:
    """The reference at every temperature and mode, each from the same initial state (a train-mode forward
    updates the running statistics)."""
    x, cotangent = data(case)
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    expected = {}
    for temperature in TEMPERATURES:
        for mode in MODES:
            model.load_state_dict(initial)
            model.update_temperature(temperature)
            model.train(mode == "train")
            x_leaf = torch.tensor(x, requires_grad=True)
            output = model(x_leaf)
            (output * torch.from_numpy(cotangent)).sum().backward()
            params = {name: param.grad.numpy().copy() for name, param in model.named_parameters()}
            model.zero_grad()
            stats = {key: model.state_dict()[key].numpy().copy() for key in RUNNING_STATS}
            expected[temperature, mode] = Results(output.detach().numpy(), x_leaf.grad.numpy(), params, stats)
    model.load_state_dict(initial)
    assert expected[1.0, "eval"].output.shape == case.output_shape
    # The temperatures matter: near-uniform attentions at 30, far from them at 1.
    spread = np.abs(expected[30.0, "eval"].output - expected[1.0, "eval"].output).max()
    assert spread > 0.1 * np.abs(expected[1.0, "eval"].output).max()
    return expected


@functools.partial(jax.jit, static_argnums=0)
def _linen_run(
    module: jdc_linen.ODConv, variables: dict[str, Any], x: jax.Array, temperature: jax.Array, cotangent: jax.Array
) -> dict[str, tuple[Any, ...]]:
    """Per mode: output, gradients w.r.t. params and x, and the batch statistics after the call."""

    def loss(params: Any, x: jax.Array, train: bool) -> tuple[jax.Array, tuple[jax.Array, Any]]:
        y, updates = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            temperature,
            use_running_average=not train,
            mutable=["batch_stats"],
        )
        return jnp.sum(y * cotangent), (y, updates["batch_stats"])

    results = {}
    for mode in MODES:
        grad = jax.value_and_grad(functools.partial(loss, train=mode == "train"), argnums=(0, 1), has_aux=True)
        (_, (y, stats)), (param_grads, x_grad) = grad(variables["params"], x)
        results[mode] = (y, param_grads, x_grad, stats)
    return results


@functools.partial(jax.jit, static_argnums=0)
def _nnx_run(
    graphdef: Any, params: Any, stats: Any, x: jax.Array, temperature: jax.Array, cotangent: jax.Array
) -> dict[str, tuple[Any, ...]]:
    """As :func:`_linen_run`, for an NNX model split into its graph, parameters and statistics."""
    results = {}
    for mode in MODES:
        model = nnx.merge(graphdef, params, stats)

        def loss(model: jdc_nnx.ODConv, x: jax.Array, train: bool = mode == "train") -> tuple[jax.Array, jax.Array]:
            y = model(x, temperature, use_running_average=not train)
            return jnp.sum(y * cotangent), y

        (_, y), (param_grads, x_grad) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
        new_stats = nnx.state(model, nnx.BatchStat)
        results[mode] = (y, nnx.to_pure_dict(param_grads), x_grad, nnx.to_pure_dict(new_stats))
    return results


def as_results(module: jdc_linen.ODConv, raw: tuple[Any, ...], parameter_names: set[str]) -> Results:
    """jdynconv's ``(output, param grads, input grad, batch stats)`` -> PyTorch layout and names (the linen
    module's rules serve the NNX dicts too: same variable names)."""
    output, param_grads, x_grad, stats = raw
    state_dict = interop.linen_to_torch(module, {"params": param_grads, "batch_stats": stats})
    params = {key: value for key, value in state_dict.items() if key in parameter_names}
    return Results(channels_first(output), channels_first(x_grad), params, {k: state_dict[k] for k in RUNNING_STATS})


def check(
    run: Callable[[jax.Array, jax.Array, jax.Array], dict[str, tuple[Any, ...]]],
    module: jdc_linen.ODConv,
    expected: dict[tuple[float, str], Results],
    case: Case,
    name: str,
    assert_close: AssertClose,
) -> None:
    x, cotangent = data(case)
    parameter_names = set(expected[1.0, "eval"].params)
    for temperature in TEMPERATURES:
        raw = run(channels_last(x), jnp.float32(temperature), channels_last(cotangent))
        for mode in MODES:
            actual = as_results(module, raw[mode], parameter_names)
            reference = expected[temperature, mode]
            label = f"{name}, T={temperature}, {mode}"
            assert_close(actual.output, reference.output, f"{label}: output")
            assert_close(actual.inputs, reference.inputs, f"{label}: d/d input")
            assert actual.params.keys() == reference.params.keys()
            for key, value in reference.params.items():
                assert_close(actual.params[key], value, f"{label}: d/d {key}")
            for key in RUNNING_STATS:
                assert_close(actual.stats[key], reference.stats[key], f"{label}: {key}")


def run_linen(module: jdc_linen.ODConv, variables: dict[str, Any]) -> Callable[..., dict[str, tuple[Any, ...]]]:
    return lambda *data: _linen_run(module, variables, *data)


def run_nnx(model: jdc_nnx.ODConv) -> Callable[..., dict[str, tuple[Any, ...]]]:
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return lambda *data: _nnx_run(graphdef, params, stats, *data)


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy().copy() for key, value in model.state_dict().items()}


def load_strict(model: torch.nn.Module, state_dict: dict[str, np.ndarray]) -> None:
    result = model.load_state_dict({key: torch.from_numpy(value) for key, value in state_dict.items()}, strict=True)
    assert result.missing_keys == result.unexpected_keys == []


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_torch_weights_in_jdynconv(case: Case, assert_close: AssertClose) -> None:
    """The reference's weights -> linen (and NNX): outputs, every gradient and the running statistics, at
    temperatures 30, 4 and 1, train and eval."""
    model = make_torch(case)
    expected = torch_expected(model, case)
    state_dict = state_dict_numpy(model)
    module = make_linen(case)
    check(run_linen(module, interop.torch_to_linen(module, state_dict)), module, expected, case, "linen", assert_close)
    if case.nnx:
        nnx_model = interop.torch_to_nnx(make_nnx(case), state_dict)
        check(run_nnx(nnx_model), module, expected, case, "nnx", assert_close)


def _random_like(tree: Any, rng: np.random.Generator) -> Any:
    """Normal values (scale 0.5) in ``tree``'s shapes and dtypes: no bias or BatchNorm offset left at zero."""
    return jax.tree.map(lambda leaf: jnp.asarray(0.5 * rng.standard_normal(leaf.shape).astype(leaf.dtype)), tree)


@pytest.mark.parametrize("case", [case for case in CASES if case.nnx], ids=[case.name for case in CASES if case.nnx])
def test_jdynconv_weights_in_torch(case: Case, assert_close: AssertClose) -> None:
    """Random linen and NNX variables -> the reference by a strict ``load_state_dict``: same results."""
    module = make_linen(case)
    x, _ = data(case)
    shapes = jax.eval_shape(
        functools.partial(module.init, use_running_average=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct(channels_last(x).shape, jnp.float32),
    )
    variables = _random_like(shapes, _rng(case, "linen"))
    variables["batch_stats"]["var"] = 1.0 + jnp.abs(variables["batch_stats"]["var"])
    model = make_torch(case, seed=1)
    load_strict(model, interop.linen_to_torch(module, variables))
    check(run_linen(module, variables), module, torch_expected(model, case), case, "linen -> torch", assert_close)

    nnx_model = make_nnx(case)
    nnx.update(nnx_model, _random_like(nnx.state(nnx_model, nnx.Param), _rng(case, "nnx")))
    nnx.update(nnx_model, jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), nnx.state(nnx_model, nnx.BatchStat)))
    model = make_torch(case, seed=2)
    load_strict(model, interop.nnx_to_torch(nnx_model))
    check(run_nnx(nnx_model), module, torch_expected(model, case), case, "nnx -> torch", assert_close)
