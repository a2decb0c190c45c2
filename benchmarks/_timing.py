"""Timing helpers shared by the benchmarks in this folder (reports: ``_report.py``).

Methodology (DESIGN.md, "Speed work"): every competitor is warmed up first (so JAX compilation is never
timed), then timed in R rounds; each round runs every competitor once in a freshly shuffled order, so
slow drifts of a noisy machine hit all of them alike, and the report uses per-competitor medians. A
"call" is a zero-argument function that runs the computation once and waits for its result
(``jax.block_until_ready``, ``torch.cuda.synchronize``); tiny calls are repeated ``inner`` times per
timed sample so each sample is long enough for the clock.
"""

from __future__ import annotations

import gc
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
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


def warmed_medians(
    calls: Mapping[str, Call], rounds: int, min_sample_s: float, *, max_inner: int = 10_000, seed: int = 0
) -> dict[str, Stats]:
    """Warms every call up (one call: compilation), sizes its samples, then times them all interleaved: for
    competitors that need no validation between warm-up and timing."""
    inner = {}
    for name, call in calls.items():
        call()
        inner[name] = inner_calls(call, time_calls(call, 1), min_sample_s, max_inner)
    return interleaved_medians(calls, inner, rounds, seed=seed)


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
