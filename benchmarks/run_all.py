"""Runs every benchmark in this folder in turn, then regenerates SUMMARY.md and the README's summary block.

    PYTHONPATH=. python benchmarks/run_all.py                    # full runs (about an hour on 2 cores)
    PYTHONPATH=. python benchmarks/run_all.py --quick --only kernel_mixing --out-dir /tmp/bench --no-readme

The reports go to ``docs/results/`` (the documentation's Performance page shows them): the benchmarks that
``summary.py`` tabulates at its top, the others in the subfolders their links expect (``families/``,
``odconv/``, ``deform/``, ``per_position/``, ``scaling/``). ``deform_conv.py`` needs torchvision's ops, which
load only in a venv of their own (``benchmarks/deform_conv.py`` says how); run it there.

Each benchmark runs as its own subprocess (``python benchmarks/<name>.py --out DIR [--quick]``), not as
an imported ``main``: each one sets process-wide state (JAX's default matmul precision, PyTorch's cuDNN
flags, XLA's preallocation variable, compilation caches and allocator growth) that would leak into the
next and skew its timings and its compile-time study; a fresh process per benchmark also matches how the
committed results were made, and a benchmark that crashes the interpreter (an XLA abort) does not take
the others down. Results are summarised even when a benchmark fails, from whatever JSON is there; a run of
only the benchmarks the summary does not read (``--only odconv``) leaves SUMMARY.md and the README as they
were, and a summary that lacks a result it needs (the README's ``per_sample_conv``) is an error, not a
summary without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from summary import END_MARKER, REPO_ROOT, SECTIONS, START_MARKER, SUMMARY_NAME, update_block, write_summary


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of ``benchmarks/<name>.py`` with ``extra`` arguments; its ``--out`` is ``out`` under the
    output folder (a folder, or for scaling.py the reports' path without suffix)."""

    name: str
    extra: tuple[str, ...] = ()
    out: str = ""


# Every benchmark the summary knows, in the summary's order, then the families' and scaling's reports, which
# the Performance page links. per_sample_conv's depthwise grid is a report of its own that the summary does
# not read (the Performance page's rule for the depthwise method cites it).
RUNS = (
    *(Run(name) for name in SECTIONS),
    Run("per_sample_conv", ("--grid", "depthwise")),
    Run("modulated_conv", out="families"),
    Run("per_sample_conv_transpose", out="families"),
    Run("odconv", out="odconv"),
    Run("dcnv3", out="deform"),
    Run("per_position", out="per_position"),
    Run("scaling", out="scaling/scaling_cpu"),
)
BENCHMARKS = tuple(dict.fromkeys(run.name for run in RUNS))
BENCHMARK_DIR = Path(__file__).resolve().parent
# benchmarks/results is a link to this folder.
DEFAULT_OUT_DIR = REPO_ROOT / "docs" / "results"
DEFAULT_README = REPO_ROOT / "README.md"


def shown(path: Path) -> str:
    """``path`` relative to the repository root when inside it: the command recorded in the JSON metadata
    then reads like a hand-typed one (``benchmarks/branch_mix.py --out benchmarks/results``)."""
    return path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else os.fspath(path)


def benchmark_command(run: Run, out_dir: Path, quick: bool) -> list[str]:
    out = out_dir / run.out if run.out else out_dir
    command = [sys.executable, shown(BENCHMARK_DIR / f"{run.name}.py"), *run.extra, "--out", shown(out)]
    return [*command, "--quick"] if quick else command


def benchmark_env() -> dict[str, str]:
    """This environment with the repository root on PYTHONPATH: the PyTorch references the benchmarks compare
    with are imported from ``parity/`` (jdynconv itself is the installed package)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.fspath(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def run_benchmark(run: Run, out_dir: Path, quick: bool) -> tuple[int, float]:
    """Runs one benchmark (its output streams through); returns its exit status and wall time."""
    start = time.perf_counter()
    # cwd = the repository root: the scripts' relative defaults and the recorded commands assume it.
    command = benchmark_command(run, out_dir, quick)
    completed = subprocess.run(command, cwd=REPO_ROOT, env=benchmark_env(), check=False)
    return completed.returncode, time.perf_counter() - start


def check_readme(readme: Path) -> None:
    """Fails before any benchmark runs if the README cannot take the summary, not after an hour of runs."""
    if not readme.is_file():
        raise ValueError(f"{readme} does not exist")
    try:
        update_block(readme.read_text(), "")
    except ValueError as error:
        raise ValueError(f"{readme}: {error}") from error


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="forwarded: each benchmark's smoke-test mode")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME", help=f"among {', '.join(BENCHMARKS)}")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="folder for JSON, MD, PNG and SUMMARY.md")
    readme = parser.add_mutually_exclusive_group()
    readme.add_argument(
        "--readme",
        type=Path,
        default=DEFAULT_README,
        help=f"file whose {START_MARKER} ... {END_MARKER} block gets the summary (default: the repo's README.md)",
    )
    readme.add_argument("--no-readme", action="store_true", help="leave the README alone")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = args.out_dir.resolve()
    readme = None if args.no_readme else args.readme.resolve()
    if readme is not None:
        try:
            check_readme(readme)
        except ValueError as error:
            print(f"run_all: {error}; add the marker lines or pass --no-readme", file=sys.stderr)
            return 2
    runs = [run for run in RUNS if args.only is None or run.name in args.only]
    names = list(dict.fromkeys(run.name for run in runs))

    start = time.perf_counter()
    failed = []
    for i, run in enumerate(runs, 1):
        label = " ".join([run.name, *run.extra])
        command = " ".join(benchmark_command(run, out_dir, args.quick))
        print(f"\n=== [{i}/{len(runs)}] {label}: {command}", flush=True)
        status, seconds = run_benchmark(run, out_dir, args.quick)
        print(f"=== [{i}/{len(runs)}] {label}: exit {status} after {seconds:.0f} s", flush=True)
        if status != 0:
            failed.append(label)

    summarised = [name for name in names if name in SECTIONS]
    if summarised:
        try:
            written = write_summary(out_dir, readme)
        except (ValueError, FileNotFoundError) as error:
            print(f"run_all: summary not written: {error}", file=sys.stderr)
            return 1
        print(f"\nWrote {', '.join(map(shown, written))}")
    else:
        print(
            f"\nrun_all: no summary: {', '.join(names)} not among the summarised benchmarks "
            f"({', '.join(SECTIONS)}); {SUMMARY_NAME} and the README left as they were"
        )
    print(f"Total: {time.perf_counter() - start:.0f} s for {', '.join(names)}")
    if failed:
        # A non-zero exit mostly means a competitor gave a wrong result or raised; its JSON says which.
        print(f"Failed (non-zero exit): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
