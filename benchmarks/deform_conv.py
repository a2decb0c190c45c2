"""Deformable convolution: jdynconv.deform_conv against torchvision's CPU kernel, time and peak memory.

Forward and backward, and peak memory against a dense convolution of the same shape.

Shapes: detection heads (the issue's targets): B 2-8, C_in = C_out = 64-256, 3x3 kernels, stride 1, padding 1,
maps 32x32 to 100x100, offset groups 1 and 4, with and without DCNv2's mask. Inputs, offsets (normal, scale 2
pixels, so some taps leave the map), masks (a sigmoid) and weights are the same arrays on both sides.
Competitors, all on the same arrays:

- ``torchvision``: ``torchvision.ops.deform_conv2d(input, offset, weight, bias, padding=1, mask=mask)``, its
  compiled CPU kernel (im2col of bilinear samples, then a matmul), on PyTorch's default threads (the cores);
  the reference every result is checked against;
- ``jdynconv NCHW``: ``jax.jit`` of ``jdynconv.deform_conv(..., padding=1, data_format="channels_first")``,
  torchvision's layout and the same arrays: the headline competitor;
- ``jdynconv NHWC``: the same with ``data_format="channels_last"`` (Flax's layout; the arrays transposed once,
  before timing).

Passes: ``fwd`` (PyTorch under ``inference_mode``); ``fwd+bwd``: the output and its VJP with a fixed random
cotangent ``g`` (the gradient of ``sum(y * g)``) w.r.t. the input, offsets, mask, weight and bias (JAX: one
jitted ``jax.vjp``; PyTorch: the forward, then ``torch.autograd.grad``); with ``--breakdown``, ``bwd``: jdynconv's
VJP alone, from a saved forward (the jitted ``vjp`` function of a jitted ``jax.vjp``, its residuals computed
once), which says how jdynconv's ``fwd+bwd`` time splits (NCHW only: NHWC runs the same sampling and backward).
torchvision is not timed on ``bwd``: its backward samples the input again (its forward's columns are not saved),
so it costs what its ``fwd+bwd`` costs, the longest calls here.
Before anything is timed, every output and every gradient is checked against torchvision's within 1e-4
relative (``max|a - b| / max|b|``). Timing as the other benchmarks (``_harness``): warm-up and compilation
excluded, interleaved shuffled rounds, medians, ratios jdynconv / torchvision (< 1: jdynconv faster) and
per-round paired ratios. The issue's targets: ``fwd`` <= 0.3x and ``fwd+bwd`` <= 0.5x at every shape.

Peak memory, never while timing (after it; torchvision's fwd+bwd during the checks before it):

- JAX: XLA's plan of the compiled program (``memory_analysis()``, via ``_timing.compile_stats``): scratch
  (``temp``) plus outputs, beyond the arguments;
- PyTorch: the peak of the bytes its CPU allocator holds during one call, over what was allocated when the call
  began (``torch.profiler`` with ``profile_memory=True``: every allocation and free on every thread, summed in
  time order): the outputs, the gradients and every intermediate, beyond the inputs;
- the yardstick: a dense convolution of the same shape (same input, weight and bias, no offsets), XLA's
  ``lax.conv_general_dilated`` (NCHW) and PyTorch's ``F.conv2d``, measured the same two ways.

torchvision's compiled ops must match the torch they load with; the repository's ``.venv`` has a CPU torch they
do not load with, so this benchmark runs in an environment with torchvision (the one below: torch 2.13.0's CUDA
build, run on the CPU, torchvision 0.28.0, jdynconv installed editable) and is not in ``run_all.py``:

    ~/.cache/jdynconv-torchvision-venv/bin/python benchmarks/deform_conv.py   # full grid -> docs/results/deform/
    ~/.cache/jdynconv-torchvision-venv/bin/python benchmarks/deform_conv.py --quick --out /tmp/bench_deform
    ~/.cache/jdynconv-torchvision-venv/bin/python benchmarks/deform_conv.py --cases b2-c256-100-og4-m --breakdown

``--breakdown`` adds the ``bwd`` pass and, per case, jdynconv's fwd and fwd+bwd taken apart (the multilinear
sampling alone, the contraction with the kernel alone, the same contraction as a 1x1 conv, and a dense conv of the
same shape), timed together in interleaved rounds (NHWC: the sampling's layout). The full grid without it took
10 minutes on 2 cores shared with other work (load average 4-5; 470 s of CPU time), about half of it in
torchvision's fwd+bwd, whose backward is single-threaded.
Results go to ``docs/results/deform/deform_conv_cpu.{json,md,png}`` (``benchmarks/results`` links there): a
folder of their own, since ``benchmarks/summary.py`` renders every top-level results JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

# Kineto (torch.profiler) logs every start and stop (level 5) and, with a CUDA build on a machine without a GPU, an
# error per start (level 4) to stderr; 6 silences both. Read when torch is imported.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import _harness as harness
import _report as report
import jax
import jax.numpy as jnp
import numpy as np
from _harness import Built, Check, Competitor, Settings, case_fields, log, run_case
from _peak_memory import mib, profiled, torch_peak_bytes, xla_bytes
from _report import format_paired, format_ratio, jdynconv_source, markdown_table, verdict
from _timing import warmed_medians

import jdynconv
from jdynconv import _sampling

MODES = ("fwd", "fwd+bwd", "bwd")  # bwd only with --breakdown
REFERENCE = "torchvision"
SUBJECT = "jdynconv NCHW"
JAX_LAYOUTS = {SUBJECT: "channels_first", "jdynconv NHWC": "channels_last"}
COMPETITORS = (REFERENCE, *JAX_LAYOUTS)
# The targets: jdynconv's time over torchvision's, per pass.
TARGETS = {"fwd": 0.3, "fwd+bwd": 0.5}
GRADIENTS = ("input", "offset", "mask", "weight", "bias")
CHECK = Check(1e-4, 1e-4, {"fwd": "output", "fwd+bwd": "output", "bwd": "input gradient"})
DEFAULTS = harness.Defaults(rounds=5, quick_rounds=3, min_sample_s=0.05, quick_min_sample_s=0.01)
OFFSET_SCALE = 2.0  # pixels: learned offsets of a few pixels; some taps read outside the map
RESULTS = Path(__file__).resolve().parent / "results" / "deform"
STEM = "deform_conv_cpu"
KERNEL = 3
PADDING = 1

Arrays = dict[str, np.ndarray | None]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    channels: int
    size: int
    offset_groups: int
    mask: bool

    @property
    def description(self) -> str:
        return (
            f"B{self.batch} C{self.channels}->{self.channels} {self.size}x{self.size} 3x3 pad 1, "
            f"{self.offset_groups} offset group{'s' if self.offset_groups > 1 else ''}, "
            f"{'mask' if self.mask else 'no mask'}"
        )

    @property
    def label(self) -> str:
        """Short, for tables and plots: ``B2 C64 64² og1 m``."""
        return (
            f"B{self.batch} C{self.channels} {self.size}x{self.size} og{self.offset_groups}{' m' if self.mask else ''}"
        )


def case(batch: int, channels: int, size: int, offset_groups: int, mask: bool) -> Case:
    name = f"b{batch}-c{channels}-{size}-og{offset_groups}{'-m' if mask else ''}"
    return Case(name, batch, channels, size, offset_groups, mask)


# Detection-head shapes: the corners and the middle of the ranges (B 2-8, 64-256 channels, maps 32x32 to
# 100x100), offset groups 1 and 4 and the mask on and off mixed. torchvision's fwd+bwd takes most of a run (its
# backward is single-threaded: about 10 s a call at B8 C64 100x100 and B2 C256 100x100 on 2 cores), so the two
# 100x100 corners appear once each.
CASES = (
    case(2, 64, 64, 1, True),
    case(2, 64, 64, 4, False),
    case(2, 256, 32, 4, True),
    case(8, 128, 32, 4, False),
    case(4, 128, 50, 1, False),
    case(4, 128, 50, 4, True),
    case(8, 64, 100, 1, True),
    case(2, 256, 100, 4, True),
)
QUICK_CASES = (case(2, 16, 16, 1, True), case(2, 32, 20, 4, False))


def arrays(case: Case, seed: int) -> Arrays:
    """The case's arrays, torchvision's layout (NCHW, OIHW), float32; a fixed cotangent for the VJPs."""
    rng = np.random.default_rng(seed)
    b, c, s, taps = case.batch, case.channels, case.size, KERNEL * KERNEL
    fan_in = c * taps
    normal = functools.partial(rng.standard_normal, dtype=np.float32)
    mask = 1 / (1 + np.exp(-normal((b, case.offset_groups * taps, s, s)))) if case.mask else None
    return {
        "input": normal((b, c, s, s)),
        "offset": OFFSET_SCALE * normal((b, 2 * case.offset_groups * taps, s, s)),
        "mask": None if mask is None else mask.astype(np.float32),
        "weight": normal((c, c, KERNEL, KERNEL)) / np.float32(math.sqrt(fan_in)),
        "bias": normal((c,)),
        "cotangent": normal((b, c, s, s)),
    }


def present(names: Sequence[str], data: Arrays) -> tuple[str, ...]:
    """The names among ``names`` whose array the case has (the mask only with a mask)."""
    return tuple(name for name in names if data[name] is not None)


# --- jdynconv ---------------------------------------------------------------------------------------------


def to_layout(name: str, array: np.ndarray, layout: str) -> np.ndarray:
    """One of the arrays in ``layout``: NCHW/OIHW as given, or NHWC/HWIO for ``channels_last``."""
    if layout == "channels_first" or array.ndim != 4:
        return array
    return np.ascontiguousarray(array.transpose(2, 3, 1, 0) if name == "weight" else array.transpose(0, 2, 3, 1))


def from_layout(name: str, array: np.ndarray, layout: str) -> np.ndarray:
    """Back to torchvision's layout: the inverse of :func:`to_layout`."""
    if layout == "channels_first" or array.ndim != 4:
        return array
    return array.transpose(3, 2, 0, 1) if name == "weight" else array.transpose(0, 3, 1, 2)


def jax_problem(data: Arrays, layout: str) -> tuple[Callable[..., jax.Array], tuple[str, ...], tuple[jax.Array, ...]]:
    """``deform_conv`` as a function of the case's arrays (input, offset, [mask], weight, bias), their names
    and the arrays on the device, in ``layout``."""
    names = present(GRADIENTS, data)
    has_mask = "mask" in names

    def forward(*args: jax.Array) -> jax.Array:
        named = dict(zip(names, args, strict=True))
        return jdynconv.deform_conv(
            named["input"],
            named["offset"],
            named["weight"],
            named["bias"],
            mask=named["mask"] if has_mask else None,
            padding=PADDING,
            data_format=layout,
        )

    placed = tuple(jax.device_put(to_layout(name, data[name], layout)) for name in names)
    return forward, names, placed


def jax_vjp(forward: Callable[..., jax.Array]) -> Callable[..., tuple[jax.Array, tuple[jax.Array, ...]]]:
    """The output and every argument's gradient for the cotangent (the last argument)."""

    def output_and_gradients(*args: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        *inputs, cotangent = args
        out, vjp = jax.vjp(forward, *inputs)
        return out, vjp(cotangent)

    return output_and_gradients


def build_jax(data: Arrays, layout: str, mode: str) -> Built:
    forward, names, args = jax_problem(data, layout)
    cotangent = jax.device_put(to_layout("cotangent", data["cotangent"], layout))
    channels_last = layout == "channels_last"
    vjp_jit = jax.jit(jax_vjp(forward))

    def gradients() -> dict[str, np.ndarray]:
        _, grads = vjp_jit(*args, cotangent)
        return {name: from_layout(name, np.asarray(g), layout) for name, g in zip(names, grads, strict=True)}

    if mode == "fwd":
        forward_jit = jax.jit(forward)
        return Built(lambda: jax.block_until_ready(forward_jit(*args)), channels_last=channels_last)
    if mode == "fwd+bwd":

        def run_vjp() -> jax.Array:
            return jax.block_until_ready(vjp_jit(*args, cotangent))[0]

        return Built(run_vjp, gradients, channels_last=channels_last)
    # bwd: the VJP function of a jitted jax.vjp (its residuals computed once), applied by a jitted call.
    _, saved = jax.jit(lambda *a: jax.vjp(forward, *a))(*args)
    apply_jit = jax.jit(lambda vjp, g: vjp(g))

    def run_backward() -> jax.Array:
        return jax.block_until_ready(apply_jit(saved, cotangent))[0]

    return Built(run_backward, channels_last=channels_last)


# --- torchvision ------------------------------------------------------------------------------------------


def torch_tensors(data: Arrays, requires_grad: bool) -> dict[str, Any]:
    import torch

    return {
        name: torch.from_numpy(array.copy()).requires_grad_(requires_grad and name != "cotangent")
        for name, array in data.items()
        if array is not None
    }


def torch_forward(tensors: Mapping[str, Any]) -> Any:
    from torchvision.ops import deform_conv2d

    return deform_conv2d(
        tensors["input"],
        tensors["offset"],
        tensors["weight"],
        tensors["bias"],
        padding=PADDING,
        mask=tensors.get("mask"),
    )


def build_torch(data: Arrays, memory: dict[str, int], mode: str) -> Built:
    """torchvision's call; the gradients for the checks are computed under the profiler, which puts its
    fwd+bwd peak memory in ``memory`` (saving a call of seconds)."""
    import torch

    names = present(GRADIENTS, data)
    if mode == "fwd":
        tensors = torch_tensors(data, requires_grad=False)

        def run_forward() -> Any:
            with torch.inference_mode():
                return torch_forward(tensors)

        return Built(run_forward)
    tensors = torch_tensors(data, requires_grad=True)
    leaves = [tensors[name] for name in names]

    def run_vjp() -> tuple[Any, tuple[Any, ...]]:
        out = torch_forward(tensors)
        return out, torch.autograd.grad(out, leaves, tensors["cotangent"])

    def gradients() -> dict[str, np.ndarray]:
        memory["fwd+bwd"], (_, grads) = profiled(run_vjp)
        return {name: g.numpy().copy() for name, g in zip(names, grads, strict=True)}

    return Built(lambda: run_vjp()[0], gradients)


def competitors(data: Arrays, memory: dict[str, int], mode: str) -> list[Competitor]:
    """torchvision first: the others are checked against it. ``bwd`` splits jdynconv's time only (torchvision's
    backward recomputes its forward's columns, and takes as long as its fwd+bwd): jdynconv NCHW is its
    reference, every gradient of it already checked against torchvision's in ``fwd+bwd`` (NHWC is not split: it
    runs the same sampling and backward)."""
    jax_side = [Competitor(name, functools.partial(build_jax, data, layout)) for name, layout in JAX_LAYOUTS.items()]
    if mode == "bwd":
        return jax_side[:1]
    return [Competitor(REFERENCE, functools.partial(build_torch, data, memory)), *jax_side]


# --- Peak memory ------------------------------------------------------------------------------------------


def dense_conv(x: jax.Array, weight: jax.Array, bias: jax.Array) -> jax.Array:
    out = jax.lax.conv_general_dilated(
        x, weight, (1, 1), [(PADDING, PADDING)] * 2, dimension_numbers=("NCHW", "OIHW", "NCHW")
    )
    return out + bias.reshape(1, -1, 1, 1)


def torch_calls(data: Arrays, dense: bool) -> dict[str, Callable[[], Any]]:
    """PyTorch's fwd and fwd+bwd calls, of torchvision's kernel or (``dense``) of ``F.conv2d``."""
    import torch
    import torch.nn.functional as F

    def forward(tensors: Mapping[str, Any]) -> Any:
        if dense:
            return F.conv2d(tensors["input"], tensors["weight"], tensors["bias"], padding=PADDING)
        return torch_forward(tensors)

    inference = torch_tensors(data, requires_grad=False)
    tensors = torch_tensors(data, requires_grad=True)
    leaves = [tensors[name] for name in (("input", "weight", "bias") if dense else present(GRADIENTS, data))]

    def run_forward() -> Any:
        with torch.inference_mode():
            return forward(inference)

    def run_vjp() -> Any:
        out = forward(tensors)
        return out, torch.autograd.grad(out, leaves, tensors["cotangent"])

    return {"fwd": run_forward, "fwd+bwd": run_vjp}


def memory_record(data: Arrays, torchvision: Mapping[str, int]) -> dict[str, Any]:
    """Peak bytes of every competitor's fwd and fwd+bwd, and of the dense convs; the inputs' bytes.
    ``torchvision``: what was measured while checking (its fwd+bwd)."""
    record: dict[str, Any] = {
        "input_bytes": {name: int(array.nbytes) for name, array in data.items() if array is not None},
    }
    for name, layout in JAX_LAYOUTS.items():
        forward, _, args = jax_problem(data, layout)
        cotangent = jax.device_put(to_layout("cotangent", data["cotangent"], layout))
        record[name] = {
            "fwd": xla_bytes(jax.jit(forward), *args),
            "fwd+bwd": xla_bytes(jax.jit(jax_vjp(forward)), *args, cotangent),
        }
    dense_args = [jax.device_put(data[name]) for name in ("input", "weight", "bias")]
    cotangent = jax.device_put(data["cotangent"])
    record["XLA dense conv"] = {
        "fwd": xla_bytes(jax.jit(dense_conv), *dense_args),
        "fwd+bwd": xla_bytes(jax.jit(jax_vjp(dense_conv)), *dense_args, cotangent),
    }
    # torchvision's kernels ran while timing (its fwd+bwd, which takes seconds, was measured then): no warm-up.
    for name, dense in ((REFERENCE, False), ("torch dense conv", True)):
        record[name] = {
            mode: {
                "peak_bytes": torchvision[mode] if not dense and mode in torchvision else torch_peak_bytes(call, dense)
            }
            for mode, call in torch_calls(data, dense).items()
        }
    return record


MEMORY_COLUMNS = (SUBJECT, "jdynconv NHWC", REFERENCE, "XLA dense conv", "torch dense conv")


# --- Breakdown: where jdynconv's forward goes -------------------------------------------------------------


def breakdown_parts(data: Arrays) -> dict[str, tuple[Callable[..., jax.Array], tuple[jax.Array, ...]]]:
    """jdynconv NHWC's ``deform_conv`` and its parts, each a function and its arguments: the multilinear sampling
    of the columns alone (``_sampling.sample`` at the same positions, as ``deform_conv`` calls it), the
    contraction of ready columns with the kernel (the einsum ``deform_conv`` runs), the same contraction as a 1x1
    conv over ``9 * C`` channels (another way XLA could run it), and a dense conv of the same shape."""
    forward, names, args = jax_problem(data, "channels_last")
    named = dict(zip(names, args, strict=True))
    x, offsets, kernel = named["input"], named["offset"], named["weight"]
    b, h, w, c = x.shape
    taps = KERNEL * KERNEL
    groups = offsets.shape[-1] // (2 * taps)

    def sample(x: jax.Array, offsets: jax.Array, *mask: jax.Array) -> jax.Array:
        rows, cols = jnp.meshgrid(jnp.arange(h) - PADDING, jnp.arange(w) - PADDING, indexing="ij")
        ty, tx = jnp.meshgrid(jnp.arange(KERNEL), jnp.arange(KERNEL), indexing="ij")
        grid = jnp.stack([rows[:, :, None] + ty.reshape(1, 1, -1), cols[:, :, None] + tx.reshape(1, 1, -1)], -1)
        grid = grid.reshape(1, h, w, taps, 1, 2).astype(x.dtype)
        positions = grid + jnp.swapaxes(offsets.reshape(b, h, w, groups, taps, 2), 3, 4)
        m = jnp.swapaxes(mask[0].reshape(b, h, w, groups, taps), 3, 4) if mask else None
        columns = _sampling.sample(x.reshape(b, h, w, groups, c // groups), positions, m)
        return columns.reshape(b, h, w, taps, c)

    def contraction(columns: jax.Array, kernel: jax.Array) -> jax.Array:
        return jnp.einsum("...kc,kcf->...f", columns, kernel.reshape(taps, c, -1))

    def contraction_conv(columns: jax.Array, kernel: jax.Array) -> jax.Array:
        flat = columns.reshape(b, h, w, taps * c)
        return jax.lax.conv_general_dilated(
            flat, kernel.reshape(1, 1, taps * c, -1), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
        pads = [(PADDING, PADDING)] * 2
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    sample_args = (x, offsets, *([named["mask"]] if "mask" in named else []))
    columns = jax.jit(sample)(*sample_args)
    return {
        "deform_conv": (forward, args),
        "sampling": (sample, sample_args),
        "contraction": (contraction, (columns, kernel)),
        "contraction as 1x1 conv": (contraction_conv, (columns, kernel)),
        "dense conv": (dense, (x, kernel)),
    }


def breakdown(data: Arrays, settings: Settings, seed: int) -> dict[str, Any]:
    """:func:`breakdown_parts`' fwd and fwd+bwd (the VJP w.r.t. every argument, for a random cotangent of the
    output's shape), all timed together in interleaved rounds."""
    parts = breakdown_parts(data)
    rng = np.random.default_rng(seed)
    bound = {}
    for part, (function, part_args) in parts.items():
        shape = jax.eval_shape(function, *part_args).shape
        cotangent = jax.device_put(rng.standard_normal(shape, dtype=np.float32))
        forward_jit, vjp_jit = jax.jit(function), jax.jit(jax_vjp(function))
        bound[f"{part} [fwd]"] = functools.partial(lambda f, a: jax.block_until_ready(f(*a)), forward_jit, part_args)
        bound[f"{part} [fwd+bwd]"] = functools.partial(
            lambda f, a: jax.block_until_ready(f(*a)), vjp_jit, (*part_args, cotangent)
        )
    stats = warmed_medians(bound, settings.rounds, settings.min_sample_s, seed=seed)
    return {mode: {part: stats[f"{part} [{mode}]"].as_json() for part in parts} for mode in ("fwd", "fwd+bwd")}


BREAKDOWN_PARTS = ("deform_conv", "sampling", "contraction", "contraction as 1x1 conv", "dense conv")


# --- One case ---------------------------------------------------------------------------------------------


def bench_case(index: int, case: Case, settings: Settings, with_breakdown: bool) -> dict[str, Any]:
    load_before = os.getloadavg()
    data = arrays(case, seed=index)
    torchvision_memory: dict[str, int] = {}
    label = f"{case.name}: {case.description}"
    modes = MODES if with_breakdown else tuple(TARGETS)
    run = run_case(
        index, label, modes, functools.partial(competitors, data, torchvision_memory), settings, CHECK, SUBJECT
    )
    log("  peak memory ...")
    memory = memory_record(data, torchvision_memory)
    ratios = run.ratios(REFERENCE)
    nchw = {mode: run.medians(mode).get(SUBJECT) for mode in MODES if mode in modes}
    record = {
        **case_fields(index, case, case.description),
        "kernel": KERNEL,
        "padding": PADDING,
        "results": run.results,
        "ratios": ratios,
        "paired_ratios": run.paired(REFERENCE),
        # jdynconv NCHW's VJP alone over its fwd+bwd: how its fwd+bwd time splits.
        "bwd_share": nchw["bwd"] / nchw["fwd+bwd"] if nchw.get("bwd") and nchw["fwd+bwd"] else None,
        "targets_met": {
            mode: {name: ratios[mode][name] <= target for name in ratios.get(mode, {})}
            for mode, target in TARGETS.items()
        },
        "memory": memory,
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }
    if with_breakdown:
        log("  breakdown ...")
        record["breakdown"] = breakdown(data, settings, index)
    log(
        "  "
        + "; ".join(f"{mode} {format_ratio(ratios.get(mode, {}).get(SUBJECT))}" for mode in TARGETS)
        + f"; bwd / fwd+bwd {format_share(record['bwd_share'])}"
        + f"; peak MiB fwd+bwd: jdynconv {mib(memory[SUBJECT]['fwd+bwd']['peak_bytes'])}, "
        f"torchvision {mib(memory[REFERENCE]['fwd+bwd']['peak_bytes'])}, "
        f"dense XLA {mib(memory['XLA dense conv']['fwd+bwd']['peak_bytes'])}"
    )
    return record


# --- Reporting --------------------------------------------------------------------------------------------


def format_share(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def ratio_of(case: Mapping[str, Any], mode: str, name: str = SUBJECT) -> float | None:
    return case["ratios"].get(mode, {}).get(name)


def label_of(case: Mapping[str, Any]) -> str:
    return Case(**{f.name: case[f.name] for f in dataclasses.fields(Case)}).label


def ratio_table(cases: Sequence[Mapping[str, Any]]) -> str:
    """Per case: jdynconv NCHW's ratio per pass against its target, NHWC's, the per-round spread, and (with
    ``--breakdown``) the share of NCHW's fwd+bwd its VJP alone takes."""
    split = any(case.get("bwd_share") is not None for case in cases)
    headers = [
        "case",
        *(f"{mode} NCHW (target {target:g}x)" for mode, target in TARGETS.items()),
        *(f"{mode} NHWC" for mode in TARGETS),
        *(f"{mode} NCHW per round" for mode in TARGETS),
        *(["NCHW bwd / fwd+bwd"] if split else []),
    ]
    rows = [
        [
            label_of(case),
            *(verdict(ratio_of(case, mode), target) for mode, target in TARGETS.items()),
            *(format_ratio(ratio_of(case, mode, "jdynconv NHWC")) for mode in TARGETS),
            *(format_paired(case["paired_ratios"].get(mode, {}).get(SUBJECT)) for mode in TARGETS),
            *([format_share(case.get("bwd_share"))] if split else []),
        ]
        for case in cases
    ]
    return markdown_table(headers, rows)


def memory_table(cases: Sequence[Mapping[str, Any]]) -> str:
    headers = [
        "case",
        "pass",
        *(f"{name} (MiB)" for name in MEMORY_COLUMNS),
        "jdynconv / torchvision",
        "jdynconv / XLA dense",
    ]

    def cells(case: Mapping[str, Any], mode: str) -> list[str]:
        memory = case["memory"]
        peak = {name: memory[name][mode]["peak_bytes"] for name in MEMORY_COLUMNS}
        return [
            *(mib(peak[name]) for name in MEMORY_COLUMNS),
            format_ratio(peak[SUBJECT] / peak[REFERENCE] if peak[REFERENCE] else None),
            format_ratio(peak[SUBJECT] / peak["XLA dense conv"] if peak["XLA dense conv"] else None),
        ]

    return report.mode_table(headers, cases, ("fwd", "fwd+bwd"), cells, label_of)


def breakdown_table(cases: Sequence[Mapping[str, Any]]) -> str | None:
    """Per case and pass: the medians of jdynconv NHWC and its parts, and the parts' shares of it."""
    with_parts = [case for case in cases if "breakdown" in case]
    if not with_parts:
        return None

    def cells(case: Mapping[str, Any], mode: str) -> list[str]:
        medians = {part: case["breakdown"][mode][part]["median_ms"] for part in BREAKDOWN_PARTS}
        total = medians["deform_conv"]
        shares = (f"{medians[part] / total:.0%}" for part in ("sampling", "contraction"))
        return [*(f"{medians[part]:.3g}" for part in BREAKDOWN_PARTS), *shares]

    headers = ["case", "pass", *(f"{part} (ms)" for part in BREAKDOWN_PARTS), "sampling share", "contraction share"]
    return report.mode_table(headers, with_parts, ("fwd", "fwd+bwd"), cells, label_of)


def misses(cases: Sequence[Mapping[str, Any]]) -> list[str]:
    """``label mode ratio`` of every case and pass where jdynconv NCHW misses its target (or was not timed)."""
    found = []
    for case in cases:
        for mode, target in TARGETS.items():
            ratio = ratio_of(case, mode)
            if ratio is None or ratio > target:
                found.append(f"{label_of(case)} {mode} {format_ratio(ratio)}")
    return found


def header_lines(metadata: Mapping[str, Any]) -> list[str]:
    load = metadata.get("load_average", {})
    load_text = ", ".join(f"{when} {tuple(round(v, 2) for v in values)}" for when, values in load.items() if values)
    return report.header_lines(
        "Deformable convolution: jdynconv.deform_conv vs torchvision.ops.deform_conv2d (CPU)",
        metadata,
        f"- torchvision {metadata.get('torchvision')}; {metadata.get('xla_flags') or 'no XLA_FLAGS'}; jdynconv at "
        f"{(metadata.get('jdynconv_commit') or '?')[:12]}"
        + (
            f" with {', '.join(metadata['jdynconv_uncommitted'])} uncommitted"
            if metadata.get("jdynconv_uncommitted")
            else ""
        ),
        report.timing_line(metadata),
        f"- load average (1, 5, 15 min) {load_text}" if load_text else "- load average not recorded",
        "- fwd: forward (PyTorch under inference_mode); fwd+bwd: output and VJP w.r.t. input, offset, mask, weight, "
        "bias for a fixed random cotangent; bwd (with --breakdown): jdynconv's VJP alone from a saved forward "
        "(torchvision's backward samples again, costing its fwd+bwd: not timed)",
        "- checked before timing: outputs and every gradient within 1e-4 relative of torchvision's; ratios: "
        "jdynconv time / torchvision time (< 1: jdynconv faster); the issue's targets: fwd <= 0.3x, fwd+bwd <= 0.5x",
        "- peak memory beyond the inputs: XLA's plan (temp + outputs) for JAX, the allocator's peak over one call for "
        "PyTorch (torch.profiler); dense conv: lax.conv_general_dilated / F.conv2d of the same shape",
    )


def modes_of(cases: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """The passes the cases were timed on (``bwd`` with ``--breakdown``)."""
    return tuple(mode for mode in MODES if any(mode in case["results"] for case in cases))


def summary(cases: Sequence[Mapping[str, Any]]) -> str:
    parts = [
        "## Median times",
        "",
        report.time_table(cases, modes_of(cases), COMPETITORS, label_of),
        "",
        f"## Ratios (/ {REFERENCE})",
        "",
        ratio_table(cases),
        "",
    ]
    missed = misses(cases)
    parts += [f"Targets missed: {'; '.join(missed)}." if missed else "Every target met.", ""]
    parts += ["## Peak memory beyond the inputs", "", memory_table(cases), ""]
    table = breakdown_table(cases)
    if table:
        parts += ["## jdynconv NHWC taken apart", "", table, ""]
    return "\n".join(parts)


def plot(path: Path, cases: Sequence[Mapping[str, Any]], metadata: Mapping[str, Any]) -> None:
    """Top: jdynconv / torchvision per pass (log scale, the targets dashed in red). Bottom: fwd+bwd peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [label_of(case) for case in cases]
    panels = {
        mode: {name.removeprefix("jdynconv "): [ratio_of(case, mode, name) for case in cases] for name in JAX_LAYOUTS}
        for mode in TARGETS
    }
    limits = report.ratio_limits(panels)
    limits = (min(limits[0], min(TARGETS.values()) / 1.6), limits[1])
    width = max(6.0, 0.9 * len(groups) + 2.0)
    fig = plt.figure(figsize=(width * len(panels), 10.0))
    grid = fig.add_gridspec(2, len(panels))
    for i, (mode, series) in enumerate(panels.items()):
        ax = fig.add_subplot(grid[0, i])
        report.draw_ratio_bars(ax, groups, series, limits, highlight="NCHW")
        ax.axhline(TARGETS[mode], color="red", linestyle="--", linewidth=1, zorder=3, label="target")
        ax.set_title(mode)
        ax.set_xticks(np.arange(len(groups)), groups, rotation=30, ha="right", fontsize=8)
        if i == 0:
            ax.set_ylabel("time / torchvision (log scale)")
        ax.legend(fontsize=8, loc="upper left")
    ax = fig.add_subplot(grid[1, :])
    x = np.arange(len(groups))
    bar = 0.8 / len(MEMORY_COLUMNS)
    for i, name in enumerate(MEMORY_COLUMNS):
        values = [case["memory"][name]["fwd+bwd"]["peak_bytes"] / 2**20 for case in cases]
        ax.bar(x - 0.4 + bar * (i + 0.5), values, bar, label=name, zorder=2)
    ax.set_yscale("log")
    ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("MiB beyond the inputs (log scale)")
    ax.set_title("fwd+bwd peak memory")
    ax.grid(axis="y", which="both", alpha=0.3, zorder=0)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(report.plot_title("deform_conv, jdynconv / torchvision", metadata), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(out_dir: Path, metadata: Mapping[str, Any], cases: Sequence[Mapping[str, Any]]) -> tuple[Path, ...]:
    # Rewritten after every case: the last write's "end" is the run's end.
    metadata = {**metadata, "load_average": {**metadata["load_average"], "end": os.getloadavg()}}
    markdown = "\n".join([*header_lines(metadata), "", summary(cases)])
    payload = {"benchmark": "deform_conv", "metadata": metadata, "cases": list(cases)}
    return report.write_reports(out_dir / STEM, payload, markdown, lambda png: plot(png, cases, metadata))


def main(argv: Sequence[str] | None = None) -> int:
    parser = harness.parser(__doc__, DEFAULTS, RESULTS, quick_help="two small cases, 3 rounds, short samples")
    case_list = ", ".join(f"{i}={c.name}" for i, c in enumerate(CASES))
    parser.add_argument("--cases", nargs="+", help=f"indices or names, space or comma separated: {case_list}")
    parser.add_argument(
        "--breakdown", action="store_true", help="also time jdynconv's VJP alone (bwd) and its passes taken apart"
    )
    args = parser.parse_args(argv)
    harness.configure_jax()
    import torch
    import torchvision

    settings = DEFAULTS.settings(args)
    cases = harness.select(QUICK_CASES if args.quick and not args.cases else CASES, args.cases)
    metadata = harness.run_metadata(
        args.quick,
        "cpu",
        **settings.metadata(),
        **jdynconv_source(),
        torchvision=torchvision.__version__,
        xla_flags=os.environ.get("XLA_FLAGS"),
        offset_scale=OFFSET_SCALE,
        targets=TARGETS,
        load_average={"start": os.getloadavg()},
    )
    log(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    print("\n".join(header_lines(metadata)) + "\n", flush=True)
    status = harness.run_cases(
        cases,
        lambda index, case: bench_case(index, case, settings, args.breakdown),
        lambda results: write_reports(args.out, metadata, results),
        summary,
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
