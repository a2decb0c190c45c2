"""Parity of ``jdynconv`` BranchMixConv (linen and NNX) with the seed's PyTorch model.

The PyTorch reference is ``parity/seed_model.py``: the seed's model as the seed writes it (a Python loop
over k ``Conv2d -> BatchNorm2d -> LeakyReLU`` branches, ``torch.stack``, broadcast multiply, sum). Weights
go through ``jdynconv.interop`` both ways. PyTorch runs NCHW, jdynconv NHWC (transposed here); PyTorch's
``Conv2d(padding=p)`` is jdynconv's explicit int ``padding=p``; BatchNorm momentum 0.1 is Flax's 0.9
(the jdynconv default) and ``unbiased_running_var=True`` stores PyTorch's unbiased running variance.

Tolerances, float32 on CPU:

* forward outputs, running statistics and gradients (w.r.t. the input and every parameter):
  ``RTOL = 1e-5`` relative, plus ``1e-5 * max(1, max |reference|)`` absolute (``conftest.py``). One
  exception: in train mode the conv bias's gradient is analytically zero (BatchNorm subtracts the batch
  mean) and both frameworks return float32 noise, compared with ``RTOL * max |d/d offset|`` absolute;
* after 20 optimizer steps (SGD with momentum, Adam), every parameter, running statistic, the 20 losses
  and the final eval- and train-mode outputs, each relative to its largest reference magnitude. A fixed
  float32 tolerance cannot hold here: Adam divides each gradient by its own RMS, so float32 rounding
  (summation orders differ between CPUs and kernels) is amplified step by step, by how much depends on
  the machine (PyTorch's float32 run drifts 8e-4 from its float64 run on one AMD EPYC). So the steps run
  in float64 in both frameworks, which must agree to ``FLOAT64_TRAIN_RTOL``; and in float32, where
  jdynconv's distance from that float64 trajectory must stay within ``DRIFT_RATIO`` times PyTorch's own.
  Adam leaves the conv biases frozen in both frameworks (see ``OPTIMIZERS``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.torch
import torch
from flax import nnx

from jdynconv import interop
from jdynconv import linen as jdc_linen
from jdynconv import nnx as jdc_nnx
from parity.conftest import RTOL
from parity.seed_model import SeedModel

AssertClose = Callable[[object, object, str], None]
TRAIN_STEPS = 20
# float64 rounding (2^-53 per op) amplified by the 20 steps: the float32 runs show the amplification is
# at most ~1e4 (a drift of 8e-4 from 2^-24 per op), which gives ~1e-12; measured at most 3.4e-14.
# 1e-10 leaves a wide margin and still sits six orders below what a real difference in the maths
# (Adam's epsilon placement, bias correction, a momentum convention) changes.
FLOAT64_TRAIN_RTOL = 1e-10
# jdynconv keeps BatchNorm statistics in float32 whatever the parameters' dtype (Flax's convention),
# also in the float64 run: each step's ``0.9 * r + 0.1 * s`` is rounded to float32 (2^-24 relative), and
# the errors decay by 0.9 a step, so they stay below 10 * 2^-24; the eval-mode output reads those
# statistics, amplified at most ~3x by ``scale / sqrt(var)`` at these values. 32 * 2^-24 ~ 1.9e-6 covers
# both (measured at most 4.0e-7 and 2.1e-7).
FLOAT32_STATISTICS_RTOL = 32 * 2.0**-24
# jdynconv's float32 run may drift from the float64 trajectory at most this many times as far as
# PyTorch's float32 run does (largest relative error over every compared array). Both frameworks make
# the same kind of rounding error in a different order, so their drifts are of one size on any CPU
# (measured: jdynconv 2.98e-6 vs PyTorch 1.75e-6 for SGD, 3.8e-5 vs 8.4e-4 for Adam), while computing
# in a lower precision, or a cancelling formula such as E[x^2] - E[x]^2 for the variance, multiplies
# jdynconv's by 100 or more.
DRIFT_RATIO = 10


@dataclasses.dataclass(frozen=True)
class Case:
    """One seed model: x ``(batch, in_channels, *size)``, k branches of ``Conv2d(kernel_size, padding)``."""

    name: str
    in_channels: int
    features: int
    num_branches: int
    kernel_size: int
    padding: int
    batch: int
    size: tuple[int, int]


SCALED_SEED = Case(
    "scaled_seed", in_channels=3, features=4, num_branches=3, kernel_size=3, padding=1, batch=8, size=(8, 8)
)
CASES = (
    SCALED_SEED,
    # One branch, no padding (the output shrinks), a non-square input: a wrong flatten order fails here.
    Case("k1_valid_5x7", in_channels=2, features=5, num_branches=1, kernel_size=3, padding=0, batch=4, size=(5, 7)),
    Case("k4_5x5_pad2_7x6", in_channels=4, features=3, num_branches=4, kernel_size=5, padding=2, batch=5, size=(7, 6)),
)
CASE_IDS = [case.name for case in CASES]
# The seed's exact shapes: x (128, 3, 32, 32), k = 8 branches of 32 channels (one forward, for speed).
SEED = Case("seed", in_channels=3, features=32, num_branches=8, kernel_size=3, padding=1, batch=128, size=(32, 32))


def _rng(case: Case, salt: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{case.name}/{salt}".encode()))


def make_torch_model(case: Case, seed: int = 0) -> SeedModel:
    """The seed model with PyTorch's initialisation, and BatchNorm weights and statistics randomised so
    that a swapped or dropped BatchNorm tensor cannot go unnoticed (PyTorch starts them at 1 and 0)."""
    torch.manual_seed(seed)
    model = SeedModel(case.in_channels, case.features, case.num_branches, case.kernel_size, case.padding, case.size)
    with torch.no_grad():
        for branch in model.convs:
            norm = branch[1]
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    return model


def make_inputs(case: Case, salt: str = "x") -> np.ndarray:
    """Random normal NCHW float32 inputs ``(B, C, H, W)``."""
    return _rng(case, salt).standard_normal((case.batch, case.in_channels, *case.size), dtype=np.float32)


def output_shape(case: Case) -> tuple[int, int, int, int]:
    out = tuple(s + 2 * case.padding - case.kernel_size + 1 for s in case.size)
    return (case.batch, case.features, *out)


def make_linen(
    case: Case, *, unbiased_running_var: bool = True, param_dtype: Any = jnp.float32
) -> jdc_linen.BranchMixConv:
    return jdc_linen.BranchMixConv(
        features=case.features,
        kernel_size=case.kernel_size,
        num_branches=case.num_branches,
        padding=case.padding,
        unbiased_running_var=unbiased_running_var,
        param_dtype=param_dtype,
    )


def make_nnx(case: Case, *, unbiased_running_var: bool = True, param_dtype: Any = jnp.float32) -> jdc_nnx.BranchMixConv:
    """The NNX twin, abstract (``nnx.eval_shape``), for ``interop.torch_to_nnx`` to fill.

    Skipping the random init saves seconds: each eager initialiser op compiles anew for each shape.
    """
    return nnx.eval_shape(
        lambda: jdc_nnx.BranchMixConv(
            case.in_channels,
            case.features,
            case.kernel_size,
            case.num_branches,
            input_shape=case.size,
            padding=case.padding,
            unbiased_running_var=unbiased_running_var,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(0),
        )
    )


def to_nhwc(x: np.ndarray | torch.Tensor) -> jax.Array:
    return jnp.asarray(np.moveaxis(np.asarray(x), -3, -1))


def to_nchw(y: jax.Array) -> np.ndarray:
    return np.moveaxis(np.asarray(y), -1, -3)


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy().copy() for key, value in model.state_dict().items()}


def state_dict_torch(state_dict: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(value) for key, value in state_dict.items()}


def torch_forward(model: SeedModel, x: np.ndarray, *, train: bool) -> np.ndarray:
    """NCHW in and out; in train mode PyTorch updates the running statistics."""
    model.train(train)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@functools.partial(jax.jit, static_argnums=0)
def _linen_both_modes(
    module: jdc_linen.BranchMixConv, variables: dict[str, Any], x: jax.Array
) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
    eval_out = module.apply(variables, x, use_running_average=True)
    train_out, updates = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    return eval_out, train_out, updates["batch_stats"]


def linen_forward(
    module: jdc_linen.BranchMixConv, variables: dict[str, Any], x: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Eval- and train-mode outputs (NCHW) and the variables after the train-mode step, in one jitted call.

    The module is a static argument (linen modules hash by their attributes), so every test with the
    same configuration and shapes shares one compilation.
    """
    eval_out, train_out, batch_stats = _linen_both_modes(module, variables, to_nhwc(x))
    return to_nchw(eval_out), to_nchw(train_out), {"params": variables["params"], "batch_stats": batch_stats}


@nnx.jit
def _nnx_both_modes(model: jdc_nnx.BranchMixConv, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return model(x, use_running_average=True), model(x, use_running_average=False)


def nnx_forward(model: jdc_nnx.BranchMixConv, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eval- then train-mode outputs (NCHW) under ``nnx.jit``; the train-mode call updates the statistics."""
    eval_out, train_out = _nnx_both_modes(model, to_nhwc(x))
    return to_nchw(eval_out), to_nchw(train_out)


def assert_state_dicts_close(
    actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], assert_close: AssertClose
) -> None:
    """Every tensor but ``num_batches_tracked`` (PyTorch counts steps; jdynconv exports 0)."""
    assert actual.keys() == expected.keys()
    for key in expected:
        if not key.endswith("num_batches_tracked"):
            assert_close(actual[key], expected[key], key)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_torch_weights_in_linen_and_nnx(case: Case, assert_close: AssertClose) -> None:
    """PyTorch weights -> linen and NNX: same outputs in eval and train mode, same updated statistics."""
    model = make_torch_model(case)
    state_dict = state_dict_numpy(model)
    x = make_inputs(case)
    expected_eval = torch_forward(model, x, train=False)
    expected_train = torch_forward(model, x, train=True)
    trained = state_dict_numpy(model)
    assert expected_eval.shape == output_shape(case)

    module = make_linen(case)
    eval_out, train_out, updated = linen_forward(module, interop.torch_to_linen(module, state_dict), x)
    assert_close(eval_out, expected_eval, "linen eval output")
    assert_close(train_out, expected_train, "linen train output")
    assert_state_dicts_close(interop.linen_to_torch(module, updated), trained, assert_close)

    nnx_model = interop.torch_to_nnx(make_nnx(case), state_dict)
    eval_out, train_out = nnx_forward(nnx_model, x)
    assert_close(eval_out, expected_eval, "nnx eval output")
    assert_close(train_out, expected_train, "nnx train output")
    assert_state_dicts_close(interop.nnx_to_torch(nnx_model), trained, assert_close)


def _randomised(variables: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """``module.init`` variables with BatchNorm scale/offset/statistics moved off their 1/0 defaults."""
    params, stats = dict(variables["params"]), dict(variables["batch_stats"])
    shape = params["scale"].shape
    params["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, shape).astype(np.float32))
    params["offset"] = jnp.asarray(rng.uniform(-0.5, 0.5, shape).astype(np.float32))
    params["bias"] = jnp.asarray(rng.uniform(-0.5, 0.5, shape).astype(np.float32))
    stats["mean"] = jnp.asarray(rng.uniform(-0.5, 0.5, shape).astype(np.float32))
    stats["var"] = jnp.asarray(rng.uniform(0.5, 2.0, shape).astype(np.float32))
    return {"params": params, "batch_stats": stats}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_linen_and_nnx_weights_in_torch(case: Case, assert_close: AssertClose) -> None:
    """linen/NNX variables -> a fresh seed model with a strict ``load_state_dict``: same outputs.

    linen from its own ``init`` (BatchNorm tensors randomised); NNX loaded from other PyTorch weights
    than the receiving model's (exporting NNX's own init is tested bitwise in ``tests/test_interop.py``).
    """
    x = make_inputs(case)
    module = make_linen(case)
    init = jax.jit(functools.partial(module.init, use_running_average=True))
    variables = _randomised(init(jax.random.key(1), to_nhwc(x)), _rng(case, "variables"))
    model = make_torch_model(case, seed=1)
    result = model.load_state_dict(state_dict_torch(interop.linen_to_torch(module, variables)), strict=True)
    assert result.missing_keys == []
    assert result.unexpected_keys == []
    eval_out, train_out, _ = linen_forward(module, variables, x)
    assert_close(eval_out, torch_forward(model, x, train=False), "linen -> torch, eval")
    assert_close(train_out, torch_forward(model, x, train=True), "linen -> torch, train")

    nnx_model = interop.torch_to_nnx(make_nnx(case), state_dict_numpy(make_torch_model(case, seed=2)))
    model = make_torch_model(case, seed=3)
    model.load_state_dict(state_dict_torch(interop.nnx_to_torch(nnx_model)), strict=True)
    eval_out, train_out = nnx_forward(nnx_model, x)
    assert_close(eval_out, torch_forward(model, x, train=False), "nnx -> torch, eval")
    assert_close(train_out, torch_forward(model, x, train=True), "nnx -> torch, train")


def torch_gradients(
    model: SeedModel, x: np.ndarray, cotangent: np.ndarray, *, train: bool
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Gradients of ``sum(y * cotangent)`` for every parameter (PyTorch names) and the input."""
    model.train(train)
    x_leaf = torch.tensor(x, requires_grad=True)
    (model(x_leaf) * torch.from_numpy(cotangent)).sum().backward()
    grads = {name: param.grad.numpy().copy() for name, param in model.named_parameters()}
    model.zero_grad()
    return grads, x_leaf.grad.numpy()


@functools.partial(jax.jit, static_argnums=0)
def _linen_gradients(
    module: jdc_linen.BranchMixConv, variables: dict[str, Any], x: jax.Array, cotangent: jax.Array
) -> dict[str, tuple[dict[str, jax.Array], jax.Array]]:
    def loss(params: dict[str, jax.Array], x: jax.Array, train: bool) -> jax.Array:
        y, _ = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            use_running_average=not train,
            mutable=["batch_stats"],
        )
        return jnp.sum(y * cotangent)

    grad = jax.grad(loss, argnums=(0, 1))
    return {"eval": grad(variables["params"], x, False), "train": grad(variables["params"], x, True)}


@nnx.jit
def _nnx_gradients(
    model: jdc_nnx.BranchMixConv, x: jax.Array, cotangent: jax.Array
) -> dict[str, tuple[nnx.State, jax.Array]]:
    def loss(model: jdc_nnx.BranchMixConv, x: jax.Array, train: bool) -> jax.Array:
        return jnp.sum(model(x, use_running_average=not train) * cotangent)

    grad = nnx.grad(loss, argnums=(0, 1))
    # Eval first: the train-mode call updates the running statistics.
    eval_grads = grad(model, x, False)
    return {"eval": eval_grads, "train": grad(model, x, True)}


def assert_gradients_close(
    actual: dict[str, Any], expected: dict[str, np.ndarray], name: str, *, train: bool, assert_close: AssertClose
) -> None:
    """Every parameter's gradient within ``RTOL``; in train mode the conv bias's is rounding noise.

    In train mode BatchNorm subtracts the batch mean, so the gradient of the conv bias is analytically
    zero and both frameworks return float32 noise (~1e-6 of the BatchNorm offset's gradient, a sum of the
    same terms): compared with an absolute tolerance of ``RTOL * max |d/d offset|``.
    """
    assert actual.keys() == expected.keys()
    for param in expected:
        if train and param == "bias":
            atol = RTOL * float(np.abs(expected["offset"]).max())
            np.testing.assert_allclose(actual[param], expected[param], rtol=0, atol=atol, err_msg=f"{name} d/dbias")
        else:
            assert_close(actual[param], expected[param], f"{name} d/d{param}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradients(case: Case, assert_close: AssertClose) -> None:
    """Gradients w.r.t. the input and every parameter in eval and train mode, linen and NNX.

    PyTorch's parameter gradients have the parameters' layout, so they go through the same rules as the
    weights (``torch_to_linen`` of the gradients plus the buffers).
    """
    model = make_torch_model(case)
    state_dict = state_dict_numpy(model)
    x = make_inputs(case)
    cotangent = _rng(case, "cotangent").standard_normal(output_shape(case), dtype=np.float32)
    module = make_linen(case)
    linen_grads = _linen_gradients(module, interop.torch_to_linen(module, state_dict), to_nhwc(x), to_nhwc(cotangent))
    nnx_model = interop.torch_to_nnx(make_nnx(case), state_dict)
    nnx_grads = _nnx_gradients(nnx_model, to_nhwc(x), to_nhwc(cotangent))
    # Eval first, as in _nnx_gradients: the train-mode forward updates PyTorch's running statistics.
    for mode in ("eval", "train"):
        torch_param_grads, expected_x_grad = torch_gradients(model, x, cotangent, train=mode == "train")
        buffers = {key: value for key, value in state_dict.items() if key not in torch_param_grads}
        expected = interop.torch_to_linen(module, torch_param_grads | buffers)["params"]
        for api, (param_grads, x_grad) in (("linen", linen_grads[mode]), ("nnx", nnx_grads[mode])):
            grads = param_grads if api == "linen" else nnx.to_pure_dict(param_grads)
            assert_gradients_close(grads, expected, f"{api} {mode}", train=mode == "train", assert_close=assert_close)
            assert_close(to_nchw(x_grad), expected_x_grad, f"{api} {mode} d/dx")


def test_running_statistics_after_a_training_step(assert_close: AssertClose) -> None:
    """``unbiased_running_var=True`` matches PyTorch's running_var; Flax's biased default differs by n/(n-1).

    One step from running_var ``v0``: PyTorch stores ``0.9 v0 + 0.1 * n/(n-1) * batch_var``, Flax's
    default ``0.9 v0 + 0.1 * batch_var``, with n = B * H' * W' values per channel.
    """
    case = SCALED_SEED
    model = make_torch_model(case)
    state_dict = state_dict_numpy(model)
    x = make_inputs(case)
    torch_forward(model, x, train=True)
    expected = state_dict_numpy(model)
    n = case.batch * case.size[0] * case.size[1]
    initial_var = np.stack([state_dict[f"convs.{i}.1.running_var"] for i in range(case.num_branches)])
    expected_var = np.stack([expected[f"convs.{i}.1.running_var"] for i in range(case.num_branches)])
    expected_mean = np.stack([expected[f"convs.{i}.1.running_mean"] for i in range(case.num_branches)])

    for unbiased in (True, False):
        module = make_linen(case, unbiased_running_var=unbiased)
        _, _, updated = linen_forward(module, interop.torch_to_linen(module, state_dict), x)
        nnx_model = interop.torch_to_nnx(make_nnx(case, unbiased_running_var=unbiased), state_dict)
        nnx_forward(nnx_model, x)
        nnx_stats = {"mean": nnx_model.mean[...], "var": nnx_model.var[...]}
        for api, stats in (("linen", updated["batch_stats"]), ("nnx", nnx_stats)):
            mean, var = np.asarray(stats["mean"]), np.asarray(stats["var"])
            assert_close(mean, expected_mean, f"{api} running mean, unbiased={unbiased}")
            if unbiased:
                assert_close(var, expected_var, f"{api} running var (unbiased)")
            else:
                # The batch-variance terms differ by exactly PyTorch's Bessel correction. Each difference
                # cancels against 0.9 * initial_var, which leaves float32's 6e-8 at ~1e-6 relative; 1e-4
                # is still 20x below the 1 / (n - 1) = 2e-3 (n = 512 values a channel) it must detect.
                ratio = (expected_var - 0.9 * initial_var) / (var - 0.9 * initial_var)
                np.testing.assert_allclose(ratio, n / (n - 1), rtol=1e-4, err_msg=f"{api} biased running var")
                assert not np.allclose(var, expected_var, rtol=1e-6, atol=0)


def _is_conv_bias(path: tuple[Any, ...], _: object) -> str:
    """optax label: ``"frozen"`` for the conv bias bank ``bias`` (linen dict or NNX state), else ``"train"``."""
    return "frozen" if any(getattr(key, "key", None) == "bias" for key in path) else "train"


def _optax_adam() -> optax.GradientTransformation:
    """Adam on every parameter but the conv biases, which stay fixed (see ``OPTIMIZERS``)."""
    adam = optax.adam(1e-2, b1=0.9, b2=0.999, eps=1e-8)
    return optax.multi_transform(
        {"train": adam, "frozen": optax.set_to_zero()},
        lambda params: jax.tree_util.tree_map_with_path(_is_conv_bias, params),
    )


def _torch_adam(model: SeedModel) -> torch.optim.Optimizer:
    params = [param for name, param in model.named_parameters() if not name.endswith(".0.bias")]
    return torch.optim.Adam(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8)


OPTIMIZERS: dict[str, tuple[Callable[[], optax.GradientTransformation], Callable[[SeedModel], torch.optim.Optimizer]]]
OPTIMIZERS = {
    # Both default to heavy-ball momentum without dampening or Nesterov: v = m v + g; p -= lr v.
    "sgd_momentum": (
        lambda: optax.sgd(0.05, momentum=0.9),
        lambda model: torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
    ),
    # Both: p -= lr * m_hat / (sqrt(v_hat) + eps), eps outside the square root, bias-corrected moments.
    # The conv biases are frozen: under train-mode BatchNorm their gradient is analytically zero, and
    # Adam divides the float32 noise each framework returns (~1e-6, test_gradients) by its own running
    # RMS, turning it into steps of up to lr in arbitrary directions: the two runs would drift apart
    # on a parameter that does not affect the training loss, whatever the implementation.
    "adam": (_optax_adam, _torch_adam),
}


def optax_promotion() -> contextlib.AbstractContextManager[None]:
    """optax's Adam raises a float32 step count to an int32 power, which strict promotion rejects."""
    return jax.numpy_dtype_promotion("standard")


class Trained(NamedTuple):
    """After ``TRAIN_STEPS`` steps: the weights as a PyTorch state dict, the losses, and eval- then
    train-mode outputs on the training batch (NCHW)."""

    state_dict: dict[str, np.ndarray]
    losses: np.ndarray
    eval_out: np.ndarray
    train_out: np.ndarray


def torch_training(case: Case, optimizer_name: str, x: np.ndarray, target: np.ndarray) -> Trained:
    """``TRAIN_STEPS`` steps of MSE regression of the seed model onto ``target``, in train mode, in
    ``x``'s dtype (the float32 initial weights cast to it)."""
    model = make_torch_model(case).to(torch.from_numpy(x).dtype)
    optimizer = OPTIMIZERS[optimizer_name][1](model)
    model.train()
    losses = []
    for _ in range(TRAIN_STEPS):
        optimizer.zero_grad()
        loss = torch.mean((model(torch.from_numpy(x)) - torch.from_numpy(target)) ** 2)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    state_dict = state_dict_numpy(model)
    eval_out = torch_forward(model, x, train=False)
    return Trained(state_dict, np.asarray(losses, x.dtype), eval_out, torch_forward(model, x, train=True))


def linen_training(case: Case, optimizer_name: str, x: np.ndarray, target: np.ndarray) -> Trained:
    """The same steps with optax under ``jax.jit``, from the same PyTorch initial weights, in ``x``'s dtype."""
    module = make_linen(case, param_dtype=x.dtype)
    variables = interop.torch_to_linen(module, state_dict_numpy(make_torch_model(case)))
    tx = OPTIMIZERS[optimizer_name][0]()

    def loss_fn(params: Any, batch_stats: Any) -> tuple[jax.Array, Any]:
        y, updates = module.apply(
            {"params": params, "batch_stats": batch_stats},
            to_nhwc(x),
            use_running_average=False,
            mutable=["batch_stats"],
        )
        return jnp.mean((y - to_nhwc(target)) ** 2), updates["batch_stats"]

    @jax.jit
    def step(params: Any, batch_stats: Any, opt_state: Any) -> tuple[Any, Any, Any, jax.Array]:
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        with optax_promotion():
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    losses = []
    for _ in range(TRAIN_STEPS):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
        losses.append(loss)
    trained = {"params": params, "batch_stats": batch_stats}
    eval_out, train_out, _ = linen_forward(module, trained, x)
    return Trained(interop.linen_to_torch(module, trained), np.asarray(losses), eval_out, train_out)


def nnx_training(case: Case, optimizer_name: str, x: np.ndarray, target: np.ndarray) -> Trained:
    """The same steps with ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` under ``nnx.jit``, in ``x``'s dtype."""
    model = interop.torch_to_nnx(make_nnx(case, param_dtype=x.dtype), state_dict_numpy(make_torch_model(case)))
    optimizer = nnx.Optimizer(model, OPTIMIZERS[optimizer_name][0](), wrt=nnx.Param)

    @nnx.jit
    def step(model: jdc_nnx.BranchMixConv, optimizer: nnx.Optimizer, x: jax.Array, target: jax.Array) -> jax.Array:
        def loss_fn(model: jdc_nnx.BranchMixConv) -> jax.Array:
            return jnp.mean((model(x) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        with optax_promotion():
            optimizer.update(model, grads)
        return loss

    model.train()
    losses = [step(model, optimizer, to_nhwc(x), to_nhwc(target)) for _ in range(TRAIN_STEPS)]
    state_dict = interop.nnx_to_torch(model)
    eval_out, train_out = nnx_forward(model, x)
    return Trained(state_dict, np.asarray(losses), eval_out, train_out)


def _compared_arrays(trained: Trained) -> dict[str, np.ndarray]:
    """Every array a training run is compared on, by name, in float64."""
    arrays = {key: value for key, value in trained.state_dict.items() if not key.endswith("num_batches_tracked")}
    arrays |= {"losses": trained.losses, "eval-mode output": trained.eval_out, "train-mode output": trained.train_out}
    return {name: np.asarray(value, np.float64) for name, value in arrays.items()}


def _relative_errors(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> dict[str, float]:
    """Per name: max abs error over the largest magnitude of ``expected`` (0 where both are all zero)."""
    assert actual.keys() == expected.keys()
    errors = {}
    for name, reference in expected.items():
        assert actual[name].shape == reference.shape, f"{name}: shape {actual[name].shape} != {reference.shape}"
        error = float(np.abs(actual[name] - reference).max(initial=0.0))
        errors[name] = error / max(float(np.abs(reference).max(initial=0.0)), 1e-30)
    return errors


def _train_both(case: Case, optimizer_name: str, api: str, dtype: type[np.floating]) -> tuple[Trained, Trained]:
    """(PyTorch, jdynconv) after ``TRAIN_STEPS`` steps from the same weights, inputs and targets in ``dtype``."""
    x = make_inputs(case, "train").astype(dtype)
    target = _rng(case, "target").standard_normal(output_shape(case), dtype=np.float32).astype(dtype)
    with jax.enable_x64(dtype == np.float64):
        expected = torch_training(case, optimizer_name, x, target)
        actual = (linen_training if api == "linen" else nnx_training)(case, optimizer_name, x, target)
    return expected, actual


@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_training_steps(optimizer_name: str, api: str) -> None:
    """20 steps of optax vs ``torch.optim`` from the same weights: parameters, statistics, losses, outputs.

    In float64 the two trajectories are the same; in float32, jdynconv's run stays as close to that
    trajectory as PyTorch's does. Together they bound the float32 disagreement (the triangle
    inequality) by ``1 + DRIFT_RATIO`` times PyTorch's own float32 drift, whatever the CPU.
    """
    case = SCALED_SEED
    expected64, actual64 = _train_both(case, optimizer_name, api, np.float64)
    assert expected64.losses[-1] < 0.9 * expected64.losses[0], "the 20 steps should train"
    trajectory = _compared_arrays(expected64)
    float32_stored = {key for key, value in actual64.state_dict.items() if value.dtype == np.float32}
    for name, error in _relative_errors(_compared_arrays(actual64), trajectory).items():
        rtol = FLOAT32_STATISTICS_RTOL if name in float32_stored or name == "eval-mode output" else FLOAT64_TRAIN_RTOL
        assert error <= rtol, f"float64 run, {name}: relative error {error:.3g} > {rtol:.3g}"
    assert not float32_stored - {key for key in trajectory if "running_" in key}, float32_stored

    expected32, actual32 = _train_both(case, optimizer_name, api, np.float32)
    torch_drift = _relative_errors(_compared_arrays(expected32), trajectory)
    jdynconv_drift = _relative_errors(_compared_arrays(actual32), trajectory)
    worst = max(jdynconv_drift, key=jdynconv_drift.get)
    assert jdynconv_drift[worst] <= DRIFT_RATIO * max(torch_drift.values()), (
        f"float32 drift from the float64 trajectory: jdynconv {jdynconv_drift[worst]:.3g} ({worst}) > "
        f"{DRIFT_RATIO} * PyTorch's {max(torch_drift.values()):.3g}"
    )


def test_seed_shapes_forward(assert_close: AssertClose) -> None:
    """The seed's exact shapes: x (128, 3, 32, 32), k = 8, 32 channels -> (128, 32, 32, 32), linen.

    Train mode (BatchNorm over 128 * 32 * 32 values per channel, the flatten gate over 3 * 32 * 32
    inputs); eval mode and NNX run the same code and are compared at the scaled-down shapes.
    """
    model = make_torch_model(SEED)
    module = make_linen(SEED)
    variables = interop.torch_to_linen(module, state_dict_numpy(model))
    x = make_inputs(SEED)
    apply = jax.jit(functools.partial(module.apply, use_running_average=False, mutable=["batch_stats"]))
    actual, _ = apply(variables, to_nhwc(x))
    expected = torch_forward(model, x, train=True)
    assert expected.shape == (128, 32, 32, 32)
    assert_close(to_nchw(actual), expected, "seed shapes, train mode")


def test_pt_and_safetensors_files(tmp_path: Path) -> None:
    """``.pt``/``.pth`` (``torch.save``) and ``.safetensors`` files in and out through ``load_state_dict``."""
    case = SCALED_SEED
    module = make_linen(case)
    model = make_torch_model(case)
    reference = interop.torch_to_linen(module, state_dict_numpy(model))
    torch.save(model.state_dict(), tmp_path / "seed.pt")
    safetensors.torch.save_file(model.state_dict(), tmp_path / "seed.safetensors")
    for name in ("seed.pt", "seed.safetensors"):
        loaded = interop.torch_to_linen(module, interop.load_state_dict(tmp_path / name))
        jax.tree.map(lambda a, b, name=name: np.testing.assert_array_equal(a, b, name, strict=True), loaded, reference)
    # torch tensors are accepted as they are, too.
    from_tensors = interop.torch_to_linen(module, model.state_dict())
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), from_tensors, reference)

    nnx_model = interop.torch_to_nnx(make_nnx(case), state_dict_numpy(make_torch_model(case, seed=4)))
    exported = interop.nnx_to_torch(nnx_model)
    torch.save(state_dict_torch(exported), tmp_path / "nnx.pth")
    safetensors.torch.save_file(state_dict_torch(exported), tmp_path / "nnx.safetensors")
    for name in ("nnx.pth", "nnx.safetensors"):
        round_tripped = interop.load_state_dict(tmp_path / name)
        assert round_tripped.keys() == exported.keys()
        for key, value in exported.items():  # num_batches_tracked stays int64
            np.testing.assert_array_equal(round_tripped[key], value, f"{name}: {key}", strict=True)
        make_torch_model(case, seed=3).load_state_dict(state_dict_torch(round_tripped), strict=True)

    # bfloat16 weights come back as float32 holding the bfloat16 values exactly.
    model_bf16 = make_torch_model(case).to(torch.bfloat16)
    torch.save(model_bf16.state_dict(), tmp_path / "bf16.pt")
    safetensors.torch.save_file(model_bf16.state_dict(), tmp_path / "bf16.safetensors")
    bf16_weight = model_bf16.convs[0][0].weight.detach().float().numpy()
    loaded = {name: interop.load_state_dict(tmp_path / name) for name in ("bf16.pt", "bf16.safetensors")}
    for name, state_dict in loaded.items():
        np.testing.assert_array_equal(state_dict["convs.0.0.weight"], bf16_weight, name, strict=True)
    for name, state_dict in (*loaded.items(), ("bfloat16 tensors", model_bf16.state_dict())):
        kernel = interop.torch_to_linen(module, state_dict)["params"]["kernel"][0]
        np.testing.assert_array_equal(kernel, bf16_weight.transpose(2, 3, 1, 0), name, strict=True)
