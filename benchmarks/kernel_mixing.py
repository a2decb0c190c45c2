"""CondConv and DynamicConv (kernel mixing): jdynconv's lowerings vs the PyTorch reference implementations.

Shapes: B = 64, 64 -> 64 channels, 32x32, 3x3 kernels, stride 1, padding 'same' (PyTorch: 1), bias on,
k = 4 and k = 8 experts. Competitors, all with the same weights (made by the PyTorch module, converted by
hand: OIHW -> HWIO, Linear/1x1-conv weights transposed; inputs NCHW for PyTorch, NHWC for JAX):

- ``jdynconv auto``, ``jdynconv mix_kernels``, ``jdynconv mix_outputs``: ``jdynconv.linen.CondConv`` /
  ``DynamicConv`` with that ``mixing`` (``auto`` resolves to one of the other two by the cost rule in
  ``jdynconv._kernel_mix.choose_mixing``; the report says which);
- ``torch reference``, for CondConv: timm's ``CondConv2d`` formulation (timm/layers/cond_conv2d.py,
  ``CondConv2d.forward``: experts flattened to ``(k, O*I*kh*kw)``, mixed with one matmul, one grouped conv
  with ``groups = B``) with the routing of timm's ``CondConvResidual`` block
  (``sigmoid(Linear(C_in, k)(adaptive_avg_pool2d(x, 1).flatten(1)))``); for DynamicConv: the Dynamic
  Convolution PyTorch layer ``Dynamic_conv2d`` (kaijieshi7/Dynamic-convolution-Pytorch, dynamic_conv.py:
  AdaptiveAvgPool2d -> 1x1 conv without bias to ``int(C_in * 0.25) + 1`` -> relu -> 1x1 conv with bias
  to k -> ``softmax(logits / temperature)``; kernels ``attention @ weight.view(k, -1)``, biases
  ``attention @ bias``, one grouped conv with ``groups = B``).

Temperature: 1.0, the end of Dynamic Convolution's annealing schedule (30 -> 1) and the value used after
training; the cost does not depend on it. jdynconv takes it as a traced argument of the jitted function
(one compiled step serves the whole schedule); the PyTorch layer keeps it as module state.

Passes: ``fwd`` is the forward (PyTorch under ``inference_mode``); ``train`` is one training step: loss =
mean of the squared output, gradients w.r.t. all parameters (not the input), an SGD update (JAX: one
``jax.jit`` step with optax.sgd, state donated; PyTorch: ``loss.backward(); opt.step(); opt.zero_grad()``).
``conv`` is the same training step for the layer's convolution alone: per-sample kernels ``(B, O, I, kh,
kw)`` and biases ``(B, O)`` are the parameters (no bank, no routing, no mixing), the conv is
``jdynconv.per_sample_conv`` (``method="auto"``) against PyTorch's grouped conv (``groups = B``), the
layers' own conv. So ``train`` minus ``conv`` is what routing, mixing and their gradients add to the step,
in each framework; only ``jdynconv auto`` and the reference run it.
Before anything is timed, every jdynconv forward is checked against the PyTorch reference's within 1e-4
relative (``max|a - b| / max|b|``), and for the training step the first loss and the gradients of every
parameter (converted back to PyTorch's layout) as well. Timing as in branch_mix.py / per_sample_conv.py:
warm-up excluded, interleaved shuffled rounds, medians; ratios are jdynconv's time over the PyTorch
reference's on the same case and pass (< 1: jdynconv faster).

    PYTHONPATH=. python benchmarks/kernel_mixing.py            # full run -> benchmarks/results/
    PYTHONPATH=. python benchmarks/kernel_mixing.py --quick --out /tmp/bench_km_smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from _timing import (
    Call,
    PairedRatio,
    environment_metadata,
    format_ms,
    format_paired,
    format_ratio,
    inner_calls,
    interleaved_medians,
    markdown_table,
    plot_ratio_bars,
    time_calls,
    write_json,
)

import jdynconv.linen
from jdynconv._kernel_mix import choose_mixing

MODES = ("fwd", "train", "conv")
CONV_MODE = "conv"  # the layer's conv alone, its kernels and biases the parameters
LAYERS = ("CondConv", "DynamicConv")
MIXINGS = ("auto", "mix_kernels", "mix_outputs")
JAX_NAMES = tuple(f"jdynconv {mixing}" for mixing in MIXINGS)
SUBJECT = "jdynconv auto"
REFERENCE = "torch reference"
COMPETITORS = (*JAX_NAMES, REFERENCE)
REFERENCE_SOURCES = {
    "CondConv": "timm CondConv2d (timm/layers/cond_conv2d.py) + CondConvResidual's sigmoid(Linear) routing",
    "DynamicConv": "Dynamic_conv2d (kaijieshi7/Dynamic-convolution-Pytorch, dynamic_conv.py)",
}
TOLERANCE = 1e-4  # forward outputs and first losses
GRAD_TOLERANCE = 1e-4  # per parameter, max|a - b| / max|b|
LEARNING_RATE = 1e-2
TEMPERATURE = 1.0
ATTENTION_RATIO = 0.25
DEFAULT_ROUNDS = 15
DEFAULT_MIN_SAMPLE_S = 0.02
QUICK_ROUNDS = 3
QUICK_MIN_SAMPLE_S = 0.005


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    layer: str  # "CondConv" or "DynamicConv"
    num_experts: int
    batch: int = 64
    in_channels: int = 64
    features: int = 64
    spatial: tuple[int, int] = (32, 32)
    kernel: int = 3

    @property
    def torch_padding(self) -> int:
        """'same' at stride 1 and odd kernel (timm's ``get_padding_value('same', ...)`` gives this too)."""
        return (self.kernel - 1) // 2

    @property
    def hidden(self) -> int:
        return int(self.in_channels * ATTENTION_RATIO) + 1

    @property
    def auto_mixing(self) -> str:
        """What ``mixing="auto"`` resolves to here on JAX's default backend."""
        return choose_mixing(jax.default_backend(), self.num_experts, self.batch, math.prod(self.spatial))

    @property
    def description(self) -> str:
        height, width = self.spatial
        return (
            f"{self.layer} B{self.batch} C{self.in_channels}->{self.features} S{height}x{width} "
            f"k{self.kernel}x{self.kernel} same, {self.num_experts} experts"
        )

    @property
    def label(self) -> str:
        return f"{self.name}: {self.description}"


CASES: tuple[Case, ...] = (
    Case("cond-k4", "CondConv", 4),
    Case("cond-k8", "CondConv", 8),
    Case("dyn-k4", "DynamicConv", 4),
    Case("dyn-k8", "DynamicConv", 8),
)


# --- PyTorch references ---------------------------------------------------------------------------------


class TimmCondConv2d(torch.nn.Module):
    """timm's ``CondConv2d`` (timm/layers/cond_conv2d.py), its forward as written there, with the routing
    of timm's ``CondConvResidual`` (timm/models/_efficientnet_blocks.py) built in:
    ``routing_weights = sigmoid(routing_fn(adaptive_avg_pool2d(x, 1).flatten(1)))``.

    Parameter names are the ones ``jdynconv.interop`` uses: ``weight (k, O*I*kh*kw)`` flattened from
    ``(O, I, kh, kw)``, ``bias (k, O)``, ``routing_fn.weight (k, C_in)``, ``routing_fn.bias (k,)``.
    Static padding only (timm's ``'same'`` at stride 1 is static).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_experts: int, padding: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.num_experts = in_channels, out_channels, num_experts
        self.kernel_size = (kernel_size, kernel_size)
        self.padding = (padding, padding)
        self.groups = 1
        self.weight_shape = (out_channels, in_channels // self.groups, *self.kernel_size)
        self.weight = torch.nn.Parameter(torch.empty(num_experts, math.prod(self.weight_shape)))
        self.bias = torch.nn.Parameter(torch.empty(num_experts, out_channels))
        self.routing_fn = torch.nn.Linear(in_channels, num_experts)
        # timm's reset_parameters: each expert initialised as a conv weight / bias of its own.
        fan_in = math.prod(self.weight_shape[1:])
        bound = 1 / math.sqrt(fan_in)
        with torch.no_grad():
            for n in range(num_experts):
                torch.nn.init.kaiming_uniform_(self.weight[n].view(self.weight_shape), a=math.sqrt(5))
                torch.nn.init.uniform_(self.bias[n], -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing_weights = torch.sigmoid(self.routing_fn(F.adaptive_avg_pool2d(x, 1).flatten(1)))
        B, C, H, W = x.shape
        weight = torch.matmul(routing_weights, self.weight)
        new_weight_shape = (B * self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        weight = weight.view(new_weight_shape)
        bias = torch.matmul(routing_weights, self.bias).view(B * self.out_channels)
        x = x.reshape(1, B * C, H, W)
        out = F.conv2d(x, weight, bias, stride=1, padding=self.padding, dilation=1, groups=self.groups * B)
        return out.permute([1, 0, 2, 3]).view(B, self.out_channels, out.shape[-2], out.shape[-1])


class DynamicAttention2d(torch.nn.Module):
    """``attention2d`` of kaijieshi7/Dynamic-convolution-Pytorch (dynamic_conv.py). Its ``in_planes == 3``
    special case (hidden = K) is not reached at C_in = 64 and is left out, as jdynconv has none."""

    def __init__(self, in_planes: int, ratios: float, K: int, temperature: float) -> None:
        super().__init__()
        hidden_planes = int(in_planes * ratios) + 1
        self.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc1 = torch.nn.Conv2d(in_planes, hidden_planes, 1, bias=False)
        self.fc2 = torch.nn.Conv2d(hidden_planes, K, 1, bias=True)
        self.temperature = temperature
        for m in (self.fc1, self.fc2):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        torch.nn.init.constant_(self.fc2.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(x)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.fc2(x).view(x.size(0), -1)
        return F.softmax(x / self.temperature, 1)


class DynamicConv2d(torch.nn.Module):
    """``Dynamic_conv2d`` of kaijieshi7/Dynamic-convolution-Pytorch (dynamic_conv.py), its forward as
    written there (groups = 1, bias on). Parameters: ``attention.fc1.weight (hidden, C_in, 1, 1)``,
    ``attention.fc2.weight (k, hidden, 1, 1)``, ``attention.fc2.bias (k,)``, ``weight (k, O, I, kh, kw)``,
    ``bias (k, O)``."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int,
        K: int,
        padding: int,
        temperature: float,
    ) -> None:
        super().__init__()
        self.in_planes, self.out_planes, self.kernel_size = in_planes, out_planes, kernel_size
        self.padding, self.groups, self.K = padding, 1, K
        self.attention = DynamicAttention2d(in_planes, ATTENTION_RATIO, K, temperature)
        self.weight = torch.nn.Parameter(torch.randn(K, out_planes, in_planes // self.groups, kernel_size, kernel_size))
        self.bias = torch.nn.Parameter(torch.zeros(K, out_planes))
        with torch.no_grad():
            for i in range(K):
                torch.nn.init.kaiming_uniform_(self.weight[i])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        softmax_attention = self.attention(x)
        batch_size, _, height, width = x.size()
        x = x.view(1, -1, height, width)
        weight = self.weight.view(self.K, -1)
        aggregate_weight = torch.mm(softmax_attention, weight).view(
            batch_size * self.out_planes, self.in_planes // self.groups, self.kernel_size, self.kernel_size
        )
        aggregate_bias = torch.mm(softmax_attention, self.bias).view(-1)
        output = F.conv2d(
            x, weight=aggregate_weight, bias=aggregate_bias, padding=self.padding, groups=self.groups * batch_size
        )
        return output.view(batch_size, self.out_planes, output.size(-2), output.size(-1))


class GroupedPerSampleConv2d(torch.nn.Module):
    """The layers' convolution alone, as both references run it: one conv with ``groups = B``, the per-sample
    kernels ``weight (B * O, I, kh, kw)`` and biases ``bias (B * O,)`` as parameters."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        self.batch, self.padding = case.batch, case.torch_padding
        kernel = (case.kernel, case.kernel)
        self.weight = torch.nn.Parameter(torch.empty(case.batch * case.features, case.in_channels, *kernel))
        self.bias = torch.nn.Parameter(torch.empty(case.batch * case.features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        out = F.conv2d(
            x.reshape(1, batch * channels, height, width), self.weight, self.bias, padding=self.padding, groups=batch
        )
        return out.view(batch, -1, out.shape[-2], out.shape[-1])


def torch_model(case: Case) -> torch.nn.Module:
    if case.layer == "CondConv":
        return TimmCondConv2d(case.in_channels, case.features, case.kernel, case.num_experts, case.torch_padding)
    return DynamicConv2d(
        case.in_channels, case.features, case.kernel, case.num_experts, case.torch_padding, TEMPERATURE
    )


StateDict = dict[str, np.ndarray]


def reference_state_dict(case: Case, seed: int) -> StateDict:
    """The PyTorch reference's own initial weights, with the bias banks and the routing / attention biases
    made non-zero (and different per expert) so the checks exercise their mixing."""
    torch.manual_seed(seed)
    model = torch_model(case)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("bias"):
                tensor.copy_(torch.empty_like(tensor).uniform_(-0.2, 0.2, generator=generator))
    return {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}


def conv_state_dict(case: Case, seed: int) -> StateDict:
    """Per-sample kernels and biases for the ``conv`` pass, scaled as PyTorch's default conv init."""
    rng = np.random.default_rng(seed)
    bound = 1 / math.sqrt(case.in_channels * case.kernel**2)
    kernel_shape = (case.batch * case.features, case.in_channels, case.kernel, case.kernel)
    return {
        "weight": rng.uniform(-bound, bound, kernel_shape).astype(np.float32),
        "bias": rng.uniform(-bound, bound, case.batch * case.features).astype(np.float32),
    }


# --- Weight conversion (by hand) ------------------------------------------------------------------------


def jax_params(case: Case, state: StateDict) -> dict[str, np.ndarray]:
    """PyTorch reference weights -> jdynconv ``params`` (kernel bank ``(k, kh, kw, C_in, C_out)``)."""
    k, kernel = case.num_experts, case.kernel
    if case.layer == "CondConv":
        bank = state["weight"].reshape(k, case.features, case.in_channels, kernel, kernel)  # (k, O, I, kh, kw)
        return {
            "kernel": np.ascontiguousarray(bank.transpose(0, 3, 4, 2, 1)),
            "bias": state["bias"].copy(),
            "routing_kernel": np.ascontiguousarray(state["routing_fn.weight"].T),
            "routing_bias": state["routing_fn.bias"].copy(),
        }
    return {
        "kernel": np.ascontiguousarray(state["weight"].transpose(0, 3, 4, 2, 1)),
        "bias": state["bias"].copy(),
        "attention_hidden_kernel": np.ascontiguousarray(state["attention.fc1.weight"][:, :, 0, 0].T),
        "attention_kernel": np.ascontiguousarray(state["attention.fc2.weight"][:, :, 0, 0].T),
        "attention_bias": state["attention.fc2.bias"].copy(),
    }


def torch_layout(case: Case, params: Mapping[str, Any]) -> StateDict:
    """jdynconv ``params`` (or gradients shaped like them) -> the PyTorch reference's names and layouts."""
    p = {name: np.asarray(value) for name, value in params.items()}
    bank = p["kernel"].transpose(0, 4, 3, 1, 2)  # (k, O, I, kh, kw)
    if case.layer == "CondConv":
        return {
            "weight": bank.reshape(case.num_experts, -1),
            "bias": p["bias"],
            "routing_fn.weight": p["routing_kernel"].T,
            "routing_fn.bias": p["routing_bias"],
        }
    return {
        "weight": bank,
        "bias": p["bias"],
        "attention.fc1.weight": p["attention_hidden_kernel"].T[:, :, None, None],
        "attention.fc2.weight": p["attention_kernel"].T[:, :, None, None],
        "attention.fc2.bias": p["attention_bias"],
    }


def conv_jax_params(case: Case, state: StateDict) -> dict[str, np.ndarray]:
    """The ``conv`` pass's parameters: ``weight (B * O, I, kh, kw)``
    -> ``kernels (B, kh, kw, I, O)``, ``bias (B * O,)`` -> ``(B, O)``."""
    weight = state["weight"].reshape(case.batch, case.features, case.in_channels, case.kernel, case.kernel)
    return {
        "kernels": np.ascontiguousarray(weight.transpose(0, 3, 4, 2, 1)),
        "bias": state["bias"].reshape(case.batch, case.features).copy(),
    }


def conv_torch_layout(case: Case, params: Mapping[str, Any]) -> StateDict:
    """The inverse of :func:`conv_jax_params` (for gradients)."""
    kernels = np.asarray(params["kernels"]).transpose(0, 4, 3, 1, 2)  # (B, O, I, kh, kw)
    return {"weight": kernels.reshape(-1, *kernels.shape[2:]), "bias": np.asarray(params["bias"]).reshape(-1)}


# --- Problems and competitors ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """One case's input (float32, NCHW), the reference's initial weights and the ``conv`` pass's."""

    case: Case
    x_nchw: np.ndarray
    state: StateDict
    conv_state: StateDict

    @classmethod
    def random(cls, case: Case, seed: int) -> Problem:
        rng = np.random.default_rng(seed)
        shape = (case.batch, case.in_channels, *case.spatial)
        # Per-(sample, channel) offsets make the pooled routing input O(1), so routings differ per sample.
        x = rng.standard_normal(shape, dtype=np.float32)
        x += rng.standard_normal((case.batch, case.in_channels, 1, 1), dtype=np.float32)
        return cls(case, x, reference_state_dict(case, seed), conv_state_dict(case, seed))

    def jax_input(self) -> jax.Array:
        return jax.device_put(np.ascontiguousarray(self.x_nchw.transpose(0, 2, 3, 1)))  # NHWC

    def torch_input(self, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(self.x_nchw).to(device)


@dataclasses.dataclass(frozen=True)
class Built:
    """A competitor ready to warm up: ``call`` runs once and returns the forward output (NCHW-comparable) or
    the training step's loss; ``gradients`` (train only) returns the loss gradients at the initial weights,
    in the reference's names and layouts, without touching the timed state."""

    call: Call
    gradients: Callable[[], StateDict] | None = None


class TrainState(NamedTuple):
    params: Any
    opt_state: Any


def jax_module(case: Case, mixing: str) -> nn.Module:
    cls = jdynconv.linen.CondConv if case.layer == "CondConv" else jdynconv.linen.DynamicConv
    return cls(features=case.features, kernel_size=case.kernel, num_experts=case.num_experts, mixing=mixing)


def build_jax(mixing: str, problem: Problem, mode: str) -> Built:
    case = problem.case
    module = jax_module(case, mixing)
    if mode == CONV_MODE:
        initial, to_torch = conv_jax_params(case, problem.conv_state), conv_torch_layout
    else:
        initial, to_torch = jax_params(case, problem.state), torch_layout
    # Fresh device copies: one competitor's donated buffers are never another's.
    params = {name: jnp.array(value, copy=True) for name, value in initial.items()}
    x = problem.jax_input()
    temperature = jnp.float32(TEMPERATURE)  # traced: one compiled program serves any temperature

    def apply(params: Any, inputs: jax.Array, temperature: jax.Array) -> jax.Array:
        if mode == CONV_MODE:
            return jdynconv.per_sample_conv(inputs, params["kernels"], params["bias"], padding="SAME")
        if case.layer == "DynamicConv":
            return module.apply({"params": params}, inputs, temperature)
        return module.apply({"params": params}, inputs)

    if mode == "fwd":
        forward = jax.jit(apply)
        return Built(lambda: jax.block_until_ready(forward(params, x, temperature)))

    def loss_fn(params: Any, inputs: jax.Array, temperature: jax.Array) -> jax.Array:
        return jnp.mean(jnp.square(apply(params, inputs, temperature)))

    tx = optax.sgd(LEARNING_RATE)

    def step(state: TrainState, inputs: jax.Array, temperature: jax.Array) -> tuple[TrainState, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(state.params, inputs, temperature)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state), loss

    # The state is donated, as in a Flax training loop: parameters update in place, as PyTorch's do.
    jitted_step = jax.jit(step, donate_argnums=0)
    grad_params = {name: jnp.array(value, copy=True) for name, value in params.items()}
    holder = [TrainState(params, tx.init(params))]

    def run_step() -> jax.Array:
        holder[0], loss = jitted_step(holder[0], x, temperature)
        jax.block_until_ready(holder[0])
        return loss

    def gradients() -> StateDict:
        return to_torch(case, jax.jit(jax.grad(loss_fn))(grad_params, x, temperature))

    return Built(run_step, gradients)


def build_torch(device: torch.device, problem: Problem, mode: str) -> Built:
    case = problem.case
    model, state = (
        (GroupedPerSampleConv2d(case), problem.conv_state) if mode == CONV_MODE else (torch_model(case), problem.state)
    )
    model.load_state_dict({name: torch.from_numpy(value.copy()) for name, value in state.items()})
    model = model.to(device)
    x = problem.torch_input(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if mode == "fwd":
        model.eval()

        def run_forward() -> torch.Tensor:
            with torch.inference_mode():
                y = model(x)
            sync()
            return y

        return Built(run_forward)

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)

    def run_step() -> torch.Tensor:
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sync()
        return loss.detach()

    def gradients() -> StateDict:
        model.zero_grad()
        model(x).square().mean().backward()
        grads = {name: p.grad.detach().cpu().numpy().copy() for name, p in model.named_parameters()}
        model.zero_grad()
        return grads

    return Built(run_step, gradients)


def builders(torch_device: torch.device, mode: str) -> dict[str, Callable[[Problem, str], Built]]:
    """The reference first: every other competitor is checked against its result. The ``conv`` pass has no
    mixing, so only ``jdynconv auto`` (``per_sample_conv``'s ``method="auto"``) runs it."""
    jax_builders = {name: functools.partial(build_jax, mixing) for name, mixing in zip(JAX_NAMES, MIXINGS, strict=True)}
    if mode == CONV_MODE:
        jax_builders = {SUBJECT: jax_builders[SUBJECT]}
    return {REFERENCE: functools.partial(build_torch, torch_device), **jax_builders}


# --- Timing ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    rounds: int
    min_sample_s: float


@dataclasses.dataclass
class Prepared:
    """A competitor after validation and warm-up: ready to time, or the reason it is not."""

    status: str  # "ok", "wrong" or "error"
    note: str = ""
    call: Call | None = None
    inner: int = 1
    first_call_s: float | None = None
    warm_call_s: float | None = None
    rel_error: float | None = None
    grad_rel_errors: dict[str, float] | None = None


@dataclasses.dataclass(frozen=True)
class Reference:
    result: np.ndarray
    gradients: StateDict | None


def as_nchw_numpy(result: object) -> np.ndarray:
    if isinstance(result, torch.Tensor):
        return result.detach().cpu().numpy().copy()  # a copy: a later call could overwrite a CPU view
    array = np.array(result)
    return array.transpose(0, 3, 1, 2) if array.ndim == 4 else array  # JAX's NHWC -> NCHW


def relative_error(result: np.ndarray, reference: np.ndarray) -> float:
    """``max|a - b| / max|b|``."""
    if result.shape != reference.shape:
        return math.inf
    return float(np.max(np.abs(result - reference)) / max(float(np.max(np.abs(reference))), 1e-30))


def prepare(built: Built, mode: str, reference: Reference | None, settings: Settings) -> tuple[Prepared, Reference]:
    """Validates (gradients first, at the initial weights), then warms one competitor."""
    gradients = built.gradients() if mode in ("train", CONV_MODE) and built.gradients is not None else None
    start = time.perf_counter()
    result = as_nchw_numpy(built.call())
    first_call_s = time.perf_counter() - start
    mine = Reference(result, gradients)
    rel_error, grad_errors = 0.0, None
    if reference is not None:
        rel_error = relative_error(result, reference.result)
        if gradients is not None and reference.gradients is not None:
            grad_errors = {
                name: relative_error(gradients.get(name, np.empty(0)), expected)
                for name, expected in reference.gradients.items()
            }
    if not rel_error <= TOLERANCE:
        what = "output" if mode == "fwd" else "loss"
        note = f"wrong {what} (rel. error {rel_error:.1e})"
        return Prepared("wrong", note, first_call_s=first_call_s, rel_error=rel_error), mine
    if grad_errors is not None and not max(grad_errors.values()) <= GRAD_TOLERANCE:
        worst = max(grad_errors, key=grad_errors.__getitem__)
        note = f"wrong gradient of {worst} (rel. error {grad_errors[worst]:.1e})"
        return Prepared(
            "wrong", note, first_call_s=first_call_s, rel_error=rel_error, grad_rel_errors=grad_errors
        ), mine
    warm_call_s = time_calls(built.call, 1)
    inner = inner_calls(built.call, warm_call_s, settings.min_sample_s)
    prepared = Prepared(
        "ok",
        call=built.call,
        inner=inner,
        first_call_s=first_call_s,
        warm_call_s=warm_call_s,
        rel_error=rel_error,
        grad_rel_errors=grad_errors,
    )
    return prepared, mine


def describe(entry: Prepared) -> str:
    if entry.status != "ok":
        return entry.note
    text = (
        f"first call {format_ms(entry.first_call_s)} ms, warm call {format_ms(entry.warm_call_s)} ms, "
        f"x{entry.inner} per sample, rel. error {entry.rel_error:.1e}"
    )
    if entry.grad_rel_errors:
        text += f", grads max rel. error {max(entry.grad_rel_errors.values()):.1e}"
    return text


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_case(index: int, case: Case, settings: Settings, torch_device: torch.device) -> dict[str, Any]:
    problem = Problem.random(case, seed=index)
    log(f"[{case.label}] auto -> {case.auto_mixing}")
    prepared: dict[tuple[str, str], Prepared] = {}
    for mode in MODES:
        reference: Reference | None = None
        for name, build in builders(torch_device, mode).items():
            try:
                entry, result = prepare(build(problem, mode), mode, reference, settings)
            except Exception as error:  # a failing competitor is reported, not fatal
                entry, result = Prepared("error", f"error ({type(error).__name__})"), None
                log(f"  {name} [{mode}] raised {error!r}")
            if name == REFERENCE:
                if entry.status != "ok" or result is None:
                    raise RuntimeError(f"The {REFERENCE} failed on {case.label}: {entry.note}")
                reference = result
            prepared[name, mode] = entry
            log(f"  {name:>20} [{mode:>5}] {describe(entry)}")
        if prepared[SUBJECT, mode].status != "ok":
            log(f"  !! {SUBJECT} [{mode}] does not match the {REFERENCE}: {prepared[SUBJECT, mode].note}")

    timed = {key: entry for key, entry in prepared.items() if entry.status == "ok" and entry.call is not None}
    stats = interleaved_medians(
        {f"{name} [{mode}]": entry.call for (name, mode), entry in timed.items()},  # type: ignore[misc]
        {f"{name} [{mode}]": entry.inner for (name, mode), entry in timed.items()},
        settings.rounds,
        seed=index,
        on_round=lambda r: log(f"  round {r + 1}/{settings.rounds}"),
    )

    results: dict[str, dict[str, Any]] = {mode: {} for mode in MODES}
    medians: dict[str, dict[str, float]] = {mode: {} for mode in MODES}
    for (name, mode), entry in prepared.items():
        record: dict[str, Any] = {"status": entry.status}
        if entry.note:
            record["note"] = entry.note
        for field in ("first_call_s", "warm_call_s", "rel_error", "grad_rel_errors"):
            if getattr(entry, field) is not None:
                record[field] = getattr(entry, field)
        if entry.status == "ok":
            stat = stats[f"{name} [{mode}]"]
            record.update(stat.as_json())
            medians[mode][name] = stat.median_s
        results[mode][name] = record

    ratios = {
        mode: {name: t / medians[mode][REFERENCE] for name, t in medians[mode].items() if name != REFERENCE}
        for mode in MODES
        if REFERENCE in medians[mode]
    }
    paired = {
        mode: {
            name: PairedRatio.of(stats[f"{name} [{mode}]"], stats[f"{REFERENCE} [{mode}]"]).as_json()
            for name in medians[mode]
            if name != REFERENCE
        }
        for mode in MODES
        if REFERENCE in medians[mode]
    }
    rest = {name: rest_of_step(results, name) for name in (SUBJECT, REFERENCE)}
    return {
        "index": index,
        "name": case.name,
        "description": case.description,
        **{field.name: getattr(case, field.name) for field in dataclasses.fields(case) if field.name != "name"},
        "hidden": case.hidden if case.layer == "DynamicConv" else None,
        "auto_mixing": case.auto_mixing,
        "reference": REFERENCE_SOURCES[case.layer],
        "results": results,
        "ratios": ratios,
        "paired_ratios": paired,
        "rest_of_step_ms": rest,
    }


# --- Reporting ------------------------------------------------------------------------------------------


def ratio_of(case_result: Mapping[str, Any], mode: str, name: str) -> float | None:
    return case_result["ratios"].get(mode, {}).get(name)


def case_cell(case: Mapping[str, Any]) -> str:
    return f"{case['name']} (auto -> {case['auto_mixing']})"


def time_table(case_results: Sequence[Mapping[str, Any]]) -> str:
    headers = ["case", "pass", *(f"{name} (ms)" for name in COMPETITORS)]
    rows = []
    for case in case_results:
        for mode in MODES:
            cells = []
            for name in COMPETITORS:
                record = case["results"][mode].get(name, {"status": "error", "note": "-"})
                cells.append(format_ms(record["median_ms"] / 1e3) if record["status"] == "ok" else record["note"])
            rows.append([case_cell(case) if mode == MODES[0] else "", mode, *cells])
    return markdown_table(headers, rows)


def ratio_table(case_results: Sequence[Mapping[str, Any]]) -> str:
    headers = ["case", "pass", *(f"{name} / torch" for name in JAX_NAMES), f"{SUBJECT} / torch per round"]
    rows = [
        [
            case_cell(case) if mode == MODES[0] else "",
            mode,
            *(format_ratio(ratio_of(case, mode, name)) for name in JAX_NAMES),
            per_round(case, mode, SUBJECT),
        ]
        for case in case_results
        for mode in MODES
    ]
    return markdown_table(headers, rows)


def per_round(case_result: Mapping[str, Any], mode: str, name: str) -> str:
    """``name`` / reference round by round: middle half of the ratios and the rounds won (see PairedRatio)."""
    return format_paired(case_result.get("paired_ratios", {}).get(mode, {}).get(name))


def target_lines(case_results: Sequence[Mapping[str, Any]]) -> list[str]:
    """The issue's target (training step no slower than the PyTorch reference), met or not, per case, with the
    ratio's spread over the rounds."""
    lines = []
    for case in case_results:
        ratio = ratio_of(case, "train", SUBJECT)
        verdict = "n/a" if ratio is None else ("met" if ratio <= 1.0 else "NOT met")
        lines.append(
            f"- {case['name']} ({case['layer']}, k={case['num_experts']}), train: {SUBJECT} / {REFERENCE} = "
            f"{format_ratio(ratio)} (target <= 1.0x): {verdict}; per round {per_round(case, 'train', SUBJECT)}"
        )
    return lines


def rest_of_step(results: Mapping[str, Mapping[str, Any]], name: str) -> dict[str, float] | None:
    """What routing, mixing and their gradients add to ``name``'s training step: ``train`` minus ``conv``,
    paired round by round (each round times both, close together), as median and quartiles in ms.

    A difference of two noisy times: its quartiles are the honest part. The ``conv`` pass also updates more
    parameters (B per-sample kernels, not k experts), which biases the difference down by that update.
    """
    train, conv = (results.get(mode, {}).get(name, {}) for mode in ("train", CONV_MODE))
    if train.get("status") != "ok" or conv.get("status") != "ok":
        return None
    inner = (train["inner_calls"], conv["inner_calls"])
    if inner != (1, 1):  # samples are then means over inner calls, no longer one call each: not paired
        return None
    differences = np.subtract(train["samples_ms"], conv["samples_ms"])
    p25, median, p75 = np.percentile(differences, [25, 50, 75])
    return {"median_ms": float(median), "p25_ms": float(p25), "p75_ms": float(p75)}


def format_rest(rest: Mapping[str, float] | None) -> str:
    if rest is None:
        return "-"
    return f"{rest['median_ms']:.0f} [{rest['p25_ms']:.0f}, {rest['p75_ms']:.0f}]"


def breakdown_lines(case_results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each case's training step split into the conv alone and the rest (paired per round: median
    [quartiles], ms), per framework."""
    lines = []
    for case in case_results:
        parts = []
        for name in (SUBJECT, REFERENCE):
            conv = case["results"].get(CONV_MODE, {}).get(name, {})
            conv_ms = format_ms(conv["median_ms"] / 1e3) if conv.get("status") == "ok" else "-"
            parts.append(f"{name}: conv alone {conv_ms} ms, rest {format_rest(case['rest_of_step_ms'].get(name))} ms")
        lines.append(f"- {case['name']}: " + "; ".join(parts))
    return lines


def header_lines(metadata: Mapping[str, Any], settings: Settings) -> list[str]:
    torch_where = metadata["torch_device"]
    if metadata.get("torch_cuda_device") and torch_where == "cuda":
        torch_where += f" ({metadata['torch_cuda_device']})"
    return [
        "# Kernel mixing (CondConv, DynamicConv): jdynconv vs the PyTorch references",
        "",
        f"- date: {metadata['date']}; platform: {metadata['platform']}; CPU: {metadata['cpu']} "
        f"({metadata['cpu_count']} logical cores)",
        f"- jax {metadata['jax']} / jaxlib {metadata['jaxlib']}, backend {metadata['jax_backend']}, "
        f"devices {metadata['jax_devices']} (kind {metadata['device_kind']})",
        f"- torch {metadata.get('torch')} on {torch_where}, torch threads {metadata.get('torch_num_threads')}",
        f"- float32, precision pinned to highest (no TF32); {settings.rounds} interleaved rounds, medians; "
        f"samples >= {settings.min_sample_s * 1e3:g} ms",
        f"- {REFERENCE}: CondConv -> {REFERENCE_SOURCES['CondConv']}; DynamicConv -> "
        f"{REFERENCE_SOURCES['DynamicConv']}",
        f"- DynamicConv temperature {TEMPERATURE:g} (end of the 30 -> 1 annealing; traced in jdynconv); "
        f"fwd: forward only; train: loss = mean(y^2), gradients w.r.t. all parameters, SGD(lr={LEARNING_RATE}); "
        f"{CONV_MODE}: the same step for the conv alone (per-sample kernels and biases as the parameters, "
        "so its SGD update is B kernels, not k)",
        f"- checked before timing: outputs / first losses within {TOLERANCE:g} relative, gradients of every "
        f"parameter within {GRAD_TOLERANCE:g}; ratios: jdynconv time / {REFERENCE} time (< 1: jdynconv faster)",
        f"- per round: {SUBJECT} / {REFERENCE} round by round (both timed in every round): its middle half "
        "(25th-75th percentile) and the rounds in which jdynconv was no slower",
    ]


def report_markdown(metadata: Mapping[str, Any], settings: Settings, case_results: Sequence[Mapping[str, Any]]) -> str:
    parts = [*header_lines(metadata, settings), "", "## Median times", "", time_table(case_results)]
    parts += ["", f"## Ratios (/ {REFERENCE})", "", ratio_table(case_results)]
    parts += [
        "",
        f"## Training step = conv alone ({CONV_MODE} pass) + rest (train - {CONV_MODE}, paired per round)",
        "",
    ]
    parts += [*breakdown_lines(case_results)]
    parts += ["", "## Targets", "", *target_lines(case_results), ""]
    return "\n".join(parts)


def write_reports(
    out_dir: Path,
    backend: str,
    metadata: Mapping[str, Any],
    settings: Settings,
    case_results: Sequence[Mapping[str, Any]],
) -> tuple[Path, Path, Path]:
    stem = f"kernel_mixing_{backend}"
    json_path, md_path, png_path = (out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png"))
    write_json(json_path, {"benchmark": "kernel_mixing", "metadata": dict(metadata), "cases": list(case_results)})
    md_path.write_text(report_markdown(metadata, settings, case_results))
    panels = {
        mode: {
            name.removeprefix("jdynconv "): [ratio_of(case, mode, name) for case in case_results]
            for name in ((SUBJECT,) if mode == CONV_MODE else JAX_NAMES)  # no mixing in the conv alone
        }
        for mode in MODES
    }
    plot_ratio_bars(
        png_path,
        groups=[case_cell(case) for case in case_results],
        panels=panels,
        title=(
            f"kernel_mixing, jdynconv / PyTorch reference ({metadata['device_kind']}, jax {metadata['jax']}, "
            f"torch {metadata.get('torch')}, {metadata['date'][:10]})"
        ),
        ylabel="time / PyTorch reference (log scale)",
        highlight="auto",
    )
    return json_path, md_path, png_path


# --- CLI ------------------------------------------------------------------------------------------------


def select_cases(tokens: Sequence[str] | None) -> list[tuple[int, Case]]:
    if not tokens:
        return list(enumerate(CASES))
    by_name = {case.name: i for i, case in enumerate(CASES)}
    chosen: list[int] = []
    for token in (part for raw in tokens for part in raw.split(",") if part):
        if token.isdigit() and int(token) < len(CASES):
            chosen.append(int(token))
        elif token in by_name:
            chosen.append(by_name[token])
        else:
            choices = ", ".join(f"{i}={case.name}" for i, case in enumerate(CASES))
            raise SystemExit(f"Unknown case {token!r}; choose indices or names among: {choices}.")
    return [(i, CASES[i]) for i in dict.fromkeys(chosen)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    case_list = "; ".join(f"{i}={case.label}" for i, case in enumerate(CASES))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK_ROUNDS} rounds, short samples")
    parser.add_argument("--rounds", type=int, help=f"timed rounds (default {DEFAULT_ROUNDS}, {QUICK_ROUNDS} quick)")
    parser.add_argument("--cases", nargs="+", help=f"indices or names, space or comma separated: {case_list}")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON, MD and PNG")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Read when JAX creates its GPU client (lazily, on first use): leave GPU memory to PyTorch as well.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    jax.config.update("jax_default_matmul_precision", "highest")
    backend = jax.default_backend()
    torch_device = torch.device("cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu")
    if torch_device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True  # PyTorch's best: shapes are fixed, so let cuDNN pick
    settings = Settings(
        rounds=args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS),
        min_sample_s=QUICK_MIN_SAMPLE_S if args.quick else DEFAULT_MIN_SAMPLE_S,
    )
    cases = select_cases(args.cases)
    metadata = environment_metadata() | {
        "torch_device": torch_device.type,
        "rounds": settings.rounds,
        "min_sample_ms": settings.min_sample_s * 1e3,
        "tolerance": TOLERANCE,
        "grad_tolerance": GRAD_TOLERANCE,
        "learning_rate": LEARNING_RATE,
        "temperature": TEMPERATURE,
        "references": REFERENCE_SOURCES,
        "quick": args.quick,
        "command": " ".join(sys.argv),
    }
    print("\n".join(header_lines(metadata, settings)) + "\n", flush=True)
    if backend == "gpu" and torch_device.type != "cuda":
        log("!! JAX runs on GPU but PyTorch has no CUDA: ratios compare a GPU with the CPU.")

    start = time.perf_counter()
    case_results: list[dict[str, Any]] = []
    paths: tuple[Path, ...] = ()
    for index, case in cases:
        case_results.append(bench_case(index, case, settings, torch_device))
        jax.clear_caches()
        paths = write_reports(args.out, backend, metadata, settings, case_results)
        log(f"  done in {time.perf_counter() - start:.0f} s so far; results in {paths[0]}")

    print("## Median times\n\n" + time_table(case_results))
    print(f"\n## Ratios (/ {REFERENCE})\n\n" + ratio_table(case_results))
    print("\n## Training step = conv alone + rest\n\n" + "\n".join(breakdown_lines(case_results)))
    print("\n## Targets\n\n" + "\n".join(target_lines(case_results)))
    print(f"\nWrote {', '.join(map(str, paths))} in {time.perf_counter() - start:.0f} s.")
    wrong = [
        f"{case['name']} {name} [{mode}]"
        for case in case_results
        for mode in MODES
        for name, record in case["results"][mode].items()
        if record["status"] in ("wrong", "error")
    ]
    if wrong:
        print(f"\nNot timed (wrong result or error): {', '.join(wrong)}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
