"""Parity of jdynconv's Involution (linen and NNX) with d-li14's naive ``involution``, written line by line in
``parity/involution_reference.py``.

Each case builds the original, perturbs every parameter and running statistic, and ports it with
``interop.from_torch``. Compared within ``RTOL`` (``conftest.py``): the output and the gradients of ``sum(out *
cotangent)`` w.r.t. the input and every parameter (jdynconv's named by PyTorch key through
``interop.linen_to_torch``), and, in training mode, the BatchNorm's running mean and (unbiased) variance. The
odd-size stride-2 case, where the original's shapes disagree and it raises, is compared with the reference's one
edit (``pool_ceil_mode=True``), the definition jdynconv chose.
"""

from __future__ import annotations

import dataclasses
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
from parity.involution_reference import involution

AssertClose = Callable[[object, object, str], None]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], torch.nn.Module]
    shape: tuple[int, ...]  # NCHW
    train: bool


CASES = (
    Case("k3_stride1_train", lambda: involution(32, 3, 1), (2, 32, 6, 6), True),
    Case("k7_stride2_eval", lambda: involution(32, 7, 2, reduction_ratio=2, group_channels=8), (2, 32, 8, 10), False),
    Case(
        "k5_stride2_odd_size_train",
        lambda: involution(16, 5, 2, group_channels=4, pool_ceil_mode=True),
        (2, 16, 9, 7),
        True,
    ),
)


def _rng(name: str, salt: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"involution/{name}/{salt}".encode()))


def _module(case: Case) -> torch.nn.Module:
    torch.manual_seed(0)
    module = case.make()
    rng = _rng(case.name, "weights")
    with torch.no_grad():
        for name, value in [*module.named_parameters(), *module.named_buffers()]:
            if not value.is_floating_point():
                continue
            new = (
                rng.uniform(0.5, 1.5, value.shape) if name.endswith("running_var") else rng.normal(0, 0.5, value.shape)
            )
            value.copy_(torch.from_numpy(new.astype(np.float32)))
    return module.train(case.train)


def _torch(module: torch.nn.Module, x: np.ndarray, cotangent: np.ndarray) -> dict[str, np.ndarray]:
    leaf = torch.tensor(x, requires_grad=True)
    out = module(leaf)
    (out * torch.from_numpy(cotangent)).sum().backward()
    results = {"output": out.detach().numpy(), "x": leaf.grad.numpy()}
    results |= {k: p.grad.numpy().copy() for k, p in module.named_parameters()}
    return results | {k: v.numpy().copy() for k, v in module.state_dict().items() if "running" in k}


def _jdynconv(module: torch.nn.Module, case: Case, x: np.ndarray, cotangent: np.ndarray, api: str) -> dict[str, Any]:
    x_last, g_last = (jnp.asarray(np.moveaxis(a, 1, -1)) for a in (x, cotangent))
    if api == "linen":
        layer, variables = interop.from_torch(module)

        def loss(params: Any, x: jax.Array) -> tuple[jax.Array, Any]:
            out, updates = layer.apply(
                {**variables, "params": params}, x, use_running_average=not case.train, mutable=["batch_stats"]
            )
            return jnp.sum(out * g_last), (out, updates["batch_stats"])

        (grads, dx), (out, stats) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(variables["params"], x_last)
        state_dict = interop.linen_to_torch(layer, {"params": grads, "batch_stats": stats})
    else:
        model = interop.from_torch(module, api="nnx")
        model.train() if case.train else model.eval()

        def nnx_loss(model: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
            out = model(x)
            return jnp.sum(out * g_last), out

        (grads, dx), out = nnx.jit(nnx.grad(nnx_loss, argnums=(0, 1), has_aux=True))(model, x_last)
        nnx.update(model, grads)  # the model now holds its gradients (and its updated statistics)
        state_dict = interop.nnx_to_torch(model)
    return {"output": np.moveaxis(np.asarray(out), -1, 1), "x": np.moveaxis(np.asarray(dx), -1, 1)} | dict(state_dict)


@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_output_gradients_and_statistics(case: Case, api: str, assert_close: AssertClose) -> None:
    module = _module(case)
    rng = _rng(case.name, "inputs")
    x = rng.standard_normal(case.shape, dtype=np.float32)
    with torch.no_grad():
        out_shape = _module(case)(torch.from_numpy(x)).shape
    cotangent = rng.standard_normal(tuple(out_shape), dtype=np.float32)
    expected = _torch(module, x, cotangent)
    actual = _jdynconv(_module(case), case, x, cotangent, api)
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):
            continue
        assert_close(np.asarray(actual[key]), value, f"{case.name}/{api}: {key}")


def test_the_original_raises_where_jdynconv_defines_the_result() -> None:
    """Odd size, stride 2: the original's pooled kernels (4 x 3) and unfolded patches (5 x 4) disagree."""
    module = involution(16, 5, 2, group_channels=4).eval()
    with pytest.raises(RuntimeError, match="invalid for input of size"), torch.no_grad():
        module(torch.zeros(2, 16, 9, 7))


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_jdynconv_weights_into_the_original_strictly(api: str, assert_close: AssertClose) -> None:
    """Random jdynconv variables (running statistics too) -> a fresh original by a strict ``load_state_dict``: the
    same eval-mode outputs."""
    case = CASES[1]
    rng = _rng(case.name, "jdynconv weights")
    x = rng.standard_normal(case.shape, dtype=np.float32)
    draw = lambda p: jnp.asarray(rng.uniform(0.5, 1.5, p.shape).astype(np.float32))  # noqa: E731 (positive: var)
    if api == "linen":
        layer, variables = interop.from_torch(_module(case))
        variables = jax.tree.map(draw, variables)
        state_dict = interop.linen_to_torch(layer, variables)
        ours = layer.apply(variables, jnp.moveaxis(x, 1, -1), use_running_average=True)
    else:
        model = interop.from_torch(_module(case), api="nnx")
        model.eval()
        nnx.update(model, jax.tree.map(draw, nnx.state(model, nnx.Param)))
        nnx.update(model, jax.tree.map(draw, nnx.state(model, nnx.BatchStat)))
        state_dict = interop.nnx_to_torch(model)
        ours = model(jnp.moveaxis(x, 1, -1))
    fresh = case.make().eval()
    fresh.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, strict=True)
    with torch.no_grad():
        expected = fresh(torch.from_numpy(x)).numpy()
    assert_close(np.moveaxis(np.asarray(ours), -1, 1), expected, api)
