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

import dataclasses
import functools
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import _harness as harness
import _report as report
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from _harness import Built, Check, Competitor, Settings, case_fields, run_case
from _report import format_ms, format_paired, format_ratio

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
# Forward outputs and first losses, and every parameter's gradient: max|a - b| / max|b|.
CHECK = Check(1e-4, 1e-4, {"fwd": "output", "train": "loss", "conv": "loss"})
LEARNING_RATE = 1e-2
TEMPERATURE = 1.0
ATTENTION_RATIO = 0.25
DEFAULTS = harness.Defaults(rounds=15)


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
        return Built(lambda: jax.block_until_ready(forward(params, x, temperature)), channels_last=True)

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


def competitors(problem: Problem, torch_device: torch.device, mode: str) -> list[Competitor]:
    """The reference first: every other competitor is checked against its result. The ``conv`` pass has no
    mixing, so only ``jdynconv auto`` (``per_sample_conv``'s ``method="auto"``) runs it."""
    names = (SUBJECT,) if mode == CONV_MODE else JAX_NAMES
    jax_side = [
        Competitor(name, functools.partial(build_jax, name.removeprefix("jdynconv "), problem)) for name in names
    ]
    return [Competitor(REFERENCE, functools.partial(build_torch, torch_device, problem)), *jax_side]


def bench_case(index: int, case: Case, settings: Settings, torch_device: torch.device) -> dict[str, Any]:
    problem = Problem.random(case, seed=index)
    label = f"{case.label}; auto -> {case.auto_mixing}"
    run = run_case(index, label, MODES, functools.partial(competitors, problem, torch_device), settings, CHECK, SUBJECT)
    return {
        **case_fields(index, case, case.description),
        "hidden": case.hidden if case.layer == "DynamicConv" else None,
        "auto_mixing": case.auto_mixing,
        "reference": REFERENCE_SOURCES[case.layer],
        "results": run.results,
        "ratios": run.ratios(REFERENCE),
        "paired_ratios": run.paired(REFERENCE),
        "rest_of_step_ms": {name: rest_of_step(run.results, name) for name in (SUBJECT, REFERENCE)},
    }


# --- Reporting ------------------------------------------------------------------------------------------


def ratio_of(case_result: Mapping[str, Any], mode: str, name: str) -> float | None:
    return case_result["ratios"].get(mode, {}).get(name)


def case_cell(case: Mapping[str, Any]) -> str:
    return f"{case['name']} (auto -> {case['auto_mixing']})"


def ratio_table(case_results: Sequence[Mapping[str, Any]]) -> str:
    return report.mode_table(
        ["case", "pass", *(f"{name} / torch" for name in JAX_NAMES), f"{SUBJECT} / torch per round"],
        case_results,
        MODES,
        lambda case, mode: [
            *(format_ratio(ratio_of(case, mode, name)) for name in JAX_NAMES),
            per_round(case, mode, SUBJECT),
        ],
        case_cell,
    )


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


def header_lines(metadata: Mapping[str, Any]) -> list[str]:
    return report.header_lines(
        "Kernel mixing (CondConv, DynamicConv): jdynconv vs the PyTorch references",
        metadata,
        report.timing_line(metadata),
        f"- {REFERENCE}: CondConv -> {REFERENCE_SOURCES['CondConv']}; DynamicConv -> "
        f"{REFERENCE_SOURCES['DynamicConv']}",
        f"- DynamicConv temperature {TEMPERATURE:g} (end of the 30 -> 1 annealing; traced in jdynconv); "
        f"fwd: forward only; train: loss = mean(y^2), gradients w.r.t. all parameters, SGD(lr={LEARNING_RATE}); "
        f"{CONV_MODE}: the same step for the conv alone (per-sample kernels and biases as the parameters, "
        "so its SGD update is B kernels, not k)",
        f"- checked before timing: outputs / first losses within {CHECK.tolerance:g} relative, gradients of every "
        f"parameter within {CHECK.grad_tolerance:g}; ratios: jdynconv time / {REFERENCE} time (< 1: jdynconv faster)",
        f"- per round: {SUBJECT} / {REFERENCE} round by round (both timed in every round): its middle half "
        "(25th-75th percentile) and the rounds in which jdynconv was no slower",
    )


def summary(case_results: Sequence[Mapping[str, Any]]) -> str:
    """The report's tables: times, ratios, the training step's breakdown, the issue's target."""
    parts = ["## Median times", "", report.time_table(case_results, MODES, COMPETITORS, case_cell)]
    parts += ["", f"## Ratios (/ {REFERENCE})", "", ratio_table(case_results), ""]
    parts += [f"## Training step = conv alone ({CONV_MODE} pass) + rest (train - {CONV_MODE}, paired per round)", ""]
    parts += [*breakdown_lines(case_results), "", "## Targets", "", *target_lines(case_results)]
    return "\n".join(parts)


def write_reports(
    out_dir: Path, backend: str, metadata: Mapping[str, Any], case_results: Sequence[Mapping[str, Any]]
) -> tuple[Path, ...]:
    payload = {"benchmark": "kernel_mixing", "metadata": dict(metadata), "cases": list(case_results)}
    markdown = "\n".join([*header_lines(metadata), "", summary(case_results), ""])
    panels = {
        mode: {
            name.removeprefix("jdynconv "): [ratio_of(case, mode, name) for case in case_results]
            for name in ((SUBJECT,) if mode == CONV_MODE else JAX_NAMES)  # no mixing in the conv alone
        }
        for mode in MODES
    }
    return report.write_reports(
        out_dir / f"kernel_mixing_{backend}",
        payload,
        markdown,
        lambda png: report.plot_ratio_bars(
            png,
            groups=[case_cell(case) for case in case_results],
            panels=panels,
            title=report.plot_title("kernel_mixing, jdynconv / PyTorch reference", metadata),
            ylabel="time / PyTorch reference (log scale)",
            highlight="auto",
        ),
    )


# --- CLI ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = harness.parser(__doc__, DEFAULTS, Path("benchmarks/results"))
    case_list = "; ".join(f"{i}={case.label}" for i, case in enumerate(CASES))
    parser.add_argument("--cases", nargs="+", help=f"indices or names, space or comma separated: {case_list}")
    args = parser.parse_args(argv)
    backend = harness.configure_jax()
    device = harness.torch_device(backend)
    settings = DEFAULTS.settings(args)
    metadata = harness.run_metadata(
        args.quick,
        device.type,
        **settings.metadata(),
        tolerance=CHECK.tolerance,
        grad_tolerance=CHECK.grad_tolerance,
        learning_rate=LEARNING_RATE,
        temperature=TEMPERATURE,
        references=REFERENCE_SOURCES,
    )
    print("\n".join(header_lines(metadata)) + "\n", flush=True)
    return harness.run_cases(
        harness.select(CASES, args.cases),
        lambda index, case: bench_case(index, case, settings, device),
        lambda results: write_reports(args.out, backend, metadata, results),
        summary,
    )


if __name__ == "__main__":
    sys.exit(main())
