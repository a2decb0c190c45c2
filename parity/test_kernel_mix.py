"""Parity of ``jdynconv`` CondConv and DynamicConv (linen and NNX) with their PyTorch references.

References (``parity/kernel_mix_models.py``):

* CondConv: timm's own ``CondConv2d`` (timm 1.0.31, imported without ``timm/__init__``), with its
  routing ``routing_fn`` (sigmoid of a Linear of the spatial mean, as timm's ``CondConvResidual``) or
  external ``routing_weights``. timm's ``padding='same'`` is TF's: symmetric where it can be done
  statically (odd kernel, stride 1), else dynamic with the odd extra pad at the end -- JAX's ``"SAME"``.
  Cases: stride 1 with dilation 2 (static), stride 2 on even and odd sizes (dynamic), an even kernel at
  stride 1 (dynamic), groups, no bias.
* DynamicConv: kaijieshi7's Dynamic Convolution layout (``Dynamic_conv{1,2,3}d``) in 1-D, 2-D and 3-D
  with stride, padding, dilation and groups, at temperatures 30, 4 and 1.

Every case runs in linen and in NNX, each with both jdynconv lowerings (``mixing="mix_kernels"`` and
``"mix_outputs"``), forward and gradients in one ``jax.jit``/``nnx.jit``-compiled function per
configuration. PyTorch weights go in through
``interop.torch_to_linen``/``torch_to_nnx``; jdynconv's gradients come out through
``interop.linen_to_torch``/``nnx_to_torch`` and are compared with PyTorch's ``.grad`` by PyTorch name;
jdynconv's own variables go into a fresh PyTorch layer by a strict ``load_state_dict``. PyTorch runs
channels-first, jdynconv channels-last (transposed here).

Tolerance, float32 on CPU: forward outputs and gradients (w.r.t. the input, the external routing weights
and every parameter) within ``RTOL = 1e-5`` relative plus ``1e-5 * max(1, max |reference|)`` absolute
(``conftest.py``).
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
from parity.kernel_mix_models import TIMM_FILE, TIMM_VERSION, DynamicConvNd, RoutedCondConv2d

AssertClose = Callable[[object, object, str], None]
MIXINGS = ("mix_kernels", "mix_outputs")
TEMPERATURES = (30.0, 4.0, 1.0)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """PyTorch on one thread: at these tiny shapes its intra-op threads only contend with XLA's for the
    2 cores (measured: the references ran 100x slower on 2 threads than on 1 on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rng(name: str, salt: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{name}/{salt}".encode()))


def make_inputs(name: str, shape: tuple[int, ...], salt: str = "x") -> np.ndarray:
    """Channels-first ``(B, C, *spatial)`` normal inputs plus a per-sample, per-channel offset, so that the
    pooled routing/attention inputs are O(1) and the samples' mixing weights differ."""
    rng = _rng(name, salt)
    offset = rng.standard_normal((*shape[:2], *(1,) * (len(shape) - 2)), dtype=np.float32)
    return rng.standard_normal(shape, dtype=np.float32) + offset


def channels_last(x: np.ndarray | torch.Tensor) -> jax.Array:
    return jnp.asarray(np.moveaxis(np.asarray(x), 1, -1))


def channels_first(y: jax.Array) -> np.ndarray:
    return np.moveaxis(np.asarray(y), -1, 1)


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy().copy() for key, value in model.state_dict().items()}


def load_strict(model: torch.nn.Module, state_dict: dict[str, np.ndarray]) -> None:
    result = model.load_state_dict({key: torch.from_numpy(value) for key, value in state_dict.items()}, strict=True)
    assert result.missing_keys == []
    assert result.unexpected_keys == []


@dataclasses.dataclass
class Results:
    """One forward and the gradients of ``sum(output * cotangent)``, all channels-first / PyTorch names."""

    output: np.ndarray
    params: dict[str, np.ndarray]
    inputs: np.ndarray
    routing: np.ndarray | None = None


def torch_results(
    model: torch.nn.Module, x: np.ndarray, cotangent: np.ndarray, routing: np.ndarray | None = None
) -> Results:
    """PyTorch's output and gradients; a parameter the output does not use (``routing_fn`` with external
    routing) has gradient zero."""
    x_leaf = torch.tensor(x, requires_grad=True)
    args = [] if routing is None else [torch.tensor(routing, requires_grad=True)]
    output = model(x_leaf, *args)
    (output * torch.from_numpy(cotangent)).sum().backward()
    params = {
        name: np.zeros(tuple(param.shape), np.float32) if param.grad is None else param.grad.numpy().copy()
        for name, param in model.named_parameters()
    }
    model.zero_grad()
    routing_grad = args[0].grad.numpy() if args else None
    return Results(output.detach().numpy(), params, x_leaf.grad.numpy(), routing_grad)


def assert_results_close(actual: Results, expected: Results, name: str, assert_close: AssertClose) -> None:
    assert_close(actual.output, expected.output, f"{name}: output")
    assert_close(actual.inputs, expected.inputs, f"{name}: d/d input")
    assert actual.params.keys() == expected.params.keys()
    for key, value in expected.params.items():
        assert_close(actual.params[key], value, f"{name}: d/d {key}")
    if expected.routing is not None:
        assert_close(actual.routing, expected.routing, f"{name}: d/d routing_weights")


def linen_results(module: Any, raw: tuple[Any, ...]) -> Results:
    """jdynconv linen ``(output, param grads, input grad[, routing grad])`` -> PyTorch layout and names."""
    output, grads, x_grad, *routing_grad = raw
    params = interop.linen_to_torch(module, {"params": grads})
    return Results(channels_first(output), params, channels_first(x_grad), *map(np.asarray, routing_grad))


def nnx_results(model: nnx.Module, raw: tuple[Any, ...]) -> Results:
    """jdynconv NNX ``(output, grad state, input grad[, routing grad])`` -> PyTorch layout and names."""
    output, grads, x_grad, *routing_grad = raw
    graphdef, _ = nnx.split(model)
    params = interop.nnx_to_torch(nnx.merge(graphdef, grads))
    return Results(channels_first(output), params, channels_first(x_grad), *map(np.asarray, routing_grad))


def runs(cases: tuple[Any, ...]) -> list[tuple[Any, str, str]]:
    """``(case, api, mixing)``: every case in linen and NNX, each with both lowerings."""
    return [(case, api, mixing) for case in cases for api in ("linen", "nnx") for mixing in MIXINGS]


def run_ids(cases: tuple[Any, ...]) -> list[str]:
    return [f"{case.name}-{api}-{mixing}" for case, api, mixing in runs(cases)]


def _random_like(tree: Any, rng: np.random.Generator) -> Any:
    """Normal values (scale 0.5) in the shapes and dtypes of ``tree``'s leaves: no bias is left at zero,
    so a misplaced bias or routing/attention bias shows."""
    return jax.tree.map(lambda leaf: jnp.asarray(0.5 * rng.standard_normal(leaf.shape).astype(leaf.dtype)), tree)


def random_linen_variables(module: Any, x: np.ndarray, salt: str) -> dict[str, Any]:
    """Random values in the tree ``module.init`` returns (its shapes from ``jax.eval_shape``: no compile)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct(channels_last(x).shape, jnp.float32))
    return _random_like(shapes, _rng(type(module).__name__, salt))


def randomised_nnx(model: nnx.Module, salt: str) -> nnx.Module:
    """An (abstract) NNX model with random values in its own ``nnx.Param`` variables."""
    nnx.update(model, _random_like(nnx.state(model, nnx.Param), _rng(type(model).__name__, salt)))
    return model


# --- CondConv vs timm's CondConv2d ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CondCase:
    """x ``(batch, in_channels, *size)`` through ``CondConv2d(kernel_size, stride, padding='same', dilation,
    groups)``."""

    name: str
    in_channels: int
    features: int
    num_experts: int
    kernel_size: int
    stride: int
    groups: int
    bias: bool
    batch: int
    size: tuple[int, int]
    dilation: int = 1

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.features, *(-(-s // self.stride) for s in self.size))


COND_CASES = (
    # Odd kernel at stride 1: timm pads statically and symmetrically (2 each side with dilation 2).
    CondCase(
        "k3_s1_dilation2",
        in_channels=4,
        features=6,
        num_experts=3,
        kernel_size=3,
        stride=1,
        groups=1,
        bias=True,
        batch=2,
        size=(6, 5),
        dilation=2,
    ),
    # Stride 2: timm pads dynamically; 8 rows need 1 pad (at the end), 7 columns need 2 (one each side).
    CondCase(
        "k3_s2_groups2",
        in_channels=4,
        features=6,
        num_experts=4,
        kernel_size=3,
        stride=2,
        groups=2,
        bias=True,
        batch=2,
        size=(8, 7),
    ),
    # Even kernel at stride 1: dynamic, the one pad at the end; no bias; grouped 3 -> 6 in 3 groups.
    CondCase(
        "k2_s1_groups3_no_bias",
        in_channels=3,
        features=6,
        num_experts=2,
        kernel_size=2,
        stride=1,
        groups=3,
        bias=False,
        batch=3,
        size=(5, 6),
    ),
)
COND_IDS = [case.name for case in COND_CASES]


def make_cond_torch(case: CondCase, seed: int = 0) -> RoutedCondConv2d:
    """timm's layer with timm's initialisation and a random routing bias."""
    torch.manual_seed(seed)
    model = RoutedCondConv2d(
        case.in_channels,
        case.features,
        kernel_size=case.kernel_size,
        stride=case.stride,
        dilation=case.dilation,
        padding="same",
        groups=case.groups,
        bias=case.bias,
        num_experts=case.num_experts,
    )
    with torch.no_grad():
        model.routing_fn.bias.uniform_(-1.0, 1.0)
    return model


def make_cond_linen(case: CondCase, mixing: str, **init: Any) -> jdc_linen.CondConv:
    return jdc_linen.CondConv(
        features=case.features,
        kernel_size=case.kernel_size,
        num_experts=case.num_experts,
        strides=case.stride,
        kernel_dilation=case.dilation,
        padding="SAME",
        feature_group_count=case.groups,
        use_bias=case.bias,
        mixing=mixing,
        **init,
    )


def make_cond_nnx(case: CondCase, mixing: str, *, abstract: bool = True, **init: Any) -> jdc_nnx.CondConv:
    """The NNX twin; abstract (``nnx.eval_shape``) for ``torch_to_nnx`` to fill, skipping the initialisers."""

    def build() -> jdc_nnx.CondConv:
        return jdc_nnx.CondConv(
            case.in_channels,
            case.features,
            (case.kernel_size,) * 2,
            case.num_experts,
            strides=case.stride,
            kernel_dilation=case.dilation,
            padding="SAME",
            feature_group_count=case.groups,
            use_bias=case.bias,
            mixing=mixing,
            rngs=nnx.Rngs(0),
            **init,
        )

    return nnx.eval_shape(build) if abstract else build()


@functools.partial(jax.jit, static_argnums=0)
def _linen_cond(
    module: jdc_linen.CondConv, params: dict[str, Any], x: jax.Array, routing: jax.Array, cotangent: jax.Array
) -> dict[str, tuple[Any, ...]]:
    """Built-in and external routing: outputs, and grads w.r.t. params, x (and the routing weights)."""

    def loss(params: dict[str, Any], x: jax.Array, *routing: jax.Array) -> tuple[jax.Array, jax.Array]:
        y = module.apply({"params": params}, x, *routing)
        return jnp.sum(y * cotangent), y

    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    (_, y_ext), grads_ext = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, x, routing)
    return {"builtin": (y, *grads), "external": (y_ext, *grads_ext)}


@nnx.jit
def _nnx_cond(
    model: jdc_nnx.CondConv, x: jax.Array, routing: jax.Array, cotangent: jax.Array
) -> dict[str, tuple[Any, ...]]:
    def loss(model: jdc_nnx.CondConv, x: jax.Array, *routing: jax.Array) -> tuple[jax.Array, jax.Array]:
        y = model(x, *routing)
        return jnp.sum(y * cotangent), y

    (_, y), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
    (_, y_ext), grads_ext = nnx.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(model, x, routing)
    return {"builtin": (y, *grads), "external": (y_ext, *grads_ext)}


def cond_data(case: CondCase) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, external routing weights in (0, 1) and a cotangent of the output's shape."""
    x = make_inputs(case.name, (case.batch, case.in_channels, *case.size))
    routing = _rng(case.name, "routing").uniform(0.0, 1.0, (case.batch, case.num_experts)).astype(np.float32)
    cotangent = _rng(case.name, "cotangent").standard_normal(case.output_shape, dtype=np.float32)
    return x, routing, cotangent


def cond_expected(model: RoutedCondConv2d, case: CondCase) -> dict[str, Results]:
    x, routing, cotangent = cond_data(case)
    expected = {"builtin": torch_results(model, x, cotangent), "external": torch_results(model, x, cotangent, routing)}
    assert expected["builtin"].output.shape == case.output_shape
    return expected


def check_cond_linen(
    module: jdc_linen.CondConv, variables: dict[str, Any], expected: dict[str, Results], case: CondCase, name: str,
    assert_close: AssertClose,
) -> None:  # fmt: skip
    x, routing, cotangent = cond_data(case)
    raw = _linen_cond(module, variables["params"], channels_last(x), jnp.asarray(routing), channels_last(cotangent))
    for mode in ("builtin", "external"):
        assert_results_close(linen_results(module, raw[mode]), expected[mode], f"{name}, {mode}", assert_close)


def check_cond_nnx(
    model: jdc_nnx.CondConv, expected: dict[str, Results], case: CondCase, name: str, assert_close: AssertClose
) -> None:
    x, routing, cotangent = cond_data(case)
    raw = _nnx_cond(model, channels_last(x), jnp.asarray(routing), channels_last(cotangent))
    for mode in ("builtin", "external"):
        assert_results_close(nnx_results(model, raw[mode]), expected[mode], f"{name}, {mode}", assert_close)


def test_timm_is_the_real_one() -> None:
    """The reference is the installed timm's ``CondConv2d``, at the version the docstrings cite."""
    import importlib.metadata

    assert importlib.metadata.version("timm") == TIMM_VERSION
    assert TIMM_FILE.replace("\\", "/").endswith("timm/layers/cond_conv2d.py")
    assert RoutedCondConv2d.__mro__[1].__module__ == "timm.layers.cond_conv2d"


@pytest.mark.parametrize(("case", "api", "mixing"), runs(COND_CASES), ids=run_ids(COND_CASES))
def test_cond_conv_torch_weights(case: CondCase, api: str, mixing: str, assert_close: AssertClose) -> None:
    """timm weights -> linen or NNX: outputs and every gradient, built-in and external routing."""
    model = make_cond_torch(case)
    state_dict = state_dict_numpy(model)
    expected = cond_expected(model, case)
    if api == "linen":
        module = make_cond_linen(case, mixing)
        check_cond_linen(module, interop.torch_to_linen(module, state_dict), expected, case, api, assert_close)
    else:
        check_cond_nnx(interop.torch_to_nnx(make_cond_nnx(case, mixing), state_dict), expected, case, api, assert_close)


@pytest.mark.parametrize("case", COND_CASES, ids=COND_IDS)
def test_cond_conv_jdynconv_weights_in_timm(case: CondCase, assert_close: AssertClose) -> None:
    """linen and NNX variables -> timm's layer by a strict ``load_state_dict``: same outputs and gradients."""
    x = make_inputs(case.name, (case.batch, case.in_channels, *case.size))
    module = make_cond_linen(case, "mix_kernels")
    variables = random_linen_variables(module, x, "linen variables")
    model = make_cond_torch(case, seed=1)
    load_strict(model, interop.linen_to_torch(module, variables))
    check_cond_linen(module, variables, cond_expected(model, case), case, "linen -> timm", assert_close)

    nnx_model = randomised_nnx(make_cond_nnx(case, "mix_kernels"), case.name)
    model = make_cond_torch(case, seed=2)
    load_strict(model, interop.nnx_to_torch(nnx_model))
    check_cond_nnx(nnx_model, cond_expected(model, case), case, "nnx -> timm", assert_close)


# --- DynamicConv vs the Dynamic Convolution reference --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DynCase:
    """x ``(batch, in_channels, *size)`` through ``Dynamic_conv{N}d(kernel_size, stride, padding, dilation,
    groups, K=num_experts)``, N = ``len(kernel_size)``."""

    name: str
    in_channels: int
    features: int
    num_experts: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    batch: int
    size: tuple[int, ...]
    ratio: float = 0.25

    @property
    def output_shape(self) -> tuple[int, ...]:
        out = (
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, k, s, p, d in zip(self.size, self.kernel_size, self.stride, self.padding, self.dilation, strict=True)
        )
        return (self.batch, self.features, *out)


DYN_CASES = (
    DynCase(
        "1d",
        in_channels=4,
        features=6,
        num_experts=4,
        kernel_size=(3,),
        stride=(1,),
        padding=(1,),
        dilation=(1,),
        groups=1,
        bias=True,
        batch=3,
        size=(9,),
    ),
    DynCase(
        "2d_stride2_groups2",
        in_channels=4,
        features=4,
        num_experts=3,
        kernel_size=(3, 3),
        stride=(2, 2),
        padding=(1, 1),
        dilation=(1, 1),
        groups=2,
        bias=True,
        batch=2,
        size=(7, 8),
        ratio=0.5,
    ),
    DynCase(
        "3d_dilation_no_bias",
        in_channels=2,
        features=4,
        num_experts=2,
        kernel_size=(2, 3, 3),
        stride=(1, 1, 2),
        padding=(0, 1, 2),
        dilation=(1, 1, 2),
        groups=1,
        bias=False,
        batch=2,
        size=(3, 4, 6),
    ),
)
DYN_IDS = [case.name for case in DYN_CASES]


def make_dyn_torch(case: DynCase, seed: int = 0) -> DynamicConvNd:
    """The reference with its initialisation; the attention bias random, so T = 1 is far from uniform."""
    torch.manual_seed(seed)
    model = DynamicConvNd(
        case.in_channels,
        case.features,
        case.kernel_size,
        ratio=case.ratio,
        stride=case.stride,
        padding=case.padding,
        dilation=case.dilation,
        groups=case.groups,
        bias=case.bias,
        K=case.num_experts,
    )
    with torch.no_grad():
        model.attention.fc2.bias.uniform_(-2.0, 2.0)
    return model


def make_dyn_linen(case: DynCase, mixing: str, **init: Any) -> jdc_linen.DynamicConv:
    return jdc_linen.DynamicConv(
        features=case.features,
        kernel_size=case.kernel_size,
        num_experts=case.num_experts,
        ratio=case.ratio,
        strides=case.stride,
        padding=case.padding,
        kernel_dilation=case.dilation,
        feature_group_count=case.groups,
        use_bias=case.bias,
        mixing=mixing,
        **init,
    )


def make_dyn_nnx(case: DynCase, mixing: str, *, abstract: bool = True, **init: Any) -> jdc_nnx.DynamicConv:
    def build() -> jdc_nnx.DynamicConv:
        return jdc_nnx.DynamicConv(
            case.in_channels,
            case.features,
            case.kernel_size,
            case.num_experts,
            ratio=case.ratio,
            strides=case.stride,
            padding=case.padding,
            kernel_dilation=case.dilation,
            feature_group_count=case.groups,
            use_bias=case.bias,
            mixing=mixing,
            rngs=nnx.Rngs(0),
            **init,
        )

    return nnx.eval_shape(build) if abstract else build()


@functools.partial(jax.jit, static_argnums=0)
def _linen_dyn(
    module: jdc_linen.DynamicConv, params: dict[str, Any], x: jax.Array, temperature: jax.Array, cotangent: jax.Array
) -> tuple[Any, ...]:
    """Output and grads w.r.t. params and x; ``temperature`` is traced: one compilation for all of them."""

    def loss(params: dict[str, Any], x: jax.Array) -> tuple[jax.Array, jax.Array]:
        y = module.apply({"params": params}, x, temperature)
        return jnp.sum(y * cotangent), y

    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return (y, *grads)


@nnx.jit
def _nnx_dyn(model: jdc_nnx.DynamicConv, x: jax.Array, temperature: jax.Array, cotangent: jax.Array) -> tuple[Any, ...]:
    def loss(model: jdc_nnx.DynamicConv, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        y = model(x, temperature=temperature)
        return jnp.sum(y * cotangent), y

    (_, y), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
    return (y, *grads)


def dyn_data(case: DynCase) -> tuple[np.ndarray, np.ndarray]:
    x = make_inputs(case.name, (case.batch, case.in_channels, *case.size))
    return x, _rng(case.name, "cotangent").standard_normal(case.output_shape, dtype=np.float32)


def dyn_expected(model: DynamicConvNd, case: DynCase) -> dict[float, Results]:
    """The reference at each temperature (PyTorch keeps it as module state)."""
    x, cotangent = dyn_data(case)
    expected = {}
    for temperature in TEMPERATURES:
        model.attention.temperature = temperature
        expected[temperature] = torch_results(model, x, cotangent)
    assert expected[1.0].output.shape == case.output_shape
    return expected


def check_dyn(
    run: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], Results],
    expected: dict[float, Results],
    case: DynCase,
    name: str,
    assert_close: AssertClose,
) -> None:
    x, cotangent = dyn_data(case)
    for temperature, reference in expected.items():
        actual = run(channels_last(x), jnp.float32(temperature), channels_last(cotangent))
        assert_results_close(actual, reference, f"{name}, temperature {temperature}", assert_close)


def check_dyn_linen(module: jdc_linen.DynamicConv, variables: dict[str, Any], *args: Any) -> None:
    check_dyn(lambda *data: linen_results(module, _linen_dyn(module, variables["params"], *data)), *args)


def check_dyn_nnx(model: jdc_nnx.DynamicConv, *args: Any) -> None:
    check_dyn(lambda *data: nnx_results(model, _nnx_dyn(model, *data)), *args)


def test_the_temperatures_matter() -> None:
    """The attention is near-uniform at T = 30 and far from it at T = 1, so the cases test both regimes."""
    case = DYN_CASES[0]
    model = make_dyn_torch(case)
    x = torch.from_numpy(dyn_data(case)[0])
    spread = {}
    for temperature in (30.0, 1.0):
        model.attention.temperature = temperature
        with torch.no_grad():
            attention = model.attention(x).numpy()
        spread[temperature] = float(attention.max() - attention.min())
    assert spread[30.0] < 0.1 < 0.5 < spread[1.0], spread


@pytest.mark.parametrize(("case", "api", "mixing"), runs(DYN_CASES), ids=run_ids(DYN_CASES))
def test_dynamic_conv_torch_weights(case: DynCase, api: str, mixing: str, assert_close: AssertClose) -> None:
    """Reference weights -> linen or NNX: outputs and every gradient at temperatures 30, 4 and 1."""
    model = make_dyn_torch(case)
    state_dict = state_dict_numpy(model)
    expected = dyn_expected(model, case)
    if api == "linen":
        module = make_dyn_linen(case, mixing)
        check_dyn_linen(module, interop.torch_to_linen(module, state_dict), expected, case, api, assert_close)
    else:
        check_dyn_nnx(interop.torch_to_nnx(make_dyn_nnx(case, mixing), state_dict), expected, case, api, assert_close)


@pytest.mark.parametrize("case", DYN_CASES, ids=DYN_IDS)
def test_dynamic_conv_jdynconv_weights_in_torch(case: DynCase, assert_close: AssertClose) -> None:
    """linen and NNX variables -> the reference by a strict ``load_state_dict``: same outputs and gradients."""
    x = make_inputs(case.name, (case.batch, case.in_channels, *case.size))
    module = make_dyn_linen(case, "mix_kernels")
    variables = random_linen_variables(module, x, "linen variables")
    model = make_dyn_torch(case, seed=1)
    load_strict(model, interop.linen_to_torch(module, variables))
    check_dyn_linen(module, variables, dyn_expected(model, case), case, "linen -> torch", assert_close)

    nnx_model = randomised_nnx(make_dyn_nnx(case, "mix_kernels"), case.name)
    model = make_dyn_torch(case, seed=2)
    load_strict(model, interop.nnx_to_torch(nnx_model))
    check_dyn_nnx(nnx_model, dyn_expected(model, case), case, "nnx -> torch", assert_close)
