"""Runs a ``tests/spmd`` program in a subprocess with forced CPU devices and returns its report.

XLA fixes the CPU device count at start-up, so each multi-device program runs in a fresh interpreter with
``--xla_force_host_platform_device_count``. The persistent compilation cache is off there: the tests read the
compiled programs' text and memory analysis, which they take from a fresh compile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def device_env(num_devices: int) -> dict[str, str]:
    """The environment of a subprocess with ``num_devices`` CPU devices, jdynconv's checkout importable."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={num_devices}".strip()
    env = {key: value for key, value in os.environ.items() if not key.startswith("JAX_COMPILATION_CACHE")}
    env.update({"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "JAX_ENABLE_COMPILATION_CACHE": "false"})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "examples"), env.get("PYTHONPATH", "")])
    return env


def report(module: str, num_devices: int = 8, timeout: float = 600) -> dict:
    """``python -m module`` with ``num_devices`` devices; the JSON after its ``REPORT`` line."""
    done = subprocess.run(
        [sys.executable, "-m", module],
        env=device_env(num_devices),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, done.stdout[-2000:]
    return json.loads(lines[-1].removeprefix("REPORT "))
