"""Per-position convolutions: jdynconv's fairseq layers and Involution against their PyTorch originals on CPU, time
and peak memory.

Two families of cases, each with its own report:

- ``lightconv`` (``lightconv_cpu.*``): fairseq's ``DynamicConv1dTBC`` (the main target) and
  ``LightweightConv1dTBC``, ``parity/lightconv_reference.py``'s line-by-line copies, at the shapes of fairseq's
  lightconv models on WMT'14 En-De: B 32, C 512, 16 heads, T 64 and 256, K 3/7/15/31, as the encoder (``padding_l
  = K // 2``) and the causal decoder (``padding_l = K - 1``), ``weight_softmax``, no weight dropout (0: the check
  must be deterministic), fairseq's defaults otherwise (no biases). Competitors, the same module and arrays, all
  ``(T, B, C)``: ``fairseq_band`` (``unfold=False``: the band-matrix path, fairseq's default for T <= 512; the
  reference), ``fairseq_unfold`` (``unfold=True``) and ``jdynconv`` (``jax.jit`` of the ``time_major`` layer that
  ``jdynconv.interop.from_torch`` builds from the module). The two fairseq paths disagree only for a causal
  ``K > T`` with ``weight_softmax``, which these shapes (K <= 31 < T) never have, so both are checked.
- ``involution`` (``involution_cpu.*``): d-li14's naive ``involution``, ``parity/involution_reference.py``
  (``involution_naive``, the reference), against ``jdynconv``'s ``Involution`` from ``from_torch``, at RedNet-50's
  stages at 224x224 ((C, map) = (64, 56), (128, 28), (256, 14), (512, 7)), kernel 7, stride 1, 16 channels a group,
  reduction 4, batch 8. PyTorch gets NCHW, jdynconv NHWC (moved outside timing); results and gradients are
  compared in PyTorch's layout. The BatchNorm runs in eval mode on both sides (running statistics, so the check is
  deterministic and a timed call changes no state); its running statistics are those of ``conv1``'s output on the
  case's input, its affine weights drawn near (1, 0).

Passes: ``fwd`` (PyTorch under ``inference_mode``); ``train``: the output and the gradients of ``sum(out * g)`` for
a fixed random cotangent ``g`` w.r.t. the input and every parameter (JAX: one jitted ``jax.vjp``; PyTorch: the
forward, then ``torch.autograd.grad``). Before anything is timed, the output is checked within 1e-4 of the
reference's (``max|a - b| / max|b|``), every gradient too (see ``CHECK``), by PyTorch parameter name (jdynconv's
gradients leave through ``interop.linen_to_torch``). Timing as the other benchmarks (``_harness``): interleaved
shuffled rounds, medians; ratios of jdynconv over every PyTorch competitor and, for ``lightconv``, over the faster
fairseq path of each pass (``fastest``). The issue's targets: ``train`` <= 1.0x the fastest fairseq path at every
shape, with lower peak memory than the unfold path; ``train`` <= 1.0x ``involution_naive``, with lower peak memory.

Peak memory (``_peak_memory``), never while timing: XLA's plan of the compiled program (temp + outputs) and the
peak of PyTorch's CPU allocator over one call (``torch.profiler``), both beyond the inputs and weights.

Needs torch only (no fairseq, no mmcv), so it runs in the repository's ``.venv``:

    .venv/bin/python benchmarks/per_position.py                      # -> docs/results/per_position/*_cpu.*
    .venv/bin/python benchmarks/per_position.py --family involution  # one family only
    .venv/bin/python benchmarks/per_position.py --quick --out /tmp/bench_per_position
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

# Kineto (torch.profiler) logs every start and stop to stderr; 6 silences it. Read when torch is imported.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import _harness as harness
import _report as report
import jax
import numpy as np
from _harness import Built, Check, Competitor, Settings, case_fields, log, run_case
from _peak_memory import mib, profiled, torch_peak_bytes, xla_bytes
from _report import format_paired, format_ratio, jdynconv_source, markdown_table, verdict

from jdynconv import interop

ROOT = Path(__file__).resolve().parents[1]
MODES = ("fwd", "train")
BAND = "fairseq_band"
UNFOLD = "fairseq_unfold"
NAIVE = "involution_naive"
SUBJECT = "jdynconv"
FASTEST = "fastest"  # the faster fairseq path of each pass, as a ratio's baseline
DYNAMIC = "DynamicConv1dTBC"
LIGHTWEIGHT = "LightweightConv1dTBC"
TARGETS = {"train": 1.0}  # the issue's: jdynconv's training step over the fastest PyTorch competitor's
# Gradients by max-norm relative error, as the outputs: every function here is smooth in its inputs and weights (but
# for involution's ReLU, whose kink no entry sits within rounding of at these shapes). Measured at the largest shapes
# of each kind: jdynconv's gradients within 1.5e-6 of the float64 references', the references' own float32 within
# 4.5e-6 of it (the naive involution's conv2 bias gradient, a sum over B * H * W = 25088 positions), jdynconv within
# 4.5e-6 of the float32 references; 1e-4 leaves 20x room and still fails a wrong function (O(1)).
CHECK = Check(1e-4, 1e-4, {"fwd": "output", "train": "output"})
DEFAULTS = harness.Defaults(rounds=7, quick_rounds=3, min_sample_s=0.05, quick_min_sample_s=0.01)
RESULTS = Path(__file__).resolve().parent / "results" / "per_position"

Arrays = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Family:
    """A family of cases and its report: the PyTorch competitors (the reference first), the baseline of the time
    target (one of them or ``FASTEST``) and of the memory target, and the keyword arguments of jdynconv's layer
    that the PyTorch module's mode does not give (``from_torch``'s extra attributes)."""

    name: str
    stem: str
    title: str
    torch_names: tuple[str, ...]
    time_baseline: str
    memory_baseline: str
    jax_attributes: Mapping[str, Any]

    @property
    def competitors(self) -> tuple[str, ...]:
        return (*self.torch_names, SUBJECT)

    @property
    def baselines(self) -> tuple[str, ...]:
        """The ratios' denominators: every PyTorch competitor, and the fastest of several."""
        return (*self.torch_names, FASTEST) if len(self.torch_names) > 1 else self.torch_names


LIGHTCONV = Family(
    "lightconv",
    "lightconv_cpu",
    "fairseq's LightweightConv1dTBC and DynamicConv1dTBC: jdynconv vs fairseq's band and unfold paths (CPU)",
    (BAND, UNFOLD),
    FASTEST,
    UNFOLD,
    {"deterministic": True},
)
INVOLUTION = Family(
    "involution",
    "involution_cpu",
    "Involution: jdynconv.linen.Involution vs d-li14's naive involution (CPU)",
    (NAIVE,),
    NAIVE,
    NAIVE,
    {"use_running_average": True},
)
FAMILIES = {family.name: family for family in (LIGHTCONV, INVOLUTION)}


@dataclasses.dataclass(frozen=True)
class SequenceCase:
    name: str
    layer: str  # DYNAMIC or LIGHTWEIGHT
    batch: int
    channels: int
    heads: int
    length: int
    kernel_size: int
    causal: bool

    family = LIGHTCONV

    @property
    def padding_l(self) -> int:
        """fairseq's lightconv models: ``K - 1`` in the decoder (causal), ``K // 2`` in the encoder."""
        return self.kernel_size - 1 if self.causal else self.kernel_size // 2

    @property
    def description(self) -> str:
        where = "decoder (causal)" if self.causal else "encoder"
        return (
            f"{self.layer} T{self.length} B{self.batch} C{self.channels}, {self.heads} heads, K{self.kernel_size} "
            f"padding_l {self.padding_l}, {where}, weight_softmax"
        )

    @property
    def label(self) -> str:
        layer = "Dyn" if self.layer == DYNAMIC else "Light"
        return f"{layer} T{self.length} K{self.kernel_size} {'dec' if self.causal else 'enc'}"


@dataclasses.dataclass(frozen=True)
class InvolutionCase:
    name: str
    batch: int
    channels: int
    size: int
    kernel_size: int = 7
    stride: int = 1
    group_channels: int = 16
    reduction_ratio: int = 4

    family = INVOLUTION

    @property
    def description(self) -> str:
        return (
            f"B{self.batch} {self.size}x{self.size} C{self.channels}, {self.kernel_size}x{self.kernel_size} stride "
            f"{self.stride}, {self.group_channels} channels a group, reduction {self.reduction_ratio}, BN eval"
        )

    @property
    def label(self) -> str:
        return f"B{self.batch} C{self.channels} {self.size}x{self.size}"


Case = SequenceCase | InvolutionCase


def sequence_case(
    layer: str, length: int, kernel_size: int, causal: bool, batch: int = 32, channels: int = 512, heads: int = 16
) -> SequenceCase:
    prefix = "dyn" if layer == DYNAMIC else "light"
    name = f"{prefix}-t{length}-k{kernel_size}-{'dec' if causal else 'enc'}"
    if (batch, channels, heads) != (32, 512, 16):
        name += f"-b{batch}-c{channels}-h{heads}"
    return SequenceCase(name, layer, batch, channels, heads, length, kernel_size, causal)


def involution_case(batch: int, channels: int, size: int) -> InvolutionCase:
    return InvolutionCase(f"inv-b{batch}-c{channels}-{size}", batch, channels, size)


# fairseq's lightconv WMT'14 En-De models: kernel sizes 3, 7, 15, 31 (and 31 again in the deeper layers), 16 heads
# over 512 channels; T 64 and 256 cover its sentence lengths. RedNet-50's stages at 224x224: channels 64 * 2**i on
# maps 56 / 2**i.
CASES: tuple[Case, ...] = (
    *(
        sequence_case(DYNAMIC, length, kernel_size, causal)
        for length in (64, 256)
        for kernel_size in (3, 7, 15, 31)
        for causal in (False, True)
    ),
    *(sequence_case(LIGHTWEIGHT, 256, kernel_size, causal) for kernel_size in (7, 31) for causal in (False, True)),
    *(involution_case(8, 64 * 2**i, 56 // 2**i) for i in range(4)),
)
QUICK_CASES: tuple[Case, ...] = (
    sequence_case(DYNAMIC, 16, 7, False, batch=2, channels=32, heads=4),
    sequence_case(LIGHTWEIGHT, 16, 5, True, batch=2, channels=32, heads=4),
    involution_case(2, 32, 8),
)


# --- Modules and arrays -----------------------------------------------------------------------------------


def sequence_module(case: SequenceCase, seed: int) -> Any:
    """fairseq's layer as its lightconv models build it (``weight_softmax``, no biases), no weight dropout."""
    import torch

    sys.path.insert(0, str(ROOT))
    from parity.lightconv_reference import DynamicConv1dTBC, LightweightConv1dTBC

    torch.manual_seed(seed)
    layer = DynamicConv1dTBC if case.layer == DYNAMIC else LightweightConv1dTBC
    return layer(
        case.channels,
        case.kernel_size,
        padding_l=case.padding_l,
        num_heads=case.heads,
        weight_dropout=0.0,
        weight_softmax=True,
    )


def involution_module(case: InvolutionCase, data: Arrays, seed: int) -> Any:
    """d-li14's ``involution`` in eval mode: ``conv1``'s BatchNorm holds the statistics of ``conv1``'s output on
    the case's input (so it normalises as a trained one would), its affine weights drawn near (1, 0)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from parity.involution_reference import involution

    torch.manual_seed(seed)
    module = involution(
        case.channels,
        case.kernel_size,
        case.stride,
        reduction_ratio=case.reduction_ratio,
        group_channels=case.group_channels,
    )
    batch_norm = module.conv1.bn
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        hidden = module.conv1.conv(torch.from_numpy(data["input"]))
        batch_norm.running_mean.copy_(hidden.mean(dim=(0, 2, 3)))
        batch_norm.running_var.copy_(hidden.var(dim=(0, 2, 3)))
        batch_norm.weight.uniform_(0.5, 1.5, generator=generator)
        batch_norm.bias.normal_(0.0, 0.1, generator=generator)
    return module.eval()


def arrays(case: Case, seed: int) -> Arrays:
    """The input and a fixed cotangent, float32, in PyTorch's layout: ``(T, B, C)`` or ``(B, C, H, W)``."""
    rng = np.random.default_rng(seed)
    if isinstance(case, SequenceCase):
        shape = out_shape = (case.length, case.batch, case.channels)
    else:
        out_size = -(-case.size // case.stride)
        shape, out_shape = (
            (case.batch, case.channels, case.size, case.size),
            (case.batch, case.channels, out_size, out_size),
        )
    return {
        "input": rng.standard_normal(shape, dtype=np.float32),
        "cotangent": rng.standard_normal(out_shape, dtype=np.float32),
    }


def to_jax_layout(array: np.ndarray) -> np.ndarray:
    """jdynconv's layout of a PyTorch array: channels last for images, fairseq's ``(T, B, C)`` as it is."""
    return np.ascontiguousarray(np.moveaxis(array, 1, -1)) if array.ndim == 4 else array


def to_torch_layout(array: np.ndarray) -> np.ndarray:
    return np.moveaxis(array, -1, 1) if array.ndim == 4 else array


# --- jdynconv ---------------------------------------------------------------------------------------------


def jax_problem(module: Any, family: Family) -> tuple[Any, Any, Any]:
    """The linen layer ``from_torch`` builds from ``module``, its variables, and its training step's
    computation ``(variables, x, g) -> (out, (param grads, input grad))``."""
    layer, variables = interop.from_torch(module, **family.jax_attributes)

    def train(variables: Any, x: jax.Array, cotangent: jax.Array) -> tuple[jax.Array, tuple[Any, jax.Array]]:
        def forward(params: Any, x: jax.Array) -> jax.Array:
            return layer.apply({**variables, "params": params}, x)

        out, vjp = jax.vjp(forward, variables["params"], x)
        return out, vjp(cotangent)

    return layer, variables, train


def jax_arrays(data: Arrays) -> tuple[jax.Array, jax.Array]:
    return tuple(jax.device_put(to_jax_layout(data[name])) for name in ("input", "cotangent"))


def build_jax(module: Any, family: Family, data: Arrays, mode: str) -> Built:
    layer, variables, train = jax_problem(module, family)
    x, cotangent = jax_arrays(data)
    channels_last = x.ndim == 4
    if mode == "fwd":
        forward_jit = jax.jit(layer.apply)
        return Built(lambda: jax.block_until_ready(forward_jit(variables, x)), channels_last=channels_last)
    train_jit = jax.jit(train)

    def gradients() -> dict[str, np.ndarray]:
        _, (param_grads, input_grad) = train_jit(variables, x, cotangent)
        by_name = interop.linen_to_torch(layer, {**variables, "params": param_grads})
        return {"input": to_torch_layout(np.asarray(input_grad)), **by_name}

    return Built(
        lambda: jax.block_until_ready(train_jit(variables, x, cotangent))[0], gradients, channels_last=channels_last
    )


# --- PyTorch ----------------------------------------------------------------------------------------------


def torch_calls(
    module: Any, data: Arrays, options: Mapping[str, Any], memory: dict[str, int] | None = None
) -> dict[str, Built]:
    """The module's passes, ``module(x, **options)``; the gradients for the checks are computed under the
    profiler, which puts the ``train`` peak memory in ``memory``."""
    import torch

    x = torch.from_numpy(data["input"].copy()).requires_grad_(True)
    cotangent = torch.from_numpy(data["cotangent"].copy())
    names, params = zip(*module.named_parameters(), strict=True)
    leaves = [x, *params]

    def run_forward() -> Any:
        with torch.inference_mode():
            return module(x, **options)

    def run_train() -> tuple[Any, tuple[Any, ...]]:
        out = module(x, **options)
        return out, torch.autograd.grad(out, leaves, cotangent)

    def gradients() -> dict[str, np.ndarray]:
        peak, (_, grads) = profiled(run_train)
        if memory is not None:
            memory["train"] = peak
        return {name: g.numpy().copy() for name, g in zip(("input", *names), grads, strict=True)}

    return {"fwd": Built(run_forward), "train": Built(lambda: run_train()[0], gradients)}


TORCH_OPTIONS: dict[str, Mapping[str, Any]] = {BAND: {"unfold": False}, UNFOLD: {"unfold": True}, NAIVE: {}}


def competitors(
    module: Any, family: Family, data: Arrays, memory: dict[str, dict[str, int]], mode: str
) -> list[Competitor]:
    """The reference first: the others are checked against it."""

    def build_torch(name: str, mode: str) -> Built:
        return torch_calls(module, data, TORCH_OPTIONS[name], memory.setdefault(name, {}))[mode]

    return [
        *(Competitor(name, functools.partial(build_torch, name)) for name in family.torch_names),
        Competitor(SUBJECT, functools.partial(build_jax, module, family, data)),
    ]


# --- Peak memory ------------------------------------------------------------------------------------------


def memory_record(module: Any, family: Family, data: Arrays, torch_train: Mapping[str, int]) -> dict[str, Any]:
    """Peak bytes of every competitor's passes. ``torch_train``: the PyTorch competitors' train peaks measured
    while checking (the others are measured here)."""
    layer, variables, train = jax_problem(module, family)
    x, cotangent = jax_arrays(data)
    record: dict[str, Any] = {
        "input_bytes": {name: int(array.nbytes) for name, array in data.items()},
        "parameter_bytes": int(sum(p.numel() * p.element_size() for p in module.parameters())),
        SUBJECT: {
            "fwd": xla_bytes(jax.jit(layer.apply), variables, x),
            "train": xla_bytes(jax.jit(train), variables, x, cotangent),
        },
    }
    for name in family.torch_names:
        calls = torch_calls(module, data, TORCH_OPTIONS[name])
        train_peak = torch_train.get(name)
        record[name] = {
            "fwd": {"peak_bytes": torch_peak_bytes(calls["fwd"].call)},
            "train": {"peak_bytes": train_peak if train_peak is not None else torch_peak_bytes(calls["train"].call)},
        }
    return record


# --- One case ---------------------------------------------------------------------------------------------


def timing_record(run: harness.CaseRun, family: Family) -> dict[str, Any]:
    """Ratios of every timed competitor over each baseline (``ratios[baseline][mode][name]``; ``FASTEST``: the
    faster PyTorch competitor of each pass, named in ``fastest``), and jdynconv's round-by-round ratios over the
    time target's baseline (``paired_ratios[mode]``)."""
    ratios = {name: run.ratios(name) for name in family.torch_names}
    fastest: dict[str, str] = {}
    for mode in MODES:
        timed = [name for name in family.torch_names if name in run.medians(mode)]
        if timed:
            fastest[mode] = min(timed, key=run.medians(mode).__getitem__)
    if FASTEST in family.baselines:
        ratios[FASTEST] = {
            mode: {SUBJECT: ratios[name][mode][SUBJECT]}
            for mode, name in fastest.items()
            if SUBJECT in ratios[name].get(mode, {})
        }
    paired: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        baseline = fastest.get(mode) if family.time_baseline == FASTEST else family.time_baseline
        pair = None if baseline is None else run.paired(baseline).get(mode, {}).get(SUBJECT)
        if pair is not None:
            paired[mode] = {SUBJECT: pair}
    return {"ratios": ratios, "fastest": fastest, "paired_ratios": paired}


def bench_case(index: int, case: Case, settings: Settings) -> dict[str, Any]:
    load_before = os.getloadavg()
    family = case.family
    data = arrays(case, seed=index)
    module = sequence_module(case, index) if isinstance(case, SequenceCase) else involution_module(case, data, index)
    torch_memory: dict[str, dict[str, int]] = {}
    run = run_case(
        index,
        f"{case.name}: {case.description}",
        MODES,
        functools.partial(competitors, module, family, data, torch_memory),
        settings,
        CHECK,
        SUBJECT,
    )
    log("  peak memory ...")
    memory = memory_record(
        module, family, data, {name: peaks["train"] for name, peaks in torch_memory.items() if "train" in peaks}
    )
    record = {
        "family": family.name,
        **case_fields(index, case, case.description),
        "results": run.results,
        **timing_record(run, family),
        "memory": memory,
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }
    record["targets_met"] = {
        mode: ratio_of(record, mode) is not None and ratio_of(record, mode) <= target
        for mode, target in TARGETS.items()
    }
    log(
        "  "
        + "; ".join(
            f"{mode} {format_ratio(ratio_of(record, mode, baseline))} / {baseline}"
            for mode in MODES
            for baseline in family.baselines
        )
        + "; peak MiB train: "
        + ", ".join(f"{name} {mib(memory[name]['train']['peak_bytes'])}" for name in family.competitors)
    )
    return record


# --- Reporting --------------------------------------------------------------------------------------------


def family_of(case: Mapping[str, Any]) -> Family:
    return FAMILIES[case["family"]]


def label_of(case: Mapping[str, Any]) -> str:
    kind = SequenceCase if case["family"] == LIGHTCONV.name else InvolutionCase
    return kind(**{f.name: case[f.name] for f in dataclasses.fields(kind)}).label


def ratio_of(case: Mapping[str, Any], mode: str, baseline: str | None = None) -> float | None:
    """jdynconv's time over ``baseline``'s (default: the time target's)."""
    baseline = baseline or family_of(case).time_baseline
    return case["ratios"].get(baseline, {}).get(mode, {}).get(SUBJECT)


def peak_ratio(case: Mapping[str, Any], mode: str, baseline: str | None = None) -> float | None:
    """jdynconv's peak memory over ``baseline``'s (default: the memory target's)."""
    memory = case["memory"]
    reference = memory[baseline or family_of(case).memory_baseline][mode]["peak_bytes"]
    return memory[SUBJECT][mode]["peak_bytes"] / reference if reference else None


def ratio_table(cases: Sequence[Mapping[str, Any]], family: Family) -> str:
    def title(mode: str, baseline: str) -> str:
        target = TARGETS.get(mode) if baseline == family.time_baseline else None
        return f"{mode} / {baseline}" + (f" (target {target:g}x)" if target is not None else "")

    headers = [
        "case",
        *(title(mode, baseline) for mode in MODES for baseline in family.baselines),
        *(f"{mode} per round" for mode in TARGETS),
        *(f"{mode} peak / {family.memory_baseline}" for mode in MODES),
    ]
    rows = [
        [
            label_of(case),
            *(
                verdict(ratio_of(case, mode, baseline), TARGETS.get(mode) if baseline == family.time_baseline else None)
                for mode in MODES
                for baseline in family.baselines
            ),
            *(format_paired(case["paired_ratios"].get(mode, {}).get(SUBJECT)) for mode in TARGETS),
            *(format_ratio(peak_ratio(case, mode)) for mode in MODES),
        ]
        for case in cases
    ]
    return markdown_table(headers, rows)


def memory_table(cases: Sequence[Mapping[str, Any]], family: Family) -> str:
    def cells(case: Mapping[str, Any], mode: str) -> list[str]:
        memory = case["memory"]
        return [
            *(mib(memory[name][mode]["peak_bytes"]) for name in family.competitors),
            *(format_ratio(peak_ratio(case, mode, name)) for name in family.torch_names),
        ]

    headers = [
        "case",
        "pass",
        *(f"{name} (MiB)" for name in family.competitors),
        *(f"{SUBJECT} / {name}" for name in family.torch_names),
    ]
    return report.mode_table(headers, cases, MODES, cells, label_of)


def misses(cases: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every case and target pass where jdynconv is slower than its target or needs at least the memory of its
    memory baseline (or was not timed)."""
    found = []
    for case in cases:
        for mode, target in TARGETS.items():
            ratio, peak = ratio_of(case, mode), peak_ratio(case, mode)
            if ratio is None or ratio > target:
                found.append(f"{label_of(case)} {mode} time {format_ratio(ratio)}")
            if peak is None or peak >= 1:
                found.append(f"{label_of(case)} {mode} peak memory {format_ratio(peak)}")
    return found


def header_lines(metadata: Mapping[str, Any], family: Family) -> list[str]:
    commit = (metadata.get("jdynconv_commit") or "?")[:12]
    uncommitted = metadata.get("jdynconv_uncommitted")
    if family is LIGHTCONV:
        competitors = (
            "- competitors, all on fairseq's (T, B, C): fairseq_band (forward(x, unfold=False), the band matrix, "
            "fairseq's default for T <= 512; the reference), fairseq_unfold (unfold=True), jdynconv (jax.jit of the "
            "time_major layer from interop.from_torch); weight_softmax, no weight dropout, no biases"
        )
        targets = (
            "ratios: jdynconv / each fairseq path and / the faster one of each pass (fastest); the issue's target: "
            "train <= 1.0x fastest, with lower peak memory than fairseq_unfold"
        )
    else:
        competitors = (
            "- competitors: involution_naive (d-li14's naive module, NCHW; the reference) and jdynconv (jax.jit of "
            "the Involution from interop.from_torch, NHWC, moved outside timing); BatchNorm in eval mode on both"
        )
        targets = "ratios: jdynconv / involution_naive; the issue's target: train <= 1.0x, with lower peak memory"
    return report.header_lines(
        family.title,
        metadata,
        f"- jdynconv at {commit}" + (f" with {', '.join(uncommitted)} uncommitted" if uncommitted else ""),
        report.timing_line(metadata),
        competitors,
        "- fwd: forward (PyTorch under inference_mode); train: output and gradients of sum(out * g) w.r.t. the "
        "input and every parameter (the training step without the optimizer's update)",
        "- checked before timing: output and every gradient within 1e-4 (max|a - b| / max|b|) of "
        f"{family.torch_names[0]}'s; " + targets + " (< 1: jdynconv faster or smaller)",
        "- peak memory beyond the inputs and weights: XLA's plan (temp + outputs) for JAX, the allocator's peak over "
        "one call for PyTorch (torch.profiler)",
    )


def summary_of(cases: Sequence[Mapping[str, Any]], family: Family) -> str:
    missed = misses(cases)
    return "\n".join(
        [
            "## Median times",
            "",
            report.time_table(cases, MODES, family.competitors, label_of),
            "",
            "## Ratios",
            "",
            ratio_table(cases, family),
            "",
            f"Targets missed: {'; '.join(missed)}." if missed else "Every target met.",
            "",
            "## Peak memory beyond the inputs and weights",
            "",
            memory_table(cases, family),
            "",
        ]
    )


def by_family(cases: Sequence[Mapping[str, Any]]) -> list[tuple[Family, list[Mapping[str, Any]]]]:
    """The cases grouped by family, in the order the families first appear."""
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for case in cases:
        grouped.setdefault(case["family"], []).append(case)
    return [(FAMILIES[name], group) for name, group in grouped.items()]


def summary(cases: Sequence[Mapping[str, Any]]) -> str:
    return "\n".join(f"# {family.name}\n\n{summary_of(group, family)}" for family, group in by_family(cases))


def plot(path: Path, cases: Sequence[Mapping[str, Any]], family: Family, metadata: Mapping[str, Any]) -> None:
    """jdynconv over the targets' baselines per case (log scale): time per pass (the target dashed) and peak
    memory per pass (1x dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [label_of(case) for case in cases]
    panels: dict[str, tuple[dict[str, list[float | None]], float]] = {
        f"time, {SUBJECT} / {family.time_baseline}": (
            {mode: [ratio_of(case, mode) for case in cases] for mode in MODES},
            TARGETS["train"],
        ),
        f"peak memory, {SUBJECT} / {family.memory_baseline}": (
            {mode: [peak_ratio(case, mode) for case in cases] for mode in MODES},
            1.0,
        ),
    }
    limits = report.ratio_limits({name: series for name, (series, _) in panels.items()})
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.6 * len(groups) + 2.0), 4.5 * len(panels)))
    for ax, (name, (series, line)) in zip(axes, panels.items(), strict=True):
        report.draw_ratio_bars(ax, groups, series, limits, label_all=True)
        ax.axhline(line, color="red", linestyle="--", linewidth=1, zorder=3, label="target")
        ax.set_title(name)
        ax.set_ylabel("ratio (log scale)")
        ax.set_xticks(np.arange(len(groups)), groups, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(report.plot_title(f"{family.name}, {SUBJECT} / PyTorch", metadata), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(out_dir: Path, metadata: Mapping[str, Any], cases: Sequence[Mapping[str, Any]]) -> tuple[Path, ...]:
    """One report per family with cases: ``<stem>.json``, ``.md``, ``.png`` in ``out_dir``."""
    metadata = {**metadata, "load_average": {**metadata["load_average"], "end": os.getloadavg()}}
    paths: list[Path] = []
    for family, group in by_family(cases):
        markdown = "\n".join([*header_lines(metadata, family), "", summary_of(group, family)])
        payload = {"benchmark": f"per_position_{family.name}", "metadata": metadata, "cases": list(group)}
        draw: Callable[[Path], None] = functools.partial(plot, cases=group, family=family, metadata=metadata)
        paths += report.write_reports(out_dir / family.stem, payload, markdown, draw)
    return tuple(paths)


def main(argv: Sequence[str] | None = None) -> int:
    parser = harness.parser(__doc__, DEFAULTS, RESULTS, quick_help="three small cases, 3 rounds, short samples")
    case_list = ", ".join(f"{i}={c.name}" for i, c in enumerate(CASES))
    parser.add_argument("--cases", nargs="+", help=f"indices or names, space or comma separated: {case_list}")
    parser.add_argument("--family", choices=sorted(FAMILIES), help="only this family's cases")
    args = parser.parse_args(argv)
    harness.configure_jax()
    import torch

    settings = DEFAULTS.settings(args)
    cases = harness.select(QUICK_CASES if args.quick and not args.cases else CASES, args.cases)
    if args.family:
        cases = [(index, case) for index, case in cases if case.family.name == args.family]
    metadata = harness.run_metadata(
        args.quick,
        "cpu",
        **settings.metadata(),
        **jdynconv_source(),
        targets=TARGETS,
        tolerance=CHECK.tolerance,
        grad_tolerance=CHECK.grad_tolerance,
        grad_norm=CHECK.grad_norm,
        batch_norm="eval",
        load_average={"start": os.getloadavg()},
    )
    log(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    for name in dict.fromkeys(case.family.name for _, case in cases):
        print("\n".join(header_lines(metadata, FAMILIES[name])) + "\n", flush=True)
    return harness.run_cases(
        cases,
        lambda index, case: bench_case(index, case, settings),
        lambda results: write_reports(args.out, metadata, results),
        summary,
    )


if __name__ == "__main__":
    sys.exit(main())
