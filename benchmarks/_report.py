"""What a benchmark run records and shows: its environment, markdown tables, ratio plots, and the report files.

Every benchmark here writes ``<stem>.json`` (the numbers; ``benchmarks/summary.py`` renders them), ``<stem>.md``
(the tables) and ``<stem>.png`` (a plot). The formatting shared by their reports lives here, so their
reports read alike; what each report's tables hold stays with its benchmark.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from _timing import PairedRatio

Record = Mapping[str, Any]


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


def ratio_limits(panels: Mapping[str, Mapping[str, Sequence[float | None]]]) -> tuple[float, float]:
    """Log-axis limits with room around every ratio and 1."""
    values = [v for series in panels.values() for row in series.values() for v in row if v is not None]
    return min([*values, 1.0]) / 1.6, max([*values, 1.0]) * 1.6


def draw_ratio_bars(
    ax: Any,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    limits: tuple[float, float],
    highlight: str | None = None,
    label_all: bool = False,
) -> None:
    """Grouped bars of time ratios on ``ax``, log axis, a dashed line at 1: ``series[label][i]`` is the ratio
    of ``label`` on ``groups[i]``; None (skipped, wrong or failed) is an ``x`` at the foot of its slot. The
    ``highlight`` series gets a black edge; its bars (every bar with ``label_all``) get value labels."""
    x = np.arange(len(groups))
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
            elif emphasised or label_all:
                ax.text(position, ratio * 1.05, f"{ratio:.2g}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, zorder=3)
    ax.set_yscale("log")
    ax.set_ylim(*limits)
    ax.set_xlim(-0.5, len(groups) - 0.5)  # skipped (NaN) bars do not extend the autoscaled limits
    ax.grid(axis="y", which="both", alpha=0.3, zorder=0)


def plot_ratio_bars(
    path: Path,
    *,
    groups: Sequence[str],
    panels: Mapping[str, Mapping[str, Sequence[float | None]]],
    title: str,
    ylabel: str = "time / fastest PyTorch (log scale)",
    highlight: str | None = None,
) -> None:
    """:func:`draw_ratio_bars` in one panel per pass (e.g. fwd, fwd+bwd), saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limits = ratio_limits(panels)
    width_in = max(6.0, 0.9 * len(groups) + 2.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(width_in * len(panels), 5.0), sharey=True, squeeze=False)
    for ax, (panel, series) in zip(axes[0], panels.items(), strict=True):
        draw_ratio_bars(ax, groups, series, limits, highlight)
        ax.set_title(panel)
        ax.set_xticks(np.arange(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title, fontsize=10)
    fig.text(0.01, 0.01, "x: skipped (too slow) or not timed; below the dashed line is faster than PyTorch", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- Pieces of the reports ------------------------------------------------------------------------------


def header_lines(title: str, metadata: Mapping[str, Any], *details: str) -> list[str]:
    """A report's title, the machine and library versions it ran on, then ``details`` (one line each)."""
    torch_where = metadata.get("torch_device", "cpu")
    if metadata.get("torch_cuda_device") and torch_where == "cuda":
        torch_where += f" ({metadata['torch_cuda_device']})"
    return [
        f"# {title}",
        "",
        f"- date: {metadata['date']}; platform: {metadata['platform']}; CPU: {metadata['cpu']} "
        f"({metadata['cpu_count']} logical cores)",
        f"- jax {metadata['jax']} / jaxlib {metadata['jaxlib']}, backend {metadata['jax_backend']}, "
        f"devices {metadata['jax_devices']} (kind {metadata['device_kind']})",
        f"- torch {metadata.get('torch')} on {torch_where}, torch threads {metadata.get('torch_num_threads')}",
        *details,
    ]


def timing_line(metadata: Mapping[str, Any], *more: str) -> str:
    """How the run timed: float32, highest precision, the rounds and the shortest sample (from the metadata)."""
    parts = [
        "float32, precision pinned to highest (no TF32)",
        f"{metadata['rounds']} interleaved rounds, medians",
        f"samples >= {metadata['min_sample_ms']:g} ms",
        *more,
    ]
    return "- " + "; ".join(parts)


def time_cell(record: Record | None) -> str:
    """A competitor's median in ms when it was timed, else why not (its note)."""
    if record is None:
        return "-"
    return format_ms(record["median_ms"] / 1e3) if record["status"] == "ok" else record["note"]


def mode_table(
    headers: Sequence[str],
    cases: Sequence[Record],
    modes: Sequence[str],
    cells: Callable[[Record, str], Sequence[str]],
    label: Callable[[Record], str] = lambda case: case["name"],
) -> str:
    """One row per case and pass: the case's label (on its first pass only), the pass, then ``cells``."""
    rows = [[label(case) if mode == modes[0] else "", mode, *cells(case, mode)] for case in cases for mode in modes]
    return markdown_table(headers, rows)


def time_table(
    cases: Sequence[Record],
    modes: Sequence[str],
    names: Sequence[str],
    label: Callable[[Record], str] = lambda case: case["name"],
    first: str = "case",
) -> str:
    """Median times (ms) of ``names`` per case and pass, read from each case's ``results``."""
    headers = [first, "pass", *(f"{name} (ms)" for name in names)]
    return mode_table(
        headers, cases, modes, lambda case, mode: [time_cell(case["results"][mode].get(name)) for name in names], label
    )


def plot_title(prefix: str, metadata: Mapping[str, Any]) -> str:
    """``prefix (device kind, jax version, torch version, date)``: what a plot needs to stand alone."""
    return (
        f"{prefix} ({metadata['device_kind']}, jax {metadata['jax']}, torch {metadata.get('torch')}, "
        f"{metadata['date'][:10]})"
    )


def write_reports(
    stem: Path, payload: Mapping[str, Any], markdown: str, plot: Callable[[Path], None] | None = None
) -> tuple[Path, ...]:
    """Writes ``stem.json`` (``payload``), ``stem.md`` and, with ``plot``, ``stem.png``; returns their paths."""
    json_path, md_path, png_path = (stem.with_name(f"{stem.name}.{ext}") for ext in ("json", "md", "png"))
    write_json(json_path, payload)
    md_path.write_text(markdown)
    if plot is None:
        return json_path, md_path
    plot(png_path)
    return json_path, md_path, png_path


def verdict(ratio: float | None, target: float | None) -> str:
    """``0.21x ok`` / ``0.62x MISS`` against a target, the ratio alone without one."""
    if ratio is None or target is None:
        return format_ratio(ratio)
    return f"{format_ratio(ratio)} {'ok' if ratio <= target else 'MISS'}"


def jdynconv_source() -> dict[str, Any]:
    """The commit of the jdynconv source this run imports, and the files under it that differ from that commit
    (the benchmark's environment installs jdynconv editable, from this checkout)."""
    import subprocess

    import jdynconv

    source = Path(jdynconv.__file__).resolve().parent

    def git(*command: str) -> str | None:
        try:
            done = subprocess.run(["git", *command], cwd=source, capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        return done.stdout

    changed = git("status", "--porcelain", "--", ".")  # "XY path" lines
    commit = git("rev-parse", "HEAD")
    return {
        "jdynconv_source": str(source),
        "jdynconv_commit": None if commit is None else commit.strip(),
        "jdynconv_uncommitted": None if changed is None else [line[3:] for line in changed.splitlines()],
    }
