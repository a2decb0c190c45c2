"""Data-parallel scaling: weak scaling over processes, and what each device's compiled program moves and holds.

**Weak scaling.** One process pinned to one core, with one CPU device and a batch of B samples, against two
processes pinned to a core each (``jax.distributed`` over localhost, gloo collectives), one device each and
2B samples split between them: with perfect data parallelism a step takes as long in both, so efficiency =
t(1 process) / t(2 processes) is 1. XLA:CPU runs single-threaded
(``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``) so each process uses only its core.
Workloads (B = 16 of 32x32x32 per process, 3x3): ``per_sample_conv`` value and gradients, a dense
shared-kernel ``lax.conv_general_dilated`` (the control: it shows what the set-up allows), and SGD training
steps of CondConv and BranchMixConv (4 experts / branches). The processes start once; in every round
each workload runs on one side then the other, in a shuffled order; medians over rounds. A third side, one
process with two devices on the same two cores, has the same per-device programs with the collectives
inside the process: the difference from the two-process time is what gloo's collectives cost.

**Compiled programs.** For 1, 2, 4 and 8 (forced host) devices in one process, a global batch of 32: the bytes
each device's program produces by all-gather / all-to-all / collective-permute, and its scratch memory.

Writes ``results/scaling/scaling_cpu.{json,md,png}``.

    python benchmarks/scaling.py            # about 4 minutes on 2 cores
    python benchmarks/scaling.py --quick
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import _harness as harness
import _report as report
import numpy as np
from _report import environment_metadata, markdown_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
WORKLOADS = ("per_sample_conv", "dense_conv", "CondConv", "BranchMixConv")
SIDES = ("1 process", "2 processes", "2 devices in 1 process")
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
DEVICE_COUNTS = (1, 2, 4, 8)

COMPILED_SCRIPT = """
import json, sys
import jax, numpy as np
from jax.sharding import Mesh
from benchmarks._compiled import moved_bytes, temp_bytes
from benchmarks._scaling_worker import programs
report = {}
for n in %s:
    mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",))
    for name, (fn, args) in programs(mesh, 32 // n).items():
        compiled = fn.lower(*args).compile()
        report.setdefault(name, {})[n] = {"moved_bytes": moved_bytes(compiled), "temp_bytes": temp_bytes(compiled)}
print("REPORT", json.dumps(report))
"""


def _env(devices: int, flags: str = "") -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _worker(cores: str, per_device_batch: int, distributed: list[str], devices: int = 1) -> subprocess.Popen:
    pin = ["taskset", "-c", cores] if shutil.which("taskset") else []
    command = [*pin, sys.executable, "-m", "benchmarks._scaling_worker", "--per-device-batch", str(per_device_batch)]
    return subprocess.Popen(
        command + distributed,
        env=_env(devices, ONE_THREAD),
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _read(process: subprocess.Popen, prefix: str) -> str:
    for line in process.stdout:
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    raise RuntimeError(f"a worker ended before printing {prefix!r} (exit code {process.wait()})")


def _time(processes: list[subprocess.Popen], workload: str, calls: int) -> float:
    for process in processes:
        process.stdin.write(f"time {workload} {calls}\n")
        process.stdin.flush()
    return max(json.loads(_read(process, "RESULT "))["seconds"] for process in processes)


def weak_scaling(rounds: int, calls: int, per_device_batch: int, port: int) -> dict[str, Any]:
    single = [_worker("0", per_device_batch, [])]
    # The same two cores as one process with two devices: collectives within the process, not through gloo.
    in_process = [_worker("0,1", per_device_batch, [], devices=2)]
    coordinator = f"localhost:{port}"
    distributed = ["--coordinator-address", coordinator, "--num-processes", "2", "--process-id"]
    pair = [_worker(str(core), per_device_batch, [*distributed, str(core)]) for core in (0, 1)]
    try:
        for process in single + in_process + pair:
            _read(process, "READY")
        times: dict[str, dict[str, list[float]]] = {w: {side: [] for side in SIDES} for w in WORKLOADS}
        order = random.Random(0)
        for _ in range(rounds):
            for workload in order.sample(WORKLOADS, len(WORKLOADS)):
                sides = list(zip(SIDES, (single, pair, in_process), strict=True))
                order.shuffle(sides)
                for side, processes in sides:
                    times[workload][side].append(_time(processes, workload, calls))
    finally:
        for process in single + in_process + pair:
            if process.poll() is None:
                process.stdin.write("quit\n")
                process.stdin.flush()
        for process in single + in_process + pair:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    result = {}
    for workload, sides in times.items():
        one, two, local = (np.asarray(sides[s]) for s in SIDES)
        per_round = one / two
        result[workload] = {
            "1 process ms": float(np.median(one)) * 1e3,
            "2 processes ms": float(np.median(two)) * 1e3,
            "efficiency": float(np.median(one) / np.median(two)),
            "efficiency per round p25-p75": [float(v) for v in np.percentile(per_round, [25, 75])],
            "2 devices in 1 process ms": float(np.median(local)) * 1e3,
            "efficiency in 1 process": float(np.median(one) / np.median(local)),
            "samples_ms": {s: [t * 1e3 for t in sides[s]] for s in sides},
        }
    return result


def compiled_programs() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", COMPILED_SCRIPT % (DEVICE_COUNTS,)],
        env=_env(max(DEVICE_COUNTS)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(line for line in done.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


def write_report(payload: dict[str, Any], stem: Path) -> None:
    weak, compiled = payload["weak_scaling"], payload["compiled"]
    rows = [
        [
            w,
            f"{weak[w]['1 process ms']:.1f} ms",
            f"{weak[w]['2 processes ms']:.1f} ms",
            f"**{weak[w]['efficiency']:.2f}**",
            "-".join(f"{v:.2f}" for v in weak[w]["efficiency per round p25-p75"]),
            f"{weak[w]['2 devices in 1 process ms']:.1f} ms",
            f"{weak[w]['efficiency in 1 process']:.2f}",
        ]
        for w in WORKLOADS
    ]
    lines = [
        "# Data-parallel scaling (CPU)",
        "",
        f"Machine: {payload['environment'].get('cpu', '?')}; jax {payload['environment'].get('jax', '?')}; "
        f"{payload['environment'].get('date', '?')}. Made by `python benchmarks/scaling.py`.",
        "",
        f"Weak scaling: 1 process on 1 core with {payload['per_device_batch']} samples against 2 processes on a core "
        f"each with {2 * payload['per_device_batch']} (gloo), and against one process with 2 devices on both cores "
        f"(collectives within the process); {payload['rounds']} interleaved rounds, medians.",
        "",
        markdown_table(
            [
                "workload",
                "1 process",
                "2 processes",
                "efficiency",
                "per-round p25-p75",
                "2 devices, 1 process",
                "efficiency",
            ],
            rows,
        ),
        "",
        "Compiled per-device programs, global batch 32: bytes all-gathered / all-to-all'd / permuted, scratch MB.",
        "",
        markdown_table(
            ["workload", *(f"{n} device(s)" for n in DEVICE_COUNTS)],
            [
                [
                    w,
                    *(
                        f"{compiled[w][str(n)]['moved_bytes']} B, {compiled[w][str(n)]['temp_bytes'] / 2**20:.2f} MB"
                        for n in DEVICE_COUNTS
                    ),
                ]
                for w in WORKLOADS
            ],
        ),
        "",
    ]
    report.write_reports(stem, payload, "\n".join(lines), lambda png: _plot(payload, png))


def _plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weak, compiled = payload["weak_scaling"], payload["compiled"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    positions = np.arange(len(WORKLOADS))
    left.bar(positions - 0.2, [weak[w]["efficiency"] for w in WORKLOADS], 0.4, label="2 processes (gloo)")
    in_process = [weak[w]["efficiency in 1 process"] for w in WORKLOADS]
    left.bar(positions + 0.2, in_process, 0.4, label="2 devices, 1 process")
    left.set_xticks(positions, WORKLOADS)
    left.axhline(1.0, color="grey", linestyle=":")
    left.axhline(0.85, color="tab:red", linestyle="--", label="target 0.85")
    left.set_ylabel("weak-scaling efficiency, 2 cores")
    left.set_ylim(0, 1.15)
    left.legend()
    left.tick_params(axis="x", labelrotation=15)
    for w in WORKLOADS:
        right.plot(DEVICE_COUNTS, [compiled[w][str(n)]["temp_bytes"] / 2**20 for n in DEVICE_COUNTS], "o-", label=w)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xticks(DEVICE_COUNTS, [str(n) for n in DEVICE_COUNTS])
    right.set_xlabel("devices (global batch 32)")
    right.set_ylabel("scratch memory per device, MB")
    right.legend()
    figure.suptitle(f"jdynconv data parallelism, {payload['environment'].get('cpu', '')}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(
        __doc__.split("\n\n")[0],
        harness.Defaults(rounds=15),
        RESULTS / "scaling" / "scaling_cpu",
        quick_help="3 rounds of 3 calls",
        # Not among the *.json that summary.py tabulates: the Performance page shows its own table.
        out_help="path of the reports, without their .json/.md/.png suffix",
    )
    parser.add_argument("--calls", type=int, default=10, help="steps timed together in a round")
    parser.add_argument("--per-device-batch", type=int, default=16)
    parser.add_argument("--port", type=int, default=12377, help="coordinator port on localhost")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 15)
    calls = 3 if args.quick else args.calls
    payload = {
        "environment": environment_metadata(),
        "per_device_batch": args.per_device_batch,
        "rounds": rounds,
        "calls_per_round": calls,
        "weak_scaling": weak_scaling(rounds, calls, args.per_device_batch, args.port),
        "compiled": compiled_programs(),
    }
    write_report(payload, args.out)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
