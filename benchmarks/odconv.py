"""ODConv: jdynconv (jit) vs the original PyTorch formulation, forward and training step.

Shapes: B = 64, 64 -> 64 channels, 3x3 kernels, stride 1, padding 1 (jdynconv: ``"SAME"``), 4 experts, the
original's ``reduction=0.0625`` and ``min_channel=16`` (attention width 16), at 32x32 (the headline case) and
at 16x16 and 8x8, where ``attention_placement="auto"`` no longer folds (``|W| = 9 * 64 * 64`` exceeds
``P * 64``). Competitors, all with the same weights (the reference's initialisation, its BatchNorm and head
biases randomised so the checks exercise them; into jdynconv through ``jdynconv.interop``; inputs NCHW for
PyTorch, NHWC for JAX):

- ``torch reference``: ``parity/odconv_reference.py``'s ``ODConvNd`` with ``num_spatial=2``, the original
  ``ODConv2d`` (OSVAI/ODConv ``modules/odconv.py``, commit 0901cc1c) statement by statement: attentions on the
  activations, ``spatial * kernel * weight`` summed over the experts into ``(B * O, I, 3, 3)``, one conv with
  ``groups = B``;
- ``jdynconv auto``: ``jdynconv.linen.ODConv`` with ``attention_placement="auto"`` (the rule in
  ``jdynconv._odconv.choose_placement``; the report says what it picked: the same program as one of the next two);
- ``jdynconv kernel``: ``attention_placement="kernel"``, the channel and filter attentions folded into the kernel;
- ``jdynconv activations``: ``attention_placement="activations"``, the original's placement.

Passes: ``fwd`` is the forward in eval mode (the attention's BatchNorm on its running statistics; PyTorch under
``inference_mode``); ``train`` is one training step in train mode (batch statistics, running statistics
updated): loss = mean of the squared output, gradients w.r.t. all parameters (not the input, as in
kernel_mixing.py: a first layer's step), an SGD update (JAX: one ``jax.jit`` step with optax.sgd, state donated;
PyTorch: ``loss.backward(); opt.step(); opt.zero_grad()``); ``train+dx`` is the same step with the input's
gradient computed too (a layer inside a network: scaling the activations then needs no extra conv for the
channel attention's gradient). Temperature 1.0 (the end of the original's 30 -> 1 annealing), traced in
jdynconv. Before anything is timed, every jdynconv forward is checked against the reference's within 1e-4
relative, and for the training steps the first loss and the gradient of every parameter (and of the input).
Timing as kernel_mixing.py (both on ``_harness``: checks, warm-up): interleaved shuffled rounds, medians, ratios
jdynconv / reference (< 1: jdynconv faster) and per-round paired ratios.

Results go to ``benchmarks/results/odconv/odconv_<backend>.{json,md,png}``: a folder of their own, as
scaling.py's, since ``benchmarks/summary.py`` renders every top-level results JSON into SUMMARY.md.

    PYTHONPATH=. python benchmarks/odconv.py                        # -> benchmarks/results/odconv/
    PYTHONPATH=. python benchmarks/odconv.py --quick --out /tmp/bench_odconv
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import _harness as harness
import _report as report
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from _harness import Built, Check, Competitor, Settings, case_fields, run_case
from _report import format_paired, format_ratio

from jdynconv import _odconv, interop
from jdynconv import linen as jdc_linen
from parity.odconv_reference import ODConvNd

MODES = ("fwd", "train", "train+dx")
REFERENCE = "torch reference"
SUBJECT = "jdynconv auto"
PLACEMENTS = {SUBJECT: "auto", "jdynconv kernel": "kernel", "jdynconv activations": "activations"}
COMPETITORS = (*PLACEMENTS, REFERENCE)
REFERENCE_SOURCE = (
    "parity/odconv_reference.py ODConvNd (num_spatial=2): OSVAI/ODConv modules/odconv.py ODConv2d, commit 0901cc1c"
)
LEARNING_RATE = 1e-2
TEMPERATURE = 1.0
DEFAULTS = harness.Defaults(rounds=10)
# kernel_mixing.py's checks: the output, and the first loss and every gradient of both training passes.
CHECK = Check(1e-4, 1e-4, {"fwd": "output", "train": "loss", "train+dx": "loss"})
RESULTS = Path(__file__).resolve().parent / "results" / "odconv"

StateDict = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int = 64
    channels: int = 64
    spatial: tuple[int, int] = (32, 32)
    kernel: int = 3
    num_experts: int = 4

    @property
    def placements(self) -> dict[str, str]:
        """What ``attention_placement="auto"`` picks here for the channel and filter attentions."""
        kernel_elements = self.kernel**2 * self.channels * self.channels
        activations = self.spatial[0] * self.spatial[1] * self.channels  # stride 1, SAME: P_out = P_in
        picked = _odconv.choose_placement(kernel_elements, activations)
        return {"channel": picked, "filter": picked}

    @property
    def description(self) -> str:
        height, width = self.spatial
        return (
            f"ODConv B{self.batch} C{self.channels}->{self.channels} S{height}x{width} "
            f"k{self.kernel}x{self.kernel} same, {self.num_experts} experts"
        )


CASES = (Case("od-k4"), Case("od-k4-16x16", spatial=(16, 16)), Case("od-k4-8x8", spatial=(8, 8)))


def torch_model(case: Case) -> ODConvNd:
    return ODConvNd(case.channels, case.channels, case.kernel, padding=case.kernel // 2, kernel_num=case.num_experts)


def reference_state_dict(case: Case, seed: int) -> StateDict:
    """The reference's own initialisation, BatchNorm and the heads' biases randomised (it starts them at 1 and 0)."""
    torch.manual_seed(seed)
    model = torch_model(case)
    with torch.no_grad():
        for name, param in model.attention.named_parameters():
            if name.endswith("bias") and not name.startswith("bn"):
                param.uniform_(-0.5, 0.5)
        model.attention.bn.weight.uniform_(0.5, 1.5)
        model.attention.bn.bias.uniform_(-0.5, 0.5)
        model.attention.bn.running_mean.uniform_(-0.5, 0.5)
        model.attention.bn.running_var.uniform_(0.5, 2.0)
    return {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    case: Case
    x_nchw: np.ndarray
    state: StateDict

    @classmethod
    def random(cls, case: Case, seed: int) -> Problem:
        rng = np.random.default_rng(seed)
        shape = (case.batch, case.channels, *case.spatial)
        # Per-(sample, channel) offsets: the pooled descriptors are O(1) and the attentions differ per sample.
        x = rng.standard_normal(shape, dtype=np.float32)
        x += rng.standard_normal((case.batch, case.channels, 1, 1), dtype=np.float32)
        return cls(case, x, reference_state_dict(case, seed))


class TrainState(NamedTuple):
    params: Any
    batch_stats: Any
    opt_state: Any


def build_jax(placement: str, problem: Problem, mode: str) -> Built:
    case = problem.case
    module = jdc_linen.ODConv(
        case.channels,
        case.kernel,
        case.num_experts,
        momentum=0.9,
        unbiased_running_var=True,
        attention_placement=placement,
    )
    variables = interop.torch_to_linen(module, problem.state)
    parameter_names = [name for name in problem.state if "running" not in name and "num_batches" not in name]
    x = jax.device_put(np.ascontiguousarray(problem.x_nchw.transpose(0, 2, 3, 1)))
    temperature = jnp.float32(TEMPERATURE)  # traced: one compiled program serves any temperature
    if mode == "fwd":
        forward = jax.jit(lambda v, x, t: module.apply(v, x, t, use_running_average=True))
        return Built(lambda: jax.block_until_ready(forward(variables, x, temperature)), channels_last=True)

    def loss_fn(params: Any, stats: Any, inputs: jax.Array, t: jax.Array) -> tuple[jax.Array, Any]:
        y, updates = module.apply(
            {"params": params, "batch_stats": stats}, inputs, t, use_running_average=False, mutable=["batch_stats"]
        )
        return jnp.mean(jnp.square(y)), updates["batch_stats"]

    tx = optax.sgd(LEARNING_RATE)
    argnums = (0, 2) if mode == "train+dx" else (0,)
    value_and_grads = jax.value_and_grad(loss_fn, argnums=argnums, has_aux=True)

    def step(state: TrainState, inputs: jax.Array, t: jax.Array) -> tuple[TrainState, jax.Array, jax.Array]:
        (loss, stats), (grads, *input_grad) = value_and_grads(state.params, state.batch_stats, inputs, t)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        # The input's gradient is returned (summed), or XLA would not compute it.
        kept = jnp.sum(input_grad[0]) if input_grad else loss
        return TrainState(optax.apply_updates(state.params, updates), stats, opt_state), loss, kept

    # The state is donated, as in a Flax training loop: parameters update in place, as PyTorch's do.
    jitted_step = jax.jit(step, donate_argnums=0)
    copy = functools.partial(jax.tree.map, lambda a: jnp.array(a, copy=True))
    holder = [TrainState(copy(variables["params"]), copy(variables["batch_stats"]), tx.init(variables["params"]))]

    def run_step() -> jax.Array:
        holder[0], loss, kept = jitted_step(holder[0], x, temperature)
        jax.block_until_ready((holder[0], kept))
        return loss

    def gradients() -> StateDict:
        (grads, *input_grad), stats = jax.jit(jax.grad(loss_fn, argnums=argnums, has_aux=True))(
            variables["params"], variables["batch_stats"], x, temperature
        )
        exported = interop.linen_to_torch(module, {"params": grads, "batch_stats": stats})
        found = {name: exported[name] for name in parameter_names}
        return found | ({"input": np.asarray(input_grad[0]).transpose(0, 3, 1, 2)} if input_grad else {})

    return Built(run_step, gradients)


def build_torch(device: torch.device, problem: Problem, mode: str) -> Built:
    model = torch_model(problem.case)
    model.load_state_dict({name: torch.from_numpy(value.copy()) for name, value in problem.state.items()})
    model.update_temperature(TEMPERATURE)
    model = model.to(device)
    x = torch.from_numpy(problem.x_nchw).to(device)
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
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    x.requires_grad_(mode == "train+dx")

    def run_step() -> torch.Tensor:
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        x.grad = None
        sync()
        return loss.detach()

    def gradients() -> StateDict:
        model.zero_grad()
        model(x).square().mean().backward()
        grads = {name: p.grad.detach().cpu().numpy().copy() for name, p in model.named_parameters()}
        if x.grad is not None:
            grads["input"] = x.grad.detach().cpu().numpy().copy()
            x.grad = None
        model.zero_grad()
        model.load_state_dict(initial)  # the train-mode forward moved the running statistics
        return grads

    return Built(run_step, gradients)


def competitors(problem: Problem, device: torch.device, mode: str) -> list[Competitor]:
    """The reference first: every other competitor is checked against its result."""
    jax_side = [
        Competitor(name, functools.partial(build_jax, placement, problem)) for name, placement in PLACEMENTS.items()
    ]
    return [Competitor(REFERENCE, functools.partial(build_torch, device, problem)), *jax_side]


def bench_case(index: int, case: Case, settings: Settings, device: torch.device) -> dict[str, Any]:
    problem = Problem.random(case, seed=index)
    label = f"{case.name}: {case.description}; auto -> {case.placements}"
    run = run_case(index, label, MODES, functools.partial(competitors, problem, device), settings, CHECK, SUBJECT)
    return {
        **case_fields(index, case, case.description),
        "auto_placement": case.placements,
        "reference": REFERENCE_SOURCE,
        "results": run.results,
        "ratios": run.ratios(REFERENCE),
        "paired_ratios": run.paired(REFERENCE),
    }


# --- Reporting ------------------------------------------------------------------------------------------


def ratio_of(case: Mapping[str, Any], mode: str, name: str) -> float | None:
    return case["ratios"].get(mode, {}).get(name)


def ratio_table(case_results: Sequence[Mapping[str, Any]]) -> str:
    jax_names = tuple(PLACEMENTS)
    return report.mode_table(
        ["case", "pass", *(f"{name} / torch" for name in jax_names), *(f"{n} / torch per round" for n in jax_names)],
        case_results,
        MODES,
        lambda case, mode: [
            *(format_ratio(ratio_of(case, mode, name)) for name in jax_names),
            *(format_paired(case["paired_ratios"].get(mode, {}).get(name)) for name in jax_names),
        ],
    )


def header_lines(metadata: Mapping[str, Any]) -> list[str]:
    return report.header_lines(
        "ODConv: jdynconv vs the original PyTorch formulation",
        metadata,
        report.timing_line(metadata),
        f"- {REFERENCE}: {REFERENCE_SOURCE}",
        f"- temperature {TEMPERATURE:g} (traced in jdynconv); fwd: eval-mode forward; train: train-mode step, "
        f"loss = mean(y^2), gradients w.r.t. all parameters, SGD(lr={LEARNING_RATE}); train+dx: the same step "
        "with the input's gradient too (a layer inside a network)",
        "- checked before timing: outputs / first losses and every parameter's gradient within 1e-4 relative; "
        f"ratios: jdynconv time / {REFERENCE} time (< 1: jdynconv faster); per round: the middle half of the "
        "per-round ratios and the rounds in which jdynconv was no slower",
    )


def summary(case_results: Sequence[Mapping[str, Any]]) -> str:
    parts = ["## Median times", "", report.time_table(case_results, MODES, COMPETITORS)]
    return "\n".join([*parts, "", f"## Ratios (/ {REFERENCE})", "", ratio_table(case_results)])


def write_reports(
    out_dir: Path, backend: str, metadata: Mapping[str, Any], cases: Sequence[Mapping[str, Any]]
) -> tuple[Path, ...]:
    placements = "; ".join(f"{case['name']}: auto -> {case['auto_placement']}" for case in cases)
    markdown = "\n".join([*header_lines(metadata), f"- {placements}", "", summary(cases), ""])
    panels = {
        mode: {name.removeprefix("jdynconv "): [ratio_of(case, mode, name) for case in cases] for name in PLACEMENTS}
        for mode in MODES
    }
    return report.write_reports(
        out_dir / f"odconv_{backend}",
        {"benchmark": "odconv", "metadata": dict(metadata), "cases": list(cases)},
        markdown,
        lambda png: report.plot_ratio_bars(
            png,
            groups=[case["name"] for case in cases],
            panels=panels,
            title=report.plot_title("odconv, jdynconv / original PyTorch", metadata),
            ylabel="time / PyTorch reference (log scale)",
            highlight="auto",
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = harness.parser(__doc__, DEFAULTS, RESULTS).parse_args(argv)
    backend = harness.configure_jax()
    device = harness.torch_device(backend)
    settings = DEFAULTS.settings(args)
    metadata = harness.run_metadata(
        args.quick,
        device.type,
        **settings.metadata(),
        learning_rate=LEARNING_RATE,
        temperature=TEMPERATURE,
        reference=REFERENCE_SOURCE,
    )
    print("\n".join(header_lines(metadata)) + "\n", flush=True)
    return harness.run_cases(
        list(enumerate(CASES)),
        lambda index, case: bench_case(index, case, settings, device),
        lambda results: write_reports(args.out, backend, metadata, results),
        summary,
    )


if __name__ == "__main__":
    sys.exit(main())
