"""Timing and reporting helpers shared by the benchmarks in this folder.

Methodology (DESIGN.md, "Speed work"): every competitor is warmed up first (so JAX compilation is never
timed), then timed in R rounds; each round runs every competitor once in a freshly shuffled order, so
slow drifts of a noisy machine hit all of them alike, and the report uses per-competitor medians. A
"call" is a zero-argument function that runs the computation once and waits for its result
(``jax.block_until_ready``, ``torch.cuda.synchronize``); tiny calls are repeated ``inner`` times per
timed sample so each sample is long enough for the clock.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

Call = Callable[[], object]


@dataclass(frozen=True)
class Stats:
    """Per-call times of one competitor over the timed rounds, in seconds."""

    samples_s: tuple[float, ...]
    inner: int

    @property
    def median_s(self) -> float:
        return float(np.median(self.samples_s))

    def as_json(self) -> dict[str, Any]:
        p25, p75 = np.percentile(self.samples_s, [25, 75])
        return {
            "median_ms": self.median_s * 1e3,
            "p25_ms": float(p25) * 1e3,
            "p75_ms": float(p75) * 1e3,
            "inner_calls": self.inner,
            "samples_ms": [s * 1e3 for s in self.samples_s],
        }


@dataclass(frozen=True)
class PairedRatio:
    """One competitor's time over another's, round by round: both are timed in every round, close together,
    so a slow spell of the machine hits both and the per-round ratios show how much of a median ratio is
    noise. ``at_most_one`` counts the rounds in which the numerator was no slower (ratio <= 1)."""

    median: float
    p25: float
    p75: float
    rounds: int
    at_most_one: int

    @classmethod
    def of(cls, numerator: Stats, denominator: Stats) -> PairedRatio:
        if len(numerator.samples_s) != len(denominator.samples_s) or not numerator.samples_s:
            raise ValueError(
                f"paired ratios need the same rounds on both sides, got {len(numerator.samples_s)} and "
                f"{len(denominator.samples_s)} samples"
            )
        ratios = np.divide(numerator.samples_s, denominator.samples_s)
        p25, median, p75 = np.percentile(ratios, [25, 50, 75])
        return cls(float(median), float(p25), float(p75), int(ratios.size), int(np.sum(ratios <= 1.0)))

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """E.g. ``1.7x-1.9x, <= 1.0x in 2/15``: the middle half of the per-round ratios and the rounds won."""
        return f"{self.p25:.3g}x-{self.p75:.3g}x, <= 1.0x in {self.at_most_one}/{self.rounds}"


def time_calls(call: Call, count: int) -> float:
    """Seconds per call, averaged over ``count`` back-to-back calls (garbage collector paused, as timeit)."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(count):
            call()
        return (time.perf_counter() - start) / count
    finally:
        if gc_was_enabled:
            gc.enable()


def inner_calls(call: Call, per_call_s: float, min_sample_s: float, max_inner: int = 10_000) -> int:
    """How many calls one timed sample needs to last at least ``min_sample_s``.

    ``per_call_s`` is a first estimate (one warm call). Calls that are not clearly longer than a sample
    are re-measured over a sample's worth of calls, twice: a single short call is dominated by noise, and
    the first warm calls can still pay one-off set-up (oneDNN primitives, allocator growth).
    """
    for _ in range(2):
        if per_call_s >= 3 * min_sample_s:
            break
        count = min(max_inner, math.ceil(min_sample_s / max(per_call_s, 1e-9)))
        per_call_s = time_calls(call, count)
    return max(1, min(max_inner, math.ceil(min_sample_s / max(per_call_s, 1e-9))))


def interleaved_medians(
    calls: Mapping[str, Call],
    inner: Mapping[str, int],
    rounds: int,
    *,
    seed: int = 0,
    on_round: Callable[[int], None] | None = None,
) -> dict[str, Stats]:
    """Times every call once per round, in a new random order each round; returns per-call stats."""
    rng = random.Random(seed)
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    for round_index in range(rounds):
        order = names.copy()
        rng.shuffle(order)
        for name in order:
            samples[name].append(time_calls(calls[name], inner[name]))
        if on_round is not None:
            on_round(round_index)
    return {name: Stats(tuple(samples[name]), inner[name]) for name in names}


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_metadata() -> dict[str, Any]:
    """Date, machine, accelerator and library versions: what a recorded result must say it ran on."""
    import jax
    import jaxlib

    devices = jax.devices()
    metadata: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(device) for device in devices],
        "device_kind": devices[0].device_kind,
    }
    try:
        import torch
    except ImportError:
        return metadata
    metadata.update(
        torch=torch.__version__,
        torch_num_threads=torch.get_num_threads(),
        torch_cuda=torch.version.cuda,
        torch_cuda_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    )
    return metadata


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def format_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def format_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3g}x"


def format_paired(paired: Mapping[str, Any] | None) -> str:
    """A :class:`PairedRatio` stored as JSON (``as_json``), described; ``-`` when there is none."""
    return "-" if paired is None else PairedRatio(**paired).describe()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table; the first column is left-aligned, the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            str(cell).ljust(width) if i == 0 else str(cell).rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if i else "-" * w for i, w in enumerate(widths)) + " |"
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def plot_ratio_bars(
    path: Path,
    *,
    groups: Sequence[str],
    panels: Mapping[str, Mapping[str, Sequence[float | None]]],
    title: str,
    ylabel: str = "time / fastest PyTorch (log scale)",
    highlight: str | None = None,
) -> None:
    """Grouped bars of time ratios on a log axis, one panel per pass (e.g. fwd, fwd+bwd), a line at 1.

    ``panels[panel][series][i]`` is the ratio of ``series`` on ``groups[i]``; None (skipped, wrong or
    failed) is drawn as an ``x`` at the foot of its slot. ``highlight`` names the series to draw with a
    black edge and value labels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [v for series in panels.values() for row in series.values() for v in row if v is not None]
    low = min([*values, 1.0]) / 1.6
    high = max([*values, 1.0]) * 1.6
    width_in = max(6.0, 0.9 * len(groups) + 2.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(width_in * len(panels), 5.0), sharey=True, squeeze=False)
    x = np.arange(len(groups))
    for ax, (panel, series) in zip(axes[0], panels.items(), strict=True):
        bar_width = 0.8 / max(len(series), 1)
        for i, (label, ratios) in enumerate(series.items()):
            positions = x - 0.4 + bar_width * (i + 0.5)
            heights = [np.nan if r is None else r for r in ratios]
            emphasised = label == highlight
            ax.bar(
                positions,
                heights,
                bar_width,
                label=label,
                edgecolor="black" if emphasised else "none",
                linewidth=1.2 if emphasised else 0,
                zorder=2,
            )
            for position, ratio in zip(positions, ratios, strict=True):
                if ratio is None:
                    ax.text(position, 0.01, "x", transform=ax.get_xaxis_transform(), ha="center", va="bottom")
                elif emphasised:
                    ax.text(position, ratio * 1.05, f"{ratio:.2g}", ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, zorder=3)
        ax.set_yscale("log")
        ax.set_ylim(low, high)
        ax.set_xlim(-0.5, len(groups) - 0.5)  # skipped (NaN) bars do not extend the autoscaled limits
        ax.set_title(panel)
        ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3, zorder=0)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title, fontsize=10)
    fig.text(0.01, 0.01, "x: skipped (too slow) or not timed; below the dashed line is faster than PyTorch", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- JAX program size, compile time and memory ----------------------------------------------------------


def _sub_jaxprs(value: object) -> list[Any]:
    """The jaxprs inside one equation parameter: a ``ClosedJaxpr``/``Jaxpr``, or tuples/lists of them
    (``cond``'s branches). Callables (``custom_jvp_call``'s thunks) are not traced, so not counted."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    if isinstance(value, ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, Jaxpr):
        return [value]
    if isinstance(value, tuple | list):
        return [sub for item in value for sub in _sub_jaxprs(item)]
    return []


def count_jaxpr_equations(jaxpr: Any) -> int:
    """Equations of a (closed) jaxpr, counting every nested jaxpr recursively.

    Sub-jaxprs are found in the equations' parameters wherever they are (``pjit``'s ``jaxpr``,
    ``custom_jvp_call``'s ``call_jaxpr``, ``checkpoint``'s ``jaxpr``, ``scan``/``while``/``cond`` bodies),
    so a Python loop unrolled into the program and a loop hidden inside a call both count.
    """
    inner = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr -> Jaxpr
    return sum(
        1 + sum(count_jaxpr_equations(sub) for param in eqn.params.values() for sub in _sub_jaxprs(param))
        for eqn in inner.eqns
    )


@dataclass(frozen=True)
class CompileStats:
    """What compiling one jitted function cost, and the memory XLA planned for it."""

    lower_s: float  # tracing + lowering to StableHLO
    compile_s: float  # XLA compilation
    temp_bytes: int | None  # scratch memory beyond arguments and outputs (``temp_size_in_bytes``)
    argument_bytes: int | None
    output_bytes: int | None

    @property
    def total_s(self) -> float:
        return self.lower_s + self.compile_s

    def as_json(self) -> dict[str, Any]:
        return {
            "lower_s": self.lower_s,
            "compile_s": self.compile_s,
            "lower_plus_compile_s": self.total_s,
            "temp_bytes": self.temp_bytes,
            "argument_bytes": self.argument_bytes,
            "output_bytes": self.output_bytes,
        }


def compile_stats(jitted: Any, *args: Any, **kwargs: Any) -> CompileStats:
    """Lowers and compiles ``jitted`` (a ``jax.jit`` function) for ``args`` from scratch and times both.

    JAX's in-memory caches are cleared first, so nothing compiled earlier in the process is reused; the
    persistent compilation cache (off unless configured) would defeat this.
    """
    import jax

    jax.clear_caches()
    start = time.perf_counter()
    lowered = jitted.lower(*args, **kwargs)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    memory = compiled.memory_analysis()

    def field(name: str) -> int | None:
        value = getattr(memory, name, None)
        return None if value is None else int(value)

    return CompileStats(
        lower_s=lowered_at - start,
        compile_s=compiled_at - lowered_at,
        temp_bytes=field("temp_size_in_bytes"),
        argument_bytes=field("argument_size_in_bytes"),
        output_bytes=field("output_size_in_bytes"),
    )
