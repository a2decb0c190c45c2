"""BranchMixConv (the seed's weighted branch mixing): jdynconv vs PyTorch vs a naive JAX loop.

The block: gate = Flatten -> Linear(C*H*W, k) -> LeakyReLU; k branches Conv2d(3x3, padding 1) ->
BatchNorm2d -> LeakyReLU; output = sum_n gate[:, n] * branch_n(x). Competitors, all with the same weights
(converted by hand from the seed's PyTorch model):

- ``jdynconv``: ``jdynconv.linen.BranchMixConv`` with its defaults (``method="auto"``: on CPU the
  branches over cache-sized chunks of the batch), ``jdynconv fused`` with ``method="fused"`` (one conv
  over the whole batch, NHWC), and ``jdynconv remat`` with ``remat=True`` (a checkpointed scan over the
  branches);
- ``torch seed``: the seed's model as the seed writes it (ModuleList of Sequential(Conv2d, BatchNorm2d,
  LeakyReLU), stack, ``weights[:, :, None, None, None] * stacked``, ``sum(1)``) -- the reference;
- ``torch fused``: one Conv2d with k*F outputs, one BatchNorm2d(k*F), LeakyReLU, the weighted sum as one
  batched matmul (the fastest PyTorch formulation we know);
- ``jax naive loop``: a Python loop over k ``flax.linen.Conv -> BatchNorm -> leaky_relu`` branches,
  stacked and mixed like the seed.

Passes: ``fwd`` is the eval-mode forward (running statistics; no autograd in PyTorch); ``train`` is one
training step: train-mode BatchNorm, loss = MSE to a fixed random target, gradients w.r.t. all
parameters, an SGD update (JAX: one ``jax.jit`` step with optax.sgd, batch_stats mutable, state donated;
PyTorch: ``loss.backward(); opt.step(); opt.zero_grad()``). Before anything is timed, every forward is
checked against the seed model's (eval mode) and every first training loss against the seed model's.
Timing as in per_sample_conv.py: warm-up excluded, interleaved shuffled rounds, medians; ratios are
times over the seed model's (and over the fused PyTorch version's) on the same case and pass.

A program study runs first for the JAX variants at k = 2, 8, 32: training-step temp memory
(``memory_analysis().temp_size_in_bytes``), lower+compile wall time, and the number of jaxpr equations
of the training step, nested jaxprs included.

    PYTHONPATH=. python benchmarks/branch_mix.py            # full run -> benchmarks/results/
    PYTHONPATH=. python benchmarks/branch_mix.py --quick --out /tmp/bench_bm_smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
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
from _harness import Built, Check, Competitor, Settings, case_fields, log, run_case
from _report import format_ratio, markdown_table
from _timing import compile_stats, count_jaxpr_equations

import jdynconv.linen

MODES = ("fwd", "train")
SUBJECT = "jdynconv"
SUBJECT_FUSED = "jdynconv fused"
SUBJECT_REMAT = "jdynconv remat"
SEED_TORCH = "torch seed"
FUSED_TORCH = "torch fused"
NAIVE_JAX = "jax naive loop"
COMPETITORS = (SUBJECT, SUBJECT_FUSED, SUBJECT_REMAT, SEED_TORCH, FUSED_TORCH, NAIVE_JAX)
JAX_VARIANTS = (SUBJECT, SUBJECT_FUSED, SUBJECT_REMAT, NAIVE_JAX)
CHECK = Check(tolerance=1e-4)
LEARNING_RATE = 1e-2
STUDY_KS = (2, 8, 32)
DEFAULTS = harness.Defaults(rounds=15)
DEFAULT_COMPILE_REPEATS = 3
QUICK_COMPILE_REPEATS = 1
LEAKY_SLOPE = 0.01  # PyTorch's nn.LeakyReLU() default, and the seed's


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    num_branches: int
    batch: int = 128
    in_channels: int = 3
    spatial: tuple[int, int] = (32, 32)
    features: int = 32
    kernel: int = 3
    padding: int = 1

    @property
    def gate_dim(self) -> int:
        return self.in_channels * math.prod(self.spatial)

    @property
    def description(self) -> str:
        height, width = self.spatial
        return (
            f"B{self.batch} C{self.in_channels}->{self.features} S{height}x{width} "
            f"k{self.kernel}x{self.kernel} p{self.padding}, {self.num_branches} branches"
        )

    @property
    def label(self) -> str:
        return f"{self.name}: {self.description}"


CASES: tuple[Case, ...] = (Case("seed", num_branches=8), Case("k32", num_branches=32))


# --- Models and weights ---------------------------------------------------------------------------------


class SeedModel(torch.nn.Module):
    """The seed's model as the seed writes it (its parameter names are the ones jdynconv.interop uses)."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        k, channels, features = case.num_branches, case.in_channels, case.features
        self.mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(case.gate_dim, k), torch.nn.LeakyReLU())
        self.convs = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.Conv2d(channels, features, case.kernel, padding=case.padding),
                torch.nn.BatchNorm2d(features),
                torch.nn.LeakyReLU(),
            )
            for _ in range(k)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv_weights = self.mlp(x)
        conv_outputs = [conv(x) for conv in self.convs]
        conv_outputs = torch.stack(conv_outputs, dim=1)
        linear_comb = conv_weights[:, :, None, None, None] * conv_outputs
        return linear_comb.sum(1)


class FusedTorchModel(torch.nn.Module):
    """One Conv2d with k*F outputs (branch-major channels), one BatchNorm2d(k*F), one LeakyReLU, and the
    weighted sum as one batched matmul: PyTorch's best eager formulation of the seed's block."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        k, channels, features = case.num_branches, case.in_channels, case.features
        self.num_branches, self.features = k, features
        self.mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(case.gate_dim, k), torch.nn.LeakyReLU())
        self.conv = torch.nn.Conv2d(channels, k * features, case.kernel, padding=case.padding)
        self.bn = torch.nn.BatchNorm2d(k * features)
        self.act = torch.nn.LeakyReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.mlp(x)  # (B, k)
        branches = self.act(self.bn(self.conv(x)))  # (B, k * F, H, W)
        batch, _, height, width = branches.shape
        # sum_n w[b, n] * y[b, n]: (B, 1, k) @ (B, k, F*H*W) -- no (B, k, F, H, W) product is materialised.
        mixed = torch.bmm(weights.unsqueeze(1), branches.reshape(batch, self.num_branches, -1))
        return mixed.view(batch, self.features, height, width)


class NaiveBranchMix(nn.Module):
    """The naive JAX port: a Python loop over k flax Conv -> BatchNorm -> leaky_relu, stacked and mixed
    like the seed. Program size and compile time grow with k."""

    features: int
    num_branches: int
    kernel: int = 3
    padding: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, use_running_average: bool) -> jax.Array:
        # Channel-major flatten: PyTorch's nn.Flatten order over (C, H, W), as jdynconv's gate.
        gate_in = jnp.moveaxis(x, -1, 1).reshape(x.shape[0], -1)
        weights = nn.leaky_relu(nn.Dense(self.num_branches)(gate_in), LEAKY_SLOPE)
        outputs = []
        for _ in range(self.num_branches):
            y = nn.Conv(self.features, (self.kernel, self.kernel), padding=self.padding)(x)
            y = nn.BatchNorm(use_running_average=use_running_average, momentum=0.9, epsilon=1e-5)(y)
            outputs.append(nn.leaky_relu(y, LEAKY_SLOPE))
        stacked = jnp.stack(outputs, axis=1)  # (B, k, H, W, F)
        return (weights[:, :, None, None, None] * stacked).sum(1)


def jax_model(variant: str, case: Case) -> nn.Module:
    if variant == NAIVE_JAX:
        return NaiveBranchMix(case.features, case.num_branches, case.kernel, case.padding)
    return jdynconv.linen.BranchMixConv(
        features=case.features,
        kernel_size=case.kernel,
        num_branches=case.num_branches,
        padding=case.padding,
        remat=variant == SUBJECT_REMAT,
        method="fused" if variant == SUBJECT_FUSED else "auto",
    )


StateDict = dict[str, np.ndarray]


def seed_state_dict(case: Case, seed: int) -> StateDict:
    """A seed model's weights, with BatchNorm affine parameters and running statistics made non-trivial
    so that the eval-mode check exercises them."""
    torch.manual_seed(seed)
    model = SeedModel(case)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch in model.convs:
            norm = branch[1]
            for tensor, low, high in (
                (norm.weight, 0.5, 1.5),
                (norm.bias, -0.2, 0.2),
                (norm.running_mean, -0.2, 0.2),
                (norm.running_var, 0.5, 1.5),
            ):
                tensor.copy_(torch.empty_like(tensor).uniform_(low, high, generator=generator))
    return {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}


def conv_hwio(weight: np.ndarray) -> np.ndarray:
    """PyTorch OIHW -> Flax HWIO (spatial axes first, then in, then out)."""
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))


def jdynconv_variables(state: StateDict, k: int) -> dict[str, Any]:
    """The seed model's weights as ``BranchMixConv`` variables (its gate flattens channel-major, as torch)."""

    def stacked(suffix: str) -> np.ndarray:
        return np.stack([state[f"convs.{n}.{suffix}"] for n in range(k)])

    return {
        "params": {
            "gate_kernel": state["mlp.1.weight"].T.copy(),
            "gate_bias": state["mlp.1.bias"],
            "kernel": np.stack([conv_hwio(state[f"convs.{n}.0.weight"]) for n in range(k)]),
            "bias": stacked("0.bias"),
            "scale": stacked("1.weight"),
            "offset": stacked("1.bias"),
        },
        "batch_stats": {"mean": stacked("1.running_mean"), "var": stacked("1.running_var")},
    }


def naive_variables(state: StateDict, k: int) -> dict[str, Any]:
    params: dict[str, Any] = {"Dense_0": {"kernel": state["mlp.1.weight"].T.copy(), "bias": state["mlp.1.bias"]}}
    batch_stats: dict[str, Any] = {}
    for n in range(k):
        params[f"Conv_{n}"] = {"kernel": conv_hwio(state[f"convs.{n}.0.weight"]), "bias": state[f"convs.{n}.0.bias"]}
        params[f"BatchNorm_{n}"] = {"scale": state[f"convs.{n}.1.weight"], "bias": state[f"convs.{n}.1.bias"]}
        batch_stats[f"BatchNorm_{n}"] = {
            "mean": state[f"convs.{n}.1.running_mean"],
            "var": state[f"convs.{n}.1.running_var"],
        }
    return {"params": params, "batch_stats": batch_stats}


def fused_torch_state(state: StateDict, k: int) -> dict[str, torch.Tensor]:
    """Branch n's channels are n*F .. (n+1)*F - 1 of the fused conv and BatchNorm."""

    def cat(suffix: str) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([state[f"convs.{n}.{suffix}"] for n in range(k)]))

    return {
        "mlp.1.weight": torch.from_numpy(state["mlp.1.weight"]),
        "mlp.1.bias": torch.from_numpy(state["mlp.1.bias"]),
        "conv.weight": cat("0.weight"),
        "conv.bias": cat("0.bias"),
        "bn.weight": cat("1.weight"),
        "bn.bias": cat("1.bias"),
        "bn.running_mean": cat("1.running_mean"),
        "bn.running_var": cat("1.running_var"),
        "bn.num_batches_tracked": torch.tensor(0),
    }


def jax_variables(variant: str, state: StateDict, k: int) -> dict[str, Any]:
    """Fresh device arrays (copies), so one competitor's donated buffers are never another's."""
    variables = naive_variables(state, k) if variant == NAIVE_JAX else jdynconv_variables(state, k)
    return jax.tree.map(lambda a: jnp.array(a, copy=True), variables)


def torch_model(name: str, case: Case, state: StateDict, device: torch.device) -> torch.nn.Module:
    if name == SEED_TORCH:
        model: torch.nn.Module = SeedModel(case)
        model.load_state_dict({key: torch.from_numpy(value.copy()) for key, value in state.items()})
    else:
        model = FusedTorchModel(case)
        model.load_state_dict(fused_torch_state(state, case.num_branches))
    return model.to(device)


# --- Steps ----------------------------------------------------------------------------------------------


class TrainState(NamedTuple):
    params: Any
    batch_stats: Any
    opt_state: Any


def optimizer() -> optax.GradientTransformation:
    return optax.sgd(LEARNING_RATE)


def jax_train_step(model: nn.Module) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, jax.Array]]:
    """One SGD step on the MSE to ``target`` with train-mode BatchNorm (un-jitted)."""
    tx = optimizer()

    def loss_fn(params: Any, batch_stats: Any, x: jax.Array, target: jax.Array) -> tuple[jax.Array, Any]:
        out, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, use_running_average=False, mutable=["batch_stats"]
        )
        return jnp.mean(jnp.square(out - target)), updates["batch_stats"]

    def step(state: TrainState, x: jax.Array, target: jax.Array) -> tuple[TrainState, jax.Array]:
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, x, target
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), batch_stats, opt_state), loss

    return step


def jit_train_step(model: nn.Module) -> Any:
    # The state is donated, as in a Flax training loop: parameters update in place, as PyTorch's do.
    return jax.jit(jax_train_step(model), donate_argnums=0)


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """One case's data (float32): input and regression target in both layouts, and the shared weights."""

    case: Case
    x_nchw: np.ndarray
    target_nchw: np.ndarray
    state: StateDict

    @classmethod
    def random(cls, case: Case, seed: int) -> Problem:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((case.batch, case.in_channels, *case.spatial), dtype=np.float32)
        target = rng.standard_normal((case.batch, case.features, *case.spatial), dtype=np.float32)
        return cls(case, x, target, seed_state_dict(case, seed))

    @functools.cached_property
    def jax_data(self) -> tuple[jax.Array, jax.Array]:
        """(x, target) in NHWC on JAX's default device."""
        x, target = (
            jax.device_put(np.ascontiguousarray(a.transpose(0, 2, 3, 1))) for a in (self.x_nchw, self.target_nchw)
        )
        return x, target

    def torch_data(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.x_nchw).to(device), torch.from_numpy(self.target_nchw).to(device)


def build_jax(variant: str, problem: Problem, mode: str) -> Built:
    """The forward output (NHWC) or the training step's loss."""
    case = problem.case
    model = jax_model(variant, case)
    variables = jax_variables(variant, problem.state, case.num_branches)
    x, target = problem.jax_data
    if mode == "fwd":
        forward = jax.jit(lambda v, inputs: model.apply(v, inputs, use_running_average=True))
        return Built(lambda: jax.block_until_ready(forward(variables, x)), channels_last=True)

    step = jit_train_step(model)
    holder = [TrainState(variables["params"], variables["batch_stats"], optimizer().init(variables["params"]))]

    def run_step() -> jax.Array:
        holder[0], loss = step(holder[0], x, target)
        jax.block_until_ready(holder[0])
        return loss

    return Built(run_step)


def build_torch(name: str, device: torch.device, problem: Problem, mode: str) -> Built:
    model = torch_model(name, problem.case, problem.state, device)
    x, target = problem.torch_data(device)
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
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sync()
        return loss.detach()

    return Built(run_step)


def competitors(problem: Problem, torch_device: torch.device) -> list[Competitor]:
    """The reference first: every other competitor is checked against its result."""
    torch_side = [
        Competitor(name, functools.partial(build_torch, name, torch_device, problem))
        for name in (SEED_TORCH, FUSED_TORCH)
    ]
    jax_side = [Competitor(name, functools.partial(build_jax, name, problem)) for name in JAX_VARIANTS]
    return [*torch_side, *jax_side]


# --- Program study: temp memory, compile time, jaxpr size vs k --------------------------------------------


def abstract_train_args(variant: str, case: Case) -> tuple[TrainState, jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """Shapes only (nothing is computed): the training step's state, input and target."""
    model = jax_model(variant, case)
    height, width = case.spatial
    x = jax.ShapeDtypeStruct((case.batch, height, width, case.in_channels), jnp.float32)
    target = jax.ShapeDtypeStruct((case.batch, height, width, case.features), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, use_running_average=False), jax.random.key(0), x)
    opt_state = jax.eval_shape(optimizer().init, variables["params"])
    return TrainState(variables["params"], variables["batch_stats"], opt_state), x, target


def study_program(variant: str, case: Case, repeats: int) -> dict[str, Any]:
    """Training-step jaxpr equations (nested included), lower+compile time (median of ``repeats``
    compilations from scratch) and XLA's planned memory, for one variant and k."""
    model = jax_model(variant, case)
    args = abstract_train_args(variant, case)
    equations = count_jaxpr_equations(jax.make_jaxpr(jax_train_step(model))(*args))
    runs = [compile_stats(jit_train_step(model), *args) for _ in range(repeats)]
    # The median run (for an even count, the one nearest the median) stands for the point.
    median = statistics.median(run.total_s for run in runs)
    chosen = min(runs, key=lambda run: abs(run.total_s - median))
    return {
        "variant": variant,
        "k": case.num_branches,
        "jaxpr_equations": equations,
        "lower_plus_compile_s_samples": [run.total_s for run in runs],
        **chosen.as_json(),
    }


def run_study(ks: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for k in ks:
        for variant in JAX_VARIANTS:
            row = study_program(variant, Case(f"k{k}", num_branches=k), repeats)
            log(
                f"  [study] {variant:>14} k={k:<3} {row['jaxpr_equations']:>6} eqns, "
                f"lower+compile {row['lower_plus_compile_s']:.2f} s, temp {mib(row['temp_bytes'])} MiB"
            )
            rows.append(row)
    jax.clear_caches()
    return rows


def mib(num_bytes: int | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**20:.1f}"


def bench_case(index: int, case: Case, settings: Settings, torch_device: torch.device) -> dict[str, Any]:
    problem = Problem.random(case, seed=index)
    run = run_case(index, case.label, MODES, lambda mode: competitors(problem, torch_device), settings, CHECK, SUBJECT)
    ratios = {f"vs {baseline}": run.ratios(baseline, keep_baseline=True) for baseline in (SEED_TORCH, FUSED_TORCH)}
    return {**case_fields(index, case, case.description), "results": run.results, "ratios": ratios}


# --- Reporting ------------------------------------------------------------------------------------------


def ratio_of(case_result: Mapping[str, Any], baseline: str, mode: str, name: str) -> float | None:
    return case_result["ratios"].get(f"vs {baseline}", {}).get(mode, {}).get(name)


def time_table(case_results: Sequence[Mapping[str, Any]]) -> str:
    return report.time_table(case_results, MODES, COMPETITORS, lambda case: f"{case['name']}: {case['description']}")


def ratio_table(case_results: Sequence[Mapping[str, Any]]) -> str:
    """Each competitor's time over the seed model's / over the fused PyTorch version's."""
    names = [name for name in COMPETITORS if name != SEED_TORCH]
    return report.mode_table(
        ["case", "pass", *(f"{name}: / seed, / fused" for name in names)],
        case_results,
        MODES,
        lambda case, mode: [
            f"{format_ratio(ratio_of(case, SEED_TORCH, mode, name))}, "
            f"{format_ratio(ratio_of(case, FUSED_TORCH, mode, name))}"
            for name in names
        ],
    )


def study_table(study: Sequence[Mapping[str, Any]]) -> str:
    headers = ["variant", "k", "jaxpr eqns (nested)", "lower+compile (s)", "train temp (MiB)"]
    rows = [
        [
            row["variant"],
            str(row["k"]),
            str(row["jaxpr_equations"]),
            f"{row['lower_plus_compile_s']:.2f}",
            mib(row["temp_bytes"]),
        ]
        for variant in JAX_VARIANTS
        for row in study
        if row["variant"] == variant
    ]
    return markdown_table(headers, rows)


def study_row(study: Sequence[Mapping[str, Any]], variant: str, k: int) -> Mapping[str, Any] | None:
    return next((row for row in study if row["variant"] == variant and row["k"] == k), None)


def target_lines(case_results: Sequence[Mapping[str, Any]], study: Sequence[Mapping[str, Any]]) -> list[str]:
    """The issue's targets, met or not, from this run's numbers."""

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "NOT met")

    lines = []
    seed_case = next((case for case in case_results if case["name"] == "seed"), None)
    for mode in MODES:
        ratio = None if seed_case is None else ratio_of(seed_case, SEED_TORCH, mode, SUBJECT)
        lines.append(
            f"- seed shapes, {mode}: jdynconv / seed PyTorch model = {format_ratio(ratio)} "
            f"(target <= 0.5x, i.e. >= 2x faster): {verdict(None if ratio is None else ratio <= 0.5)}"
        )
    small, large = min(STUDY_KS), max(STUDY_KS)
    rows = [study_row(study, SUBJECT, k) for k in (small, large)]
    if all(rows):
        counts = [row["jaxpr_equations"] for row in rows if row]
        lines.append(
            f"- jdynconv training-step jaxpr equations, k={small} vs k={large}: {counts[0]} vs {counts[1]} "
            f"(target: equal): {verdict(counts[0] == counts[1])}"
        )
    remat = [study_row(study, SUBJECT_REMAT, k) for k in (small, large)]
    if all(remat) and all(row and row["temp_bytes"] for row in remat):
        low, high = (row["temp_bytes"] for row in remat if row)
        lines.append(
            f"- jdynconv remat training temp memory, k={large} / k={small}: {mib(high)} / {mib(low)} MiB = "
            f"{high / low:.2f}x (target <= 2x): {verdict(high / low <= 2)}"
        )
    return lines


def header_lines(metadata: Mapping[str, Any]) -> list[str]:
    return report.header_lines(
        "BranchMixConv: jdynconv vs PyTorch vs a naive JAX loop",
        metadata,
        report.timing_line(
            metadata, f"compile times: median of {metadata['compile_repeats']} compilations from scratch"
        ),
        "- fwd: eval mode (running statistics); train: train-mode BatchNorm, MSE to a fixed target, gradients "
        f"w.r.t. all parameters, SGD(lr={LEARNING_RATE}) update",
        "- ratios: time / the seed's PyTorch model's, and / the fused PyTorch version's (< 1: faster)",
    )


def summary(case_results: Sequence[Mapping[str, Any]], study: Sequence[Mapping[str, Any]]) -> str:
    """The report's tables: times, ratios, the program study, the issue's targets."""
    parts = ["## Median times", "", time_table(case_results)]
    parts += ["", "## Ratios (/ seed model, / fused PyTorch)", "", ratio_table(case_results)]
    if study:
        parts += ["", "## Training step: program size, compile time, temp memory vs k", "", study_table(study)]
    parts += ["", "## Targets", "", *target_lines(case_results, study)]
    return "\n".join(parts)


def plot_report(
    path: Path,
    case_results: Sequence[Mapping[str, Any]],
    study: Sequence[Mapping[str, Any]],
    title: str,
) -> None:
    """Top: bars of time / seed PyTorch model (log scale, line at 1) per pass. Bottom: train temp memory
    and compile time vs k for the JAX variants."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def plain_log_ticks(ax: Any) -> None:
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)

    names = [name for name in COMPETITORS if name != SEED_TORCH]
    groups = [case["name"] for case in case_results]
    ratios = {
        mode: {name: [ratio_of(case, SEED_TORCH, mode, name) for case in case_results] for name in names}
        for mode in MODES
    }
    fig = plt.figure(figsize=(12, 8.5))
    grid = fig.add_gridspec(2, 2, height_ratios=(3, 2))
    bar_axes = [fig.add_subplot(grid[0, i]) for i in range(len(MODES))]
    for ax, mode in zip(bar_axes, MODES, strict=True):
        report.draw_ratio_bars(ax, groups, ratios[mode], report.ratio_limits(ratios), SUBJECT, label_all=True)
        plain_log_ticks(ax)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_title(f"{mode}: time / seed PyTorch model (log)")
    bar_axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))

    memory_ax, compile_ax = fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    # Distinct markers and dashes: equal values (e.g. temp memory with and without remat) overlap.
    styles = {
        SUBJECT: ("o", "-", 9),
        SUBJECT_FUSED: ("D", "-.", 7),
        SUBJECT_REMAT: ("s", "--", 6),
        NAIVE_JAX: ("^", ":", 5),
    }
    for variant in JAX_VARIANTS:
        rows = sorted((row for row in study if row["variant"] == variant), key=lambda row: row["k"])
        ks = [row["k"] for row in rows]
        temps = [np.nan if row["temp_bytes"] is None else row["temp_bytes"] / 2**20 for row in rows]
        marker, linestyle, size = styles[variant]
        style = {"marker": marker, "linestyle": linestyle, "markersize": size, "label": variant}
        memory_ax.plot(ks, temps, **style)
        compile_ax.plot(ks, [row["lower_plus_compile_s"] for row in rows], **style)
    for ax, ylabel, panel_title in (
        (memory_ax, "MiB (log)", "training-step temp memory vs k"),
        (compile_ax, "seconds (log)", "training-step lower+compile time vs k"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        plain_log_ticks(ax)
        ax.set_xticks(list(STUDY_KS), [str(k) for k in STUDY_KS])
        ax.set_xlabel("k (branches)")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        ax.grid(which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(
    out_dir: Path,
    backend: str,
    metadata: Mapping[str, Any],
    case_results: Sequence[Mapping[str, Any]],
    study: Sequence[Mapping[str, Any]],
) -> tuple[Path, ...]:
    payload = {"benchmark": "branch_mix", "metadata": dict(metadata), "cases": list(case_results), "study": list(study)}
    markdown = "\n".join([*header_lines(metadata), "", summary(case_results, study), ""])
    title = report.plot_title("branch_mix", metadata)
    return report.write_reports(
        out_dir / f"branch_mix_{backend}", payload, markdown, lambda png: plot_report(png, case_results, study, title)
    )


# --- CLI ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = harness.parser(
        __doc__,
        DEFAULTS,
        Path("benchmarks/results"),
        quick_help=f"smoke test: {DEFAULTS.quick_rounds} rounds, short samples, {QUICK_COMPILE_REPEATS} "
        "compilation per study point",
    )
    parser.add_argument(
        "--compile-repeats",
        type=int,
        help=f"compilations per study point (default {DEFAULT_COMPILE_REPEATS}, {QUICK_COMPILE_REPEATS} quick)",
    )
    case_list = "; ".join(f"{i}={case.label}" for i, case in enumerate(CASES))
    parser.add_argument("--cases", nargs="+", help=f"indices or names, space or comma separated: {case_list}")
    parser.add_argument("--no-study", action="store_true", help="skip the memory / compile-time / jaxpr study")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    backend = harness.configure_jax()
    device = harness.torch_device(backend)
    settings = DEFAULTS.settings(args)
    cases = harness.select(CASES, args.cases)
    compile_repeats = args.compile_repeats or (QUICK_COMPILE_REPEATS if args.quick else DEFAULT_COMPILE_REPEATS)
    metadata = harness.run_metadata(
        args.quick,
        device.type,
        **settings.metadata(),
        compile_repeats=compile_repeats,
        tolerance=CHECK.tolerance,
        learning_rate=LEARNING_RATE,
        study_ks=list(STUDY_KS),
    )
    print("\n".join(header_lines(metadata)) + "\n", flush=True)
    study = [] if args.no_study else run_study(STUDY_KS, compile_repeats)
    return harness.run_cases(
        cases,
        lambda index, case: bench_case(index, case, settings, device),
        lambda results: write_reports(args.out, backend, metadata, results, study),
        lambda results: summary(results, study),
    )


if __name__ == "__main__":
    sys.exit(main())
