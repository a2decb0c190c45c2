"""Parity of jdynconv's LightweightConv and DynamicLightweightConv (linen and NNX) with fairseq's
``LightweightConv1dTBC`` and ``DynamicConv1dTBC``, written line by line in ``parity/lightconv_reference.py``.

Each case builds the fairseq module, perturbs every parameter, and ports it with ``interop.from_torch`` (which
reads every setting off the module, ``time_major=True``). Compared within ``RTOL`` (``conftest.py``): the output and
the gradients of ``sum(out * cotangent)`` w.r.t. the input, the query and every parameter (jdynconv's named by
PyTorch key through ``interop.linen_to_torch``), on fairseq's default path (the band matrix, ``T <= 512``) and, where
they agree, its unfold path; incremental decoding step by step against fairseq's incremental state; DropConnect
with one shared mask (jdynconv's own, read back from the ``kernels`` it sows, handed to the reference's
``MaskedDropout`` in the shape each path drops); and the one case where fairseq's two paths differ (a causal ``K >
T`` with ``weight_softmax``), where jdynconv follows the band path.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jdynconv import interop
from parity.lightconv_reference import DynamicConv1dTBC, LightweightConv1dTBC

AssertClose = Callable[[object, object, str], None]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], torch.nn.Module]
    length: int = 7
    batch: int = 2
    query_size: int | None = None  # a separate query of this many features


CASES = (
    Case("light_same_softmax_bias", lambda: LightweightConv1dTBC(8, 3, 1, 2, weight_softmax=True, bias=True)),
    Case("light_causal_k_gt_t", lambda: LightweightConv1dTBC(6, 5, 4, 3), length=4),
    Case("light_even_k_padding0", lambda: LightweightConv1dTBC(4, 4, 0, 1, bias=True)),
    Case(
        "dynamic_causal_query_biases",
        lambda: DynamicConv1dTBC(8, 3, 2, 2, weight_softmax=True, bias=True, conv_bias=True, query_size=6),
        query_size=6,
    ),
    Case(
        "dynamic_renorm_even_k",
        lambda: DynamicConv1dTBC(6, 4, 1, 3, weight_softmax=True, renorm_padding=True),
        length=5,
    ),
    Case("dynamic_in_proj_k_gt_t", lambda: DynamicConv1dTBC(4, 7, 6, 2, weight_softmax=True, in_proj=True), length=5),
    Case("dynamic_plain", lambda: DynamicConv1dTBC(8, 5, 2, 4, conv_bias=True)),
    Case(
        "dynamic_renorm_causal",
        lambda: DynamicConv1dTBC(6, 4, 3, 3, weight_softmax=True, renorm_padding=True),
        length=5,
    ),
)
BY_NAME = {case.name: case for case in CASES}


def _rng(name: str, salt: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"lightconv/{name}/{salt}".encode()))


def _module(case: Case) -> torch.nn.Module:
    """The fairseq module with every parameter drawn anew (its biases start at 0)."""
    torch.manual_seed(0)
    module = case.make()
    rng = _rng(case.name, "weights")
    with torch.no_grad():
        for _, value in module.named_parameters():
            value.copy_(torch.from_numpy(rng.normal(0.0, 0.5, value.shape).astype(np.float32)))
    return module.eval()


def _arrays(case: Case, module: torch.nn.Module) -> dict[str, np.ndarray]:
    rng = _rng(case.name, "inputs")
    arrays = {"x": rng.standard_normal((case.length, case.batch, module.input_size), dtype=np.float32)}
    if case.query_size is not None:
        arrays["query"] = rng.standard_normal((case.length, case.batch, case.query_size), dtype=np.float32)
    arrays["cotangent"] = rng.standard_normal(arrays["x"].shape, dtype=np.float32)
    return arrays


def _torch(module: torch.nn.Module, arrays: dict[str, np.ndarray], **kwargs: Any) -> dict[str, np.ndarray]:
    """fairseq's output and gradients, by name (``x``, ``query``, parameter keys)."""
    module.zero_grad()
    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in arrays.items() if k != "cotangent"}
    out = module(leaves["x"], query=leaves["query"], **kwargs) if "query" in leaves else module(leaves["x"], **kwargs)
    (out * torch.from_numpy(arrays["cotangent"])).sum().backward()
    results = {"output": out.detach().numpy()} | {k: leaf.grad.numpy() for k, leaf in leaves.items()}
    return results | {k: p.grad.numpy().copy() for k, p in module.named_parameters()}


def _jdynconv(module: torch.nn.Module, arrays: dict[str, np.ndarray], api: str, rng: Any = None) -> dict[str, Any]:
    """jdynconv's output and gradients by the same names, and the kernels it sowed (after dropout)."""
    x = jnp.asarray(arrays["x"])
    query = jnp.asarray(arrays["query"]) if "query" in arrays else None
    cotangent = jnp.asarray(arrays["cotangent"])
    deterministic = rng is None
    if api == "linen":
        layer, variables = interop.from_torch(module)
        rngs = {} if rng is None else {"dropout": rng}

        def loss(params: Any, x: jax.Array, query: Any) -> tuple[jax.Array, Any]:
            out, sown = (
                layer.apply(
                    {"params": params}, x, query, deterministic=deterministic, rngs=rngs, mutable=["intermediates"]
                )
                if query is not None
                else layer.apply(
                    {"params": params}, x, deterministic=deterministic, rngs=rngs, mutable=["intermediates"]
                )
            )
            return jnp.sum(out * cotangent), (out, sown["intermediates"]["kernels"][0])

        (grads, dx, dq), (out, kernels) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(
            variables["params"], x, query
        )
        state_dict = interop.linen_to_torch(layer, {"params": grads})
    else:
        model = interop.from_torch(module, api="nnx", rngs=nnx.Rngs(0, dropout=rng if rng is not None else 0))
        model.train() if rng is not None else model.eval()

        def nnx_loss(model: Any, x: jax.Array, query: Any) -> tuple[jax.Array, Any]:
            out = model(x, query) if query is not None else model(x)
            return jnp.sum(out * cotangent), out

        (grads, dx, dq), out = nnx.jit(nnx.grad(nnx_loss, argnums=(0, 1, 2), has_aux=True))(model, x, query)
        kernels = None
        nnx.update(model, grads)  # the model now holds its gradients, named by PyTorch key below
        state_dict = interop.nnx_to_torch(model)
    results = {"output": out, "x": dx, "kernels": kernels} | dict(state_dict)
    if query is not None:
        results["query"] = dq
    return results


def _compare(actual: dict[str, Any], expected: dict[str, np.ndarray], label: str, assert_close: AssertClose) -> None:
    for key, value in expected.items():
        assert_close(np.asarray(actual[key]), value, f"{label}: {key}")


# NNX on one case of each variable set (kernel and bias; weight_linear with a query and both biases; in_proj): the
# NNX layers call the linen layers' maths, what is their own is the variables, and these three hold all of them.
NNX_CASES = ("light_same_softmax_bias", "dynamic_causal_query_biases", "dynamic_in_proj_k_gt_t")
DEFAULT_PATH = [(case, "linen") for case in CASES] + [(BY_NAME[name], "nnx") for name in NNX_CASES]


@pytest.mark.parametrize(("case", "api"), DEFAULT_PATH, ids=[f"{case.name}-{api}" for case, api in DEFAULT_PATH])
def test_default_path(case: Case, api: str, assert_close: AssertClose) -> None:
    """Output and every gradient on fairseq's default (band-matrix) path."""
    module = _module(case)
    arrays = _arrays(case, module)
    _compare(_jdynconv(module, arrays, api), _torch(module, arrays), f"{case.name}/{api}", assert_close)


@pytest.mark.parametrize("name", ["light_same_softmax_bias", "dynamic_causal_query_biases", "dynamic_plain"])
def test_unfold_path(name: str, assert_close: AssertClose) -> None:
    """fairseq's unfold path, where it computes the band path's function (K <= T, no renorm_padding)."""
    case = BY_NAME[name]
    module = _module(case)
    arrays = _arrays(case, module)
    _compare(_jdynconv(module, arrays, "linen"), _torch(module, arrays, unfold=True), name, assert_close)


def test_paths_differ_for_causal_k_gt_t_with_softmax(assert_close: AssertClose) -> None:
    """A causal K > T with weight_softmax: fairseq's unfold path normalises over the last T taps, its band path
    over all K; jdynconv computes the band path (fairseq's default, and what its incremental decoding gives)."""
    case = BY_NAME["dynamic_in_proj_k_gt_t"]
    module = _module(case)
    arrays = _arrays(case, module)
    ours = np.asarray(_jdynconv(module, arrays, "linen")["output"])
    band, unfold = _torch(module, arrays)["output"], _torch(module, arrays, unfold=True)["output"]
    assert np.abs(band - unfold).max() > 1e-2  # the paths really differ here
    assert_close(ours, band, "band path")


def _mask_for(kernels: np.ndarray, rate: float, padding_l: int) -> Callable[[tuple[int, ...]], torch.Tensor]:
    """jdynconv's dropout mask (kept entries ``1 / (1 - rate)``, from the sown kernels: softmax weights are
    positive, so a zero is a dropped entry) in the shape each fairseq path drops: ``(T * B * H, K)`` kernels, or
    the ``(B * H, T, T)`` band matrix (entry ``[t, j]`` is tap ``j - t + padding_l``)."""
    batch, length, heads, taps = kernels.shape
    mask = (kernels != 0).astype(np.float32) / (1.0 - rate)  # (B, T, H, K)

    def for_shape(shape: tuple[int, ...]) -> torch.Tensor:
        if shape in ((length * batch * heads, taps), (length * batch * heads, taps, 1)):
            return torch.from_numpy(np.transpose(mask, (1, 0, 2, 3)).reshape(shape))
        assert shape == (batch * heads, length, length), shape
        band = np.ones((batch, heads, length, length), np.float32)
        for t in range(length):
            for k in range(taps):
                j = t + k - padding_l
                if 0 <= j < length:
                    band[:, :, t, j] = mask[:, t, :, k]
        return torch.from_numpy(band.reshape(shape))

    return for_shape


@pytest.mark.parametrize(
    "make",
    [
        lambda: LightweightConv1dTBC(8, 3, 1, 2, weight_dropout=0.3, weight_softmax=True),
        lambda: DynamicConv1dTBC(8, 3, 2, 2, weight_dropout=0.3, weight_softmax=True, conv_bias=True),
        lambda: DynamicConv1dTBC(6, 4, 1, 3, weight_dropout=0.3, weight_softmax=True, renorm_padding=True),
    ],
    ids=["light", "dynamic", "dynamic_renorm"],
)
def test_weight_dropout_with_a_shared_mask(make: Callable[[], torch.nn.Module], assert_close: AssertClose) -> None:
    """DropConnect in training: jdynconv's mask (rng stream "dropout") given to fairseq; output and gradients."""
    case = Case("dropout", make)
    module = _module(case)
    arrays = _arrays(case, module)
    ours = _jdynconv(module, arrays, "linen", rng=jax.random.key(3))
    kernels = np.asarray(ours["kernels"])
    dropped = float(np.mean(kernels == 0))
    assert 0.1 < dropped < 0.5, dropped  # about 30% dropped: the mask is real
    module.train()
    module.weight_dropout_module.mask = _mask_for(kernels, 0.3, module.padding_l)
    _compare(ours, _torch(module, arrays), "dropout", assert_close)


@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize(
    "name", ["light_causal_k_gt_t", "dynamic_causal_query_biases", "dynamic_in_proj_k_gt_t", "dynamic_renorm_causal"]
)
def test_incremental_decoding(name: str, api: str, assert_close: AssertClose) -> None:
    """Step by step: jdynconv's decode steps equal fairseq's incremental_state steps, and its full pass."""
    case = BY_NAME[name]
    module = _module(case)
    arrays = _arrays(case, module)
    x = arrays["x"]
    query = arrays.get("query")
    state: dict = {}
    expected = []
    with torch.no_grad():
        for t in range(case.length):
            step = {"query": torch.from_numpy(query[t : t + 1])} if query is not None else {}
            expected.append(module(torch.from_numpy(x[t : t + 1]), incremental_state=state, **step).numpy())
    expected = np.concatenate(expected)
    if api == "linen":
        layer, variables = interop.from_torch(module)
        extra = (jnp.asarray(query[:1]),) if query is not None else ()
        cache = layer.init(jax.random.key(0), jnp.asarray(x[:1]), *extra, deterministic=True, decode=True)["cache"]

        @jax.jit
        def step_fn(cache: Any, xt: jax.Array, *qt: jax.Array) -> tuple[jax.Array, Any]:
            out, updates = layer.apply(
                {**variables, "cache": cache}, xt, *qt, deterministic=True, decode=True, mutable=["cache"]
            )
            return out, updates["cache"]

        outs = []
        for t in range(case.length):
            qt = (jnp.asarray(query[t : t + 1]),) if query is not None else ()
            out, cache = step_fn(cache, jnp.asarray(x[t : t + 1]), *qt)
            outs.append(out)
    else:
        model = interop.from_torch(module, api="nnx")
        model.eval()
        model.init_cache(case.batch)
        step_fn = nnx.jit(lambda m, xt, *qt: m(xt, *qt, decode=True))
        outs = [
            step_fn(model, jnp.asarray(x[t : t + 1]), *((jnp.asarray(query[t : t + 1]),) if query is not None else ()))
            for t in range(case.length)
        ]
    assert_close(np.concatenate([np.asarray(o) for o in outs]), expected, f"{name}/{api}: steps")
    with torch.no_grad():
        full = module(torch.from_numpy(x), **({"query": torch.from_numpy(query)} if query is not None else {}))
    assert_close(expected, full.numpy(), f"{name}: fairseq's steps vs its full pass")


@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize("name", ["light_same_softmax_bias", "dynamic_causal_query_biases", "dynamic_in_proj_k_gt_t"])
def test_jdynconv_weights_into_fairseq_strictly(name: str, api: str, assert_close: AssertClose) -> None:
    """Random jdynconv variables -> a fresh fairseq module by a strict ``load_state_dict``: the same outputs."""
    case = BY_NAME[name]
    module = _module(case)
    arrays = _arrays(case, module)
    rng = _rng(name, "jdynconv weights")
    if api == "linen":
        layer, variables = interop.from_torch(module)
        params = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.5, p.shape).astype(np.float32)), variables)
        state_dict = interop.linen_to_torch(layer, params)
        x, q = jnp.asarray(arrays["x"]), arrays.get("query")
        ours = layer.apply(params, x, *(() if q is None else (jnp.asarray(q),)), deterministic=True)
    else:
        model = interop.from_torch(module, api="nnx")
        model.eval()
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.5, p.shape).astype(np.float32)), params))
        state_dict = interop.nnx_to_torch(model)
        q = arrays.get("query")
        ours = model(jnp.asarray(arrays["x"]), *(() if q is None else (jnp.asarray(q),)))
    fresh = case.make().eval()
    fresh.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, strict=True)
    with torch.no_grad():
        query = {"query": torch.from_numpy(arrays["query"])} if "query" in arrays else {}
        expected = fresh(torch.from_numpy(arrays["x"]), **query).numpy()
    assert_close(np.asarray(ours), expected, f"{name}/{api}")
