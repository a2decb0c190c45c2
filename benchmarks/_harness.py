"""The harness every benchmark here runs on: command line, set-up, validated competitors, interleaved timing.

A benchmark file holds its cases and its competitors; this module does the rest the same way for all of them.
For each case and pass ("mode"), every competitor is built (a zero-argument call, see ``_timing``), run once
(compilation and first-call costs, never timed), and its result checked against the reference competitor's
(the first one listed) before anything is timed: a competitor that disagrees is marked ``wrong``, one that
raises ``error``, one too slow to time ``skipped``, and none of these is timed. The others (``ok``) are then
timed together, in interleaved shuffled rounds (``_timing.interleaved_medians``), and every competitor's JSON
record says what happened to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from _report import environment_metadata, format_ms
from _timing import Call, PairedRatio, Stats, inner_calls, interleaved_medians, time_calls

Arrays = tuple[np.ndarray, ...]
Gradients = Mapping[str, np.ndarray]
STATUSES = ("ok", "skipped", "wrong", "error")


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the report."""
    print(message, file=sys.stderr, flush=True)


# --- Settings and the command line ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a run times: ``rounds`` interleaved rounds, samples of at least ``min_sample_s``; competitors that
    may be skipped (``Competitor.capped``) are when a call takes longer than ``max_call_s``."""

    rounds: int
    min_sample_s: float
    max_call_s: float = math.inf

    def metadata(self) -> dict[str, Any]:
        """The settings every result file records."""
        return {"rounds": self.rounds, "min_sample_ms": self.min_sample_s * 1e3}


@dataclasses.dataclass(frozen=True)
class Defaults:
    """A benchmark's default settings, for a full run and for ``--quick`` (a smoke test)."""

    rounds: int
    quick_rounds: int = 3
    min_sample_s: float = 0.02
    quick_min_sample_s: float = 0.005

    def settings(self, args: argparse.Namespace, **extra: Any) -> Settings:
        quick = getattr(args, "quick", False)
        rounds = args.rounds or (self.quick_rounds if quick else self.rounds)
        return Settings(rounds, self.quick_min_sample_s if quick else self.min_sample_s, **extra)


class Named(Protocol):
    @property
    def name(self) -> str: ...


N = TypeVar("N", bound=Named)


def parser(
    doc: str,
    defaults: Defaults,
    out: Path,
    *,
    quick_help: str | None = None,
    out_help: str = "folder for JSON, MD and PNG",
) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--quick``, ``--rounds`` and ``--out``; add the benchmark's own."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    quick_help = quick_help or f"smoke test: {defaults.quick_rounds} rounds, short samples"
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--rounds", type=int, help=f"timed rounds (default {defaults.rounds}, {defaults.quick_rounds} quick)"
    )
    parser.add_argument("--out", type=Path, default=out, help=out_help)
    return parser


def select(items: Sequence[N], tokens: Sequence[str] | None, what: str = "case") -> list[tuple[int, N]]:
    """The items named by ``tokens`` (indices or names, each token possibly comma separated), in the order
    named, each once, with their indices; all of them when there are no tokens."""
    if not tokens:
        return list(enumerate(items))
    by_name = {item.name: i for i, item in enumerate(items)}
    chosen: list[int] = []
    for token in (part for raw in tokens for part in raw.split(",") if part):
        if token.isdigit() and int(token) < len(items):
            chosen.append(int(token))
        elif token in by_name:
            chosen.append(by_name[token])
        else:
            choices = ", ".join(f"{i}={item.name}" for i, item in enumerate(items))
            raise SystemExit(f"Unknown {what} {token!r}; choose indices or names among: {choices}.")
    return [(i, items[i]) for i in dict.fromkeys(chosen)]


# --- Set-up and metadata --------------------------------------------------------------------------------


def configure_jax() -> str:
    """Highest matmul precision (no TF32), GPU memory left to PyTorch too; returns JAX's backend."""
    # Read when JAX creates its GPU client (lazily, on first use).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    return jax.default_backend()


def torch_device(backend: str) -> Any:
    """PyTorch's device on JAX's kind of machine: CUDA (TF32 off, cuDNN's autotuner on) when JAX runs on GPU."""
    import torch

    device = torch.device("cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True  # PyTorch's best: shapes are fixed, so let cuDNN pick
    elif backend == "gpu":
        log("!! JAX runs on GPU but PyTorch has no CUDA: ratios compare a GPU with the CPU.")
    return device


def run_metadata(quick: bool, device: str, **fields: Any) -> dict[str, Any]:
    """The environment, PyTorch's device, the run's ``fields`` (settings, tolerances), ``--quick`` and the
    command line: what a result file must record."""
    return environment_metadata() | {"torch_device": device, **fields, "quick": quick, "command": " ".join(sys.argv)}


# --- Competitors: build, check, warm up -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Built:
    """One competitor's pass, ready to run: ``call`` runs it once, waits, and returns its result (an array, a
    tuple of arrays, a loss); ``gradients`` (training passes) returns the loss gradients at the initial weights,
    by the reference's names and in its layout, without touching the timed state. ``channels_last``: the
    result's 4-D arrays are NHWC and are compared with the reference's NCHW."""

    call: Call
    gradients: Callable[[], Gradients] | None = None
    channels_last: bool = False


@dataclasses.dataclass(frozen=True)
class Competitor:
    """A competitor of one case: ``build(mode)`` makes its pass. ``probe(mode, limit_s)``, when given, runs
    before the full call is built and returns an estimate of a call's seconds once one is over ``limit_s``
    (``Settings.max_call_s``; the competitor is then skipped), else None. ``capped`` competitors are skipped
    when their warm call is over that limit."""

    name: str
    build: Callable[[str], Built]
    probe: Callable[[str, float], float | None] | None = None
    capped: bool = False


@dataclasses.dataclass(frozen=True)
class Check:
    """What agreeing with the reference means: results within ``tolerance`` and every gradient within
    ``grad_tolerance`` (``max|a - b| / max|b|``, or with ``grad_norm="l2"`` ``||a - b||_2 / ||b||_2``, which a
    few entries off by their rounding do not dominate). ``result_names[mode]`` names the result in the note of
    a wrong one (``wrong loss (...)``)."""

    tolerance: float = 1e-4
    grad_tolerance: float = 1e-4
    result_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    grad_norm: str = "max"


@dataclasses.dataclass(frozen=True)
class Reference:
    """The reference competitor's result and gradients, what the others are checked against."""

    result: Arrays
    gradients: Gradients | None = None


@dataclasses.dataclass
class Prepared:
    """A competitor after checking and warm-up: ready to time (``ok``), or why it is not."""

    status: str  # one of STATUSES
    note: str = ""
    call: Call | None = None
    inner: int = 1
    first_call_s: float | None = None
    warm_call_s: float | None = None
    rel_error: float | None = None
    grad_rel_errors: dict[str, float] | None = None
    estimated_call_s: float | None = None

    def record(self) -> dict[str, Any]:
        """The JSON record of this competitor, before timing: its status, note and whatever was measured."""
        record: dict[str, Any] = {"status": self.status}
        if self.note:
            record["note"] = self.note
        for field in ("first_call_s", "warm_call_s", "rel_error", "grad_rel_errors", "estimated_call_s"):
            if getattr(self, field) is not None:
                record[field] = getattr(self, field)
        return record

    def describe(self) -> str:
        """One log line: the first and warm calls and the errors, or why it is not timed."""
        if self.status != "ok":
            if self.estimated_call_s is not None:
                return f"{self.note}: about {self.estimated_call_s:.3g} s/call"
            return self.note
        text = (
            f"first call {format_ms(self.first_call_s)} ms, warm call {format_ms(self.warm_call_s)} ms, "
            f"x{self.inner} per sample, rel. error {self.rel_error:.1e}"
        )
        if self.grad_rel_errors:
            text += f", grads max rel. error {max(self.grad_rel_errors.values()):.1e}"
        return text


def as_arrays(result: object, channels_last: bool = False) -> Arrays:
    """A call's result as NumPy copies (a CPU tensor's ``.numpy()`` is a view a later call could overwrite);
    with ``channels_last``, 4-D arrays from NHWC to NCHW."""
    parts = result if isinstance(result, tuple) else (result,)
    arrays = []
    for part in parts:
        if hasattr(part, "detach"):  # a torch.Tensor, possibly on a GPU
            arrays.append(part.detach().cpu().numpy().copy())
        else:
            array = np.array(part)
            arrays.append(array.transpose(0, 3, 1, 2) if channels_last and array.ndim == 4 else array)
    return tuple(arrays)


def relative_error(result: Sequence[np.ndarray], reference: Sequence[np.ndarray], norm: str = "max") -> float:
    """The largest ``max|a - b| / max|b|`` (``norm="max"``) or ``||a - b||_2 / ||b||_2`` (``norm="l2"``) over
    the pairs of arrays; infinite when the shapes differ."""
    if len(result) != len(reference) or any(a.shape != b.shape for a, b in zip(result, reference, strict=False)):
        return math.inf
    size = {"max": lambda a: float(np.max(np.abs(a), initial=0.0)), "l2": lambda a: float(np.linalg.norm(a))}[norm]
    errors = [size(a - b) / max(size(b), 1e-30) for a, b in zip(result, reference, strict=True)]
    return max(errors, default=0.0)


def check_note(check: Check, mode: str, rel_error: float, grad_errors: Mapping[str, float] | None) -> str | None:
    """Why a result disagrees with the reference's (the note of a ``wrong`` competitor), or None."""
    if not rel_error <= check.tolerance:  # NaN is wrong too
        what = check.result_names.get(mode)
        return f"wrong {what + ' ' if what else ''}(rel. error {rel_error:.1e})"
    if grad_errors and not max(grad_errors.values()) <= check.grad_tolerance:
        worst = max(grad_errors, key=grad_errors.__getitem__)
        norm = " (L2)" if check.grad_norm == "l2" else ""
        return f"wrong gradient of {worst} (rel. error{norm} {grad_errors[worst]:.1e})"
    return None


def prepare(
    competitor: Competitor, mode: str, reference: Reference | None, settings: Settings, check: Check
) -> tuple[Prepared, Reference | None]:
    """Probes, builds, checks (gradients first, at the initial weights) and warms one competitor; returns it
    with its own result (the reference for the others when it is the first)."""
    skip_note = f"skipped (>{settings.max_call_s:g} s/call)"
    estimate = competitor.probe(mode, settings.max_call_s) if competitor.probe is not None else None
    if estimate is not None and estimate > settings.max_call_s:
        return Prepared("skipped", skip_note, estimated_call_s=estimate), None
    built = competitor.build(mode)
    gradients = built.gradients() if built.gradients is not None else None
    start = time.perf_counter()
    result = as_arrays(built.call(), built.channels_last)
    first_call_s = time.perf_counter() - start
    mine = Reference(result, gradients)
    rel_error, grad_errors = 0.0, None
    if reference is not None:
        rel_error = relative_error(result, reference.result)
        if gradients is not None and reference.gradients is not None:
            grad_errors = {
                name: relative_error((gradients.get(name, np.empty(0)),), (expected,), check.grad_norm)
                for name, expected in reference.gradients.items()
            }
    note = check_note(check, mode, rel_error, grad_errors)
    measured = {"first_call_s": first_call_s, "rel_error": rel_error, "grad_rel_errors": grad_errors}
    if note is not None:
        return Prepared("wrong", note, **measured), mine
    warm_call_s = time_calls(built.call, 1)
    if competitor.capped and warm_call_s > settings.max_call_s:
        return Prepared("skipped", skip_note, first_call_s=first_call_s, estimated_call_s=warm_call_s), mine
    inner = inner_calls(built.call, warm_call_s, settings.min_sample_s)
    return Prepared("ok", call=built.call, inner=inner, warm_call_s=warm_call_s, **measured), mine


# --- A case: every competitor on every pass, timed together ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class CaseRun:
    """One case's outcome: ``results[mode][name]`` (the JSON records, times included) and the timed ``stats``."""

    results: dict[str, dict[str, dict[str, Any]]]
    stats: dict[tuple[str, str], Stats]

    def medians(self, mode: str) -> dict[str, float]:
        """Median seconds per call of the competitors timed on ``mode``, in the order they were listed."""
        return {name: self.stats[name, mode].median_s for name in self.results[mode] if (name, mode) in self.stats}

    def ratios(self, baseline: str, *, keep_baseline: bool = False) -> dict[str, dict[str, float]]:
        """Every timed competitor's median over ``baseline``'s, per mode on which ``baseline`` was timed."""
        ratios = {}
        for mode in self.results:
            medians = self.medians(mode)
            if baseline in medians:
                ratios[mode] = {
                    name: t / medians[baseline] for name, t in medians.items() if keep_baseline or name != baseline
                }
        return ratios

    def paired(self, baseline: str) -> dict[str, dict[str, dict[str, Any]]]:
        """Round-by-round ratios (``PairedRatio``) of every timed competitor over ``baseline``, per mode."""
        return {
            mode: {
                name: PairedRatio.of(self.stats[name, mode], self.stats[baseline, mode]).as_json()
                for name in self.medians(mode)
                if name != baseline
            }
            for mode in self.results
            if (baseline, mode) in self.stats
        }


def run_case(
    index: int,
    label: str,
    modes: Sequence[str],
    competitors: Callable[[str], Sequence[Competitor]],
    settings: Settings,
    check: Check,
    subject: str,
) -> CaseRun:
    """Prepares ``competitors(mode)`` for every mode (the first is the reference: it must succeed), then times
    every ``ok`` one in the same interleaved rounds (seeded by ``index``)."""
    log(f"[{label}]")
    prepared: dict[tuple[str, str], Prepared] = {}
    for mode in modes:
        listed = competitors(mode)
        width = max(len(competitor.name) for competitor in listed)
        reference: Reference | None = None
        for position, competitor in enumerate(listed):
            try:
                entry, result = prepare(competitor, mode, reference, settings, check)
            except Exception as error:  # a failing competitor is reported, not fatal
                entry, result = Prepared("error", f"error ({type(error).__name__})"), None
                log(f"  {competitor.name} [{mode}] raised {error!r}")
            if position == 0:
                if entry.status != "ok" or result is None:
                    raise RuntimeError(f"The reference {competitor.name} failed on {label}: {entry.note}")
                reference = result
            prepared[competitor.name, mode] = entry
            log(f"  {competitor.name:>{width}} [{mode:>5}] {entry.describe()}")
        if (subject, mode) in prepared and prepared[subject, mode].status != "ok":
            log(f"  !! {subject} [{mode}] is not timed: {prepared[subject, mode].note}")

    timed = {f"{name} [{mode}]": entry for (name, mode), entry in prepared.items() if entry.call is not None}
    stats = interleaved_medians(
        {key: entry.call for key, entry in timed.items() if entry.call is not None},
        {key: entry.inner for key, entry in timed.items()},
        settings.rounds,
        seed=index,
        on_round=lambda r: log(f"  round {r + 1}/{settings.rounds}"),
    )
    results: dict[str, dict[str, dict[str, Any]]] = {mode: {} for mode in modes}
    by_key: dict[tuple[str, str], Stats] = {}
    for (name, mode), entry in prepared.items():
        record = entry.record()
        if entry.call is not None:
            by_key[name, mode] = stats[f"{name} [{mode}]"]
            record.update(by_key[name, mode].as_json())
        results[mode][name] = record
    return CaseRun(results, by_key)


def case_fields(index: int, case: Any, description: str) -> dict[str, Any]:
    """The head of a case's JSON record: its index, name, description and every field of its dataclass."""
    fields = {field.name: getattr(case, field.name) for field in dataclasses.fields(case) if field.name != "name"}
    return {"index": index, "name": case.name, "description": description, **fields}


# --- A run: every case, reports rewritten after each ----------------------------------------------------

C = TypeVar("C")


def not_timed(case_results: Sequence[Mapping[str, Any]]) -> list[str]:
    """``case competitor [mode]`` of every competitor with a wrong result or an error."""
    return [
        f"{case['name']} {name} [{mode}]"
        for case in case_results
        for mode, records in case["results"].items()
        for name, record in records.items()
        if record["status"] in ("wrong", "error")
    ]


def run_cases(
    cases: Sequence[tuple[int, C]],
    bench: Callable[[int, C], dict[str, Any]],
    write: Callable[[list[dict[str, Any]]], Sequence[Path]],
    summary: Callable[[list[dict[str, Any]]], str],
) -> int:
    """Benchmarks every case, rewriting the reports after each (a long run keeps what it has), prints the
    ``summary``; exits non-zero when a competitor was wrong or raised."""
    import jax

    start = time.perf_counter()
    case_results: list[dict[str, Any]] = []
    paths: Sequence[Path] = ()
    for index, case in cases:
        case_results.append(bench(index, case))
        jax.clear_caches()
        paths = write(case_results)
        log(f"  done in {time.perf_counter() - start:.0f} s so far; results in {paths[0]}")
    print(summary(case_results))
    print(f"\nWrote {', '.join(map(str, paths))} in {time.perf_counter() - start:.0f} s.")
    wrong = not_timed(case_results)
    if wrong:
        print(f"\nNot timed (wrong result or error): {', '.join(wrong)}", file=sys.stderr)
    return 1 if wrong else 0
