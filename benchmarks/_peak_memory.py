"""Peak memory of a call: PyTorch's CPU allocator (``torch.profiler``) and XLA's plan of a compiled program.

Used by the benchmarks that report memory beside time (``deform_conv.py``, ``dcnv3.py``): PyTorch's figure is
the peak of the bytes its allocator holds during one call over what it held when the call began; XLA's is the
compiled program's scratch plus outputs (``memory_analysis()``), beyond its arguments.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _timing import compile_stats


def profiled(call: Callable[[], Any]) -> tuple[int, Any]:
    """``call()``'s result and the peak of the bytes PyTorch's CPU allocator held during it over what it held
    when it began (its result included): ``torch.profiler``'s memory events, every thread's."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = call()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    # Each event's "Bytes" (negative when freed), in time order; the trace's "Total Allocated" runs on across
    # profiler sessions, so it is not the call's own.
    changes = sorted((event["ts"], event["args"]["Bytes"]) for event in events if event.get("name") == "[memory]")
    running = np.cumsum([change for _, change in changes], dtype=np.int64)
    return int(max(0, running.max(initial=0))), result


def torch_peak_bytes(call: Callable[[], Any], warm: bool = True) -> int:
    """The peak bytes of one ``call()`` (:func:`profiled`). ``warm``: run it once before, so one-off allocations
    (oneDNN primitives) are not counted; not needed once the same kernels ran."""
    if warm:
        call()
    return profiled(call)[0]


def xla_bytes(jitted: Any, *args: Any) -> dict[str, Any]:
    """XLA's memory plan (and compile time) of ``jitted`` at ``args``: temp + output bytes is its peak beyond
    the arguments."""
    stats = compile_stats(jitted, *args).as_json()
    stats["peak_bytes"] = (stats["temp_bytes"] or 0) + (stats["output_bytes"] or 0)
    return stats


def mib(num_bytes: float | None) -> str:
    if num_bytes is None:
        return "-"
    value = num_bytes / 2**20
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"
