"""Per-sample convolution: jdynconv's lowerings vs PyTorch's formulations, forward and forward+backward.

Every shape is in PyTorch's layout: inputs (B, C_in, *S), kernels (B, C_out, C_in, *K), symmetric int
padding, so both frameworks compute the same function (jdynconv with ``data_format="channels_first"``).
The fwd+bwd pass is the gradient of ``sum(y * g)`` with respect to inputs and kernels, for a fixed random
cotangent ``g``. Before anything is timed, each competitor's result is checked against PyTorch's grouped
conv; a mismatch is reported and never timed. Ratios are jdynconv's median time over the fastest PyTorch
formulation's median time on the same shape and pass: below 1.0 jdynconv is faster.

    PYTHONPATH=. python benchmarks/per_sample_conv.py            # full grid -> benchmarks/results/
    PYTHONPATH=. python benchmarks/per_sample_conv.py --grid depthwise   # depthwise convs (groups = channels)
    PYTHONPATH=. python benchmarks/per_sample_conv.py --quick --out /tmp/bench_smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from _timing import (
    Call,
    PairedRatio,
    environment_metadata,
    format_ms,
    format_paired,
    format_ratio,
    inner_calls,
    interleaved_medians,
    markdown_table,
    plot_ratio_bars,
    time_calls,
    write_json,
)

import jdynconv

MODES = ("fwd", "fwd+bwd")
JDYNCONV_METHODS = ("auto", "im2col", "direct", "scan", "hybrid", "grouped", "vmap")
TORCH_FORMS = ("grouped", "vmap", "loop")
# PyTorch's grouped conv is the reference every result is checked against.
REFERENCE = "torch grouped"
SUBJECT = "jdynconv auto"
TOLERANCE = 1e-4
# Lowerings whose cost grows faster than the batch (XLA:CPU's masked grouped / batch-group convs); they
# are probed on slices of the batch first, so a call that would take minutes is never run in full.
BATCH_PROBED = frozenset({"jdynconv vmap", "jdynconv grouped"})
DEFAULT_ROUNDS = 15
DEFAULT_MIN_SAMPLE_S = 0.02
QUICK_ROUNDS = 3
QUICK_MIN_SAMPLE_S = 0.005
QUICK_SHAPES = ("seed", "2d-a")


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    in_channels: int
    out_channels: int
    spatial: tuple[int, ...]
    kernel: int
    stride: int
    padding: int
    groups: int = 1

    @property
    def num_spatial(self) -> int:
        return len(self.spatial)

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return (self.kernel,) * self.num_spatial

    @property
    def out_spatial(self) -> tuple[int, ...]:
        return tuple((s + 2 * self.padding - self.kernel) // self.stride + 1 for s in self.spatial)

    @property
    def fwd_gflop(self) -> float:
        taps = self.kernel**self.num_spatial
        macs = self.batch * self.out_channels * math.prod(self.out_spatial) * self.in_channels // self.groups * taps
        return 2 * macs / 1e9

    @property
    def description(self) -> str:
        spatial = "x".join(map(str, self.spatial))
        kernel = "x".join(map(str, self.kernel_size))
        groups = f" g{self.groups}" if self.groups > 1 else ""
        return (
            f"B{self.batch} C{self.in_channels}->{self.out_channels} S{spatial} "
            f"k{kernel} s{self.stride} p{self.padding}{groups}"
        )

    @property
    def label(self) -> str:
        return f"{self.name}: {self.description}"


SHAPES: tuple[Shape, ...] = (
    Shape("seed", 32, 4, 8, (16,), 1, 1, 0),
    Shape("1d-a", 64, 64, 64, (128,), 3, 1, 1),
    Shape("1d-b", 128, 128, 128, (64,), 5, 2, 2),
    Shape("2d-a", 64, 32, 32, (32, 32), 3, 1, 1),
    Shape("2d-b", 64, 128, 128, (16, 16), 3, 2, 1),
    Shape("2d-c", 128, 256, 256, (8, 8), 3, 1, 1),
    Shape("3d-a", 64, 32, 32, (8, 8, 8), 3, 1, 1),
)
# Depthwise convs (groups = channels, as in MobileNet / ConvNeXt blocks), a grid of their own
# (``--grid depthwise``): the methods that suit them differ, and ``depthwise`` would unroll a multiply-add
# per tap and input channel on the main grid's dense convs.
DEPTHWISE_SHAPES: tuple[Shape, ...] = (
    Shape("dw-3x3", 64, 64, 64, (32, 32), 3, 1, 1, groups=64),
    Shape("dw-7x7", 64, 64, 64, (32, 32), 7, 1, 3, groups=64),
    Shape("dw-s2", 64, 128, 128, (16, 16), 3, 2, 1, groups=128),
)


@dataclasses.dataclass(frozen=True)
class Grid:
    """A set of shapes with the jdynconv methods timed on them, reported under ``stem``."""

    stem: str
    title: str
    shapes: tuple[Shape, ...]
    methods: tuple[str, ...]
    quick_shapes: tuple[str, ...]


GRIDS: dict[str, Grid] = {
    "main": Grid("per_sample_conv", "Per-sample convolution", SHAPES, JDYNCONV_METHODS, QUICK_SHAPES),
    "depthwise": Grid(
        "per_sample_conv_depthwise",
        "Per-sample depthwise convolution",
        DEPTHWISE_SHAPES,
        ("auto", "depthwise", "im2col", "direct", "vmap"),
        ("dw-3x3",),
    ),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """One shape's data: inputs, kernels and the fixed cotangent of the fwd+bwd pass (float32, NumPy).

    The device copies are made once and shared by all competitors: the largest shape's kernels alone
    are 300 MB.
    """

    shape: Shape
    inputs: np.ndarray
    kernels: np.ndarray
    cotangent: np.ndarray
    _device_copies: dict[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict, repr=False)

    def jax_arrays(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(inputs, kernels, cotangent) on JAX's default device."""
        if "jax" not in self._device_copies:
            self._device_copies["jax"] = tuple(jax.device_put(a) for a in (self.inputs, self.kernels, self.cotangent))
        return self._device_copies["jax"]  # type: ignore[return-value]

    def torch_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, kernels, cotangent) on ``device``."""
        key = f"torch:{device}"
        if key not in self._device_copies:
            self._device_copies[key] = tuple(
                torch.from_numpy(a).to(device) for a in (self.inputs, self.kernels, self.cotangent)
            )
        return self._device_copies[key]  # type: ignore[return-value]

    @classmethod
    def random(cls, shape: Shape, seed: int = 0) -> Problem:
        rng = np.random.default_rng(seed)
        group_in = shape.in_channels // shape.groups
        fan_in = group_in * shape.kernel**shape.num_spatial
        inputs = rng.standard_normal((shape.batch, shape.in_channels, *shape.spatial), dtype=np.float32)
        kernels = rng.standard_normal(
            (shape.batch, shape.out_channels, group_in, *shape.kernel_size), dtype=np.float32
        ) / np.float32(math.sqrt(fan_in))
        cotangent = rng.standard_normal((shape.batch, shape.out_channels, *shape.out_spatial), dtype=np.float32)
        return cls(shape, inputs, kernels, cotangent)

    def head(self, batch: int) -> Problem:
        """The first ``batch`` samples, for probing how a call's cost grows with the batch."""
        return Problem(
            dataclasses.replace(self.shape, batch=batch),
            self.inputs[:batch],
            self.kernels[:batch],
            self.cotangent[:batch],
        )


Builder = Callable[[Problem, str], Call]


@dataclasses.dataclass(frozen=True)
class Competitor:
    name: str
    build: Builder  # (problem, mode) -> a call that runs once, waits, and returns the result


# --- JAX ------------------------------------------------------------------------------------------------


def build_jdynconv(method: str, problem: Problem, mode: str) -> Call:
    shape = problem.shape
    conv = functools.partial(
        jdynconv.per_sample_conv,
        strides=shape.stride,
        padding=shape.padding,
        kernel_dilation=1,
        feature_group_count=shape.groups,
        data_format="channels_first",
        precision=jax.lax.Precision.HIGHEST,
        method=method,
    )
    inputs, kernels, cotangent = problem.jax_arrays()
    if mode == "fwd":
        forward = jax.jit(conv)
        return lambda: jax.block_until_ready(forward(inputs, kernels))

    return training_pass_call(conv, inputs, kernels, cotangent)


def training_pass_call(conv: Callable[[jax.Array, jax.Array], jax.Array], *arrays: jax.Array) -> Call:
    """A call running ``sum(conv(x, w) * g)`` forward and its gradients for ``x`` and ``w``; returns the gradients.

    The loss value is computed and waited for too. The loss is linear in the conv's output, so with
    ``jax.grad`` alone the forward conv is dead code and XLA drops it, while PyTorch's ``backward()``
    always runs the forward: the pass would time a backward against PyTorch's forward + backward. (The
    value costs JAX one multiply and sum over the output that PyTorch's ``backward(g)`` does not do.)
    The cotangent ``g`` is an argument, not a closed-over constant XLA would fold into the program.
    """

    def loss(x: jax.Array, w: jax.Array, g: jax.Array) -> jax.Array:
        return jnp.sum(conv(x, w) * g)

    value_and_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return lambda: jax.block_until_ready(value_and_grads(*arrays))[1]


# --- PyTorch --------------------------------------------------------------------------------------------

TorchConv = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def torch_conv(shape: Shape) -> Callable[..., torch.Tensor]:
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[shape.num_spatial]
    return functools.partial(conv, stride=shape.stride, padding=shape.padding)


def torch_grouped(shape: Shape) -> TorchConv:
    """The usual PyTorch trick: the batch folded into channels, one conv with ``groups=B * G``."""
    conv = torch_conv(shape)

    def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        batch, in_channels, *spatial = x.shape
        out_channels = w.shape[1]
        folded_kernels = w.reshape(batch * out_channels, *w.shape[2:])
        y = conv(x.reshape(1, batch * in_channels, *spatial), folded_kernels, groups=batch * shape.groups)
        return y.reshape(batch, out_channels, *y.shape[2:])

    return forward


def torch_vmap(shape: Shape) -> TorchConv:
    conv = functools.partial(torch_conv(shape), groups=shape.groups)
    return torch.func.vmap(lambda x, w: conv(x[None], w)[0])


def torch_loop(shape: Shape) -> TorchConv:
    conv = functools.partial(torch_conv(shape), groups=shape.groups)
    return lambda x, w: torch.cat([conv(x[i : i + 1], w[i]) for i in range(x.shape[0])])


TORCH_FORMULATIONS: dict[str, Callable[[Shape], TorchConv]] = {
    "grouped": torch_grouped,
    "vmap": torch_vmap,
    "loop": torch_loop,
}


def build_torch(form: str, device: torch.device, problem: Problem, mode: str) -> Call:
    forward = TORCH_FORMULATIONS[form](problem.shape)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    inputs, kernels, cotangent = problem.torch_tensors(device)
    if mode == "fwd":

        def run_forward() -> torch.Tensor:
            with torch.no_grad():
                y = forward(inputs, kernels)
            sync()
            return y

        return run_forward

    # Leaves of their own (sharing storage), so each competitor's gradients are its own.
    inputs = inputs.detach().requires_grad_(True)
    kernels = kernels.detach().requires_grad_(True)

    def run_backward() -> tuple[torch.Tensor, torch.Tensor]:
        inputs.grad = None
        kernels.grad = None
        forward(inputs, kernels).backward(cotangent)  # d sum(y * g) = g
        sync()
        return inputs.grad, kernels.grad  # type: ignore[return-value]  # set by backward()

    return run_backward


def competitors(torch_device: torch.device, methods: Sequence[str] = JDYNCONV_METHODS) -> list[Competitor]:
    """The reference first: its result is what every other competitor is checked against."""
    torch_side = [
        Competitor(f"torch {form}", functools.partial(build_torch, form, torch_device)) for form in TORCH_FORMS
    ]
    jax_side = [Competitor(f"jdynconv {method}", functools.partial(build_jdynconv, method)) for method in methods]
    return [*torch_side, *jax_side]


# --- Running --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    rounds: int
    min_sample_s: float
    max_call_s: float


@dataclasses.dataclass
class Prepared:
    """A competitor after warm-up and validation: either ready to time, or the reason it is not."""

    status: str  # "ok", "skipped", "wrong" or "error"
    note: str = ""
    call: Call | None = None
    inner: int = 1
    first_call_s: float | None = None
    warm_call_s: float | None = None
    rel_error: float | None = None
    estimated_call_s: float | None = None


def as_numpy(result: object) -> tuple[np.ndarray, ...]:
    parts = result if isinstance(result, tuple) else (result,)
    # Copies: a CPU tensor's .numpy() is a view that a later call could overwrite.
    return tuple(p.detach().cpu().numpy().copy() if isinstance(p, torch.Tensor) else np.array(p) for p in parts)


def relative_error(result: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Largest ``max|a - b| / max|b|`` over the outputs (the result, or both gradients)."""
    errors = [
        float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
        for a, b in zip(result, reference, strict=True)
    ]
    return max(errors)


def probe_batches(batch: int) -> list[int]:
    return sorted({b for b in (batch // 16, batch // 4) if 1 <= b < batch})


def prepare(
    competitor: Competitor,
    mode: str,
    problem: Problem,
    reference: tuple[np.ndarray, ...] | None,
    settings: Settings,
) -> tuple[Prepared, tuple[np.ndarray, ...]]:
    """Compiles, validates and probes one competitor; returns it with its (NumPy) result."""
    skip_note = f"skipped (>{settings.max_call_s:g} s/call)"
    capped = competitor.name not in (SUBJECT, REFERENCE)
    batch = problem.shape.batch
    if competitor.name in BATCH_PROBED:
        for probe_batch in probe_batches(batch):
            call = competitor.build(problem.head(probe_batch), mode)
            call()
            estimate = time_calls(call, 1) * batch / probe_batch
            del call
            if estimate > settings.max_call_s:
                return Prepared("skipped", skip_note, estimated_call_s=estimate), ()
    call = competitor.build(problem, mode)
    start = time.perf_counter()
    result = as_numpy(call())
    first_call_s = time.perf_counter() - start
    rel_error = 0.0 if reference is None else relative_error(result, reference)
    if not rel_error <= TOLERANCE:
        note = f"wrong (rel. error {rel_error:.1e})"
        return Prepared("wrong", note, first_call_s=first_call_s, rel_error=rel_error), result
    warm_call_s = time_calls(call, 1)
    if capped and warm_call_s > settings.max_call_s:
        return Prepared("skipped", skip_note, first_call_s=first_call_s, estimated_call_s=warm_call_s), result
    inner = inner_calls(call, warm_call_s, settings.min_sample_s)
    prepared = Prepared(
        "ok", call=call, inner=inner, first_call_s=first_call_s, warm_call_s=warm_call_s, rel_error=rel_error
    )
    return prepared, result


def describe(entry: Prepared) -> str:
    if entry.status == "ok":
        return (
            f"compile+first call {format_ms(entry.first_call_s)} ms, warm call {format_ms(entry.warm_call_s)} ms, "
            f"x{entry.inner} per sample, rel. error {entry.rel_error:.1e}"
        )
    if entry.estimated_call_s is not None:
        return f"{entry.note}: about {entry.estimated_call_s:.3g} s/call"
    return entry.note


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_shape(
    index: int, shape: Shape, settings: Settings, torch_device: torch.device, methods: Sequence[str] = JDYNCONV_METHODS
) -> dict[str, Any]:
    problem = Problem.random(shape, seed=index)
    log(f"[{shape.label}] {shape.fwd_gflop:.3g} GFLOP forward")
    prepared: dict[tuple[str, str], Prepared] = {}
    for mode in MODES:
        reference: tuple[np.ndarray, ...] | None = None
        for competitor in competitors(torch_device, methods):
            try:
                entry, result = prepare(competitor, mode, problem, reference, settings)
            except Exception as error:  # a failing competitor is reported, not fatal
                entry, result = Prepared("error", f"error ({type(error).__name__})"), ()
                log(f"  {competitor.name} [{mode}] raised {error!r}")
            if competitor.name == REFERENCE:
                if entry.status != "ok":
                    raise RuntimeError(f"The reference {REFERENCE} failed on {shape.label}: {entry.note}")
                reference = result
            prepared[competitor.name, mode] = entry
            log(f"  {competitor.name:>17} [{mode:>7}] {describe(entry)}")
        if prepared[SUBJECT, mode].status == "wrong":
            log(f"  !! {SUBJECT} [{mode}] does not match {REFERENCE}: {prepared[SUBJECT, mode].note}")

    timed = {key: entry for key, entry in prepared.items() if entry.status == "ok"}
    calls = {f"{name} [{mode}]": entry.call for (name, mode), entry in timed.items() if entry.call is not None}
    inner = {f"{name} [{mode}]": entry.inner for (name, mode), entry in timed.items()}
    stats = interleaved_medians(
        calls,
        inner,
        settings.rounds,
        seed=index,
        on_round=lambda r: log(f"  round {r + 1}/{settings.rounds}"),
    )

    results: dict[str, dict[str, Any]] = {mode: {} for mode in MODES}
    medians: dict[str, dict[str, float]] = {mode: {} for mode in MODES}
    for (name, mode), entry in prepared.items():
        record: dict[str, Any] = {"status": entry.status}
        if entry.note:
            record["note"] = entry.note
        for field in ("first_call_s", "warm_call_s", "rel_error", "estimated_call_s"):
            if getattr(entry, field) is not None:
                record[field] = getattr(entry, field)
        if entry.status == "ok":
            stat = stats[f"{name} [{mode}]"]
            record.update(stat.as_json())
            medians[mode][name] = stat.median_s
        results[mode][name] = record

    best_torch: dict[str, dict[str, Any]] = {}
    ratios: dict[str, dict[str, float]] = {}
    paired: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        torch_medians = {n: t for n, t in medians[mode].items() if n.startswith("torch ")}
        best_name = min(torch_medians, key=torch_medians.__getitem__)
        best_torch[mode] = {"name": best_name, "median_ms": torch_medians[best_name] * 1e3}
        ratios[mode] = {
            name: t / torch_medians[best_name] for name, t in medians[mode].items() if name.startswith("jdynconv ")
        }
        if SUBJECT in medians[mode]:
            paired[mode] = PairedRatio.of(stats[f"{SUBJECT} [{mode}]"], stats[f"{best_name} [{mode}]"]).as_json()
    return {
        "index": index,
        "name": shape.name,
        "description": shape.description,
        "batch": shape.batch,
        "in_channels": shape.in_channels,
        "out_channels": shape.out_channels,
        "spatial": list(shape.spatial),
        "kernel_size": list(shape.kernel_size),
        "stride": shape.stride,
        "padding": shape.padding,
        "groups": shape.groups,
        "fwd_gflop": shape.fwd_gflop,
        "results": results,
        "best_torch": best_torch,
        "ratios": ratios,
        "paired_ratios": paired,
    }


# --- Reporting ------------------------------------------------------------------------------------------


def report_table(shape_results: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    headers = ["shape", "pass", *(f"{n} (ms)" for n in names), "best torch", "auto / best torch", "per round"]
    rows = []
    for shape in shape_results:
        for mode in MODES:
            cells = []
            for name in names:
                record = shape["results"][mode].get(name, {"status": "error", "note": "-"})
                cells.append(format_ms(record["median_ms"] / 1e3) if record["status"] == "ok" else record["note"])
            best = shape["best_torch"][mode]["name"].removeprefix("torch ")
            ratio = shape["ratios"][mode].get(SUBJECT)
            label = f"{shape['name']}: {shape['description']}" if mode == MODES[0] else ""
            per_round = format_paired(shape.get("paired_ratios", {}).get(mode))
            rows.append([label, mode, *cells, best, format_ratio(ratio), per_round])
    return markdown_table(headers, rows)


def header_lines(metadata: dict[str, Any], settings: Settings, grid: Grid = GRIDS["main"]) -> list[str]:
    torch_where = metadata["torch_device"]
    if metadata.get("torch_cuda_device") and torch_where == "cuda":
        torch_where += f" ({metadata['torch_cuda_device']})"
    return [
        f"# {grid.title}: jdynconv vs PyTorch",
        "",
        f"- date: {metadata['date']}; platform: {metadata['platform']}; CPU: {metadata['cpu']} "
        f"({metadata['cpu_count']} logical cores)",
        f"- jax {metadata['jax']} / jaxlib {metadata['jaxlib']}, backend {metadata['jax_backend']}, "
        f"devices {metadata['jax_devices']} (kind {metadata['device_kind']})",
        f"- torch {metadata.get('torch')} on {torch_where}, torch threads {metadata.get('torch_num_threads')}",
        f"- float32, precision pinned to highest (no TF32); {settings.rounds} interleaved rounds, medians; "
        f"samples >= {settings.min_sample_s * 1e3:g} ms; non-reference competitors slower than "
        f"{settings.max_call_s:g} s/call are skipped",
        "- fwd+bwd: gradients of sum(y * g) w.r.t. inputs and kernels; ratio = jdynconv auto / fastest PyTorch "
        "(< 1: jdynconv faster)",
        "- per round: the same ratio round by round (both timed in every round): its middle half (25th-75th "
        "percentile) and the rounds in which auto was no slower",
    ]


def write_reports(
    out_dir: Path,
    backend: str,
    metadata: dict[str, Any],
    settings: Settings,
    shape_results: list[dict[str, Any]],
    grid: Grid = GRIDS["main"],
) -> tuple[Path, Path, Path]:
    stem = f"{grid.stem}_{backend}"
    json_path, md_path, png_path = (out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png"))
    write_json(json_path, {"benchmark": "per_sample_conv", "metadata": metadata, "shapes": shape_results})
    names = [c.name for c in competitors(torch.device("cpu"), grid.methods)]
    ordered = [n for n in names if n.startswith("jdynconv ")] + [n for n in names if n.startswith("torch ")]
    table = report_table(shape_results, ordered)
    md_path.write_text("\n".join([*header_lines(metadata, settings, grid), "", table, ""]))
    jax_names = [n for n in ordered if n.startswith("jdynconv ")]
    panels = {
        mode: {
            name.removeprefix("jdynconv "): [shape["ratios"][mode].get(name) for shape in shape_results]
            for name in jax_names
        }
        for mode in MODES
    }
    plot_ratio_bars(
        png_path,
        groups=[shape["name"] for shape in shape_results],
        panels=panels,
        title=(
            f"{grid.stem}, jdynconv / fastest PyTorch ({metadata['device_kind']}, jax {metadata['jax']}, "
            f"torch {metadata.get('torch')}, {metadata['date'][:10]})"
        ),
        highlight="auto",
    )
    return json_path, md_path, png_path


# --- CLI ------------------------------------------------------------------------------------------------


def select_shapes(tokens: Sequence[str] | None, quick: bool, grid: Grid = GRIDS["main"]) -> list[tuple[int, Shape]]:
    shapes = grid.shapes
    if not tokens:
        tokens = grid.quick_shapes if quick else [shape.name for shape in shapes]
    by_name = {shape.name: i for i, shape in enumerate(shapes)}
    chosen: list[int] = []
    for token in (part for raw in tokens for part in raw.split(",") if part):
        if token.isdigit() and int(token) < len(shapes):
            chosen.append(int(token))
        elif token in by_name:
            chosen.append(by_name[token])
        else:
            choices = ", ".join(f"{i}={shape.name}" for i, shape in enumerate(shapes))
            raise SystemExit(f"Unknown shape {token!r}; choose indices or names among: {choices}.")
    return [(i, shapes[i]) for i in dict.fromkeys(chosen)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    shape_list = "; ".join(
        f"{name}: " + ", ".join(f"{i}={shape.label}" for i, shape in enumerate(grid.shapes))
        for name, grid in GRIDS.items()
    )
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_ROUNDS} rounds, short samples, the grid's first shapes unless --shapes",
    )
    parser.add_argument("--rounds", type=int, help=f"timed rounds (default {DEFAULT_ROUNDS}, {QUICK_ROUNDS} quick)")
    parser.add_argument("--grid", choices=GRIDS, default="main", help="main (default) or depthwise; own report files")
    parser.add_argument(
        "--shapes", nargs="+", help=f"indices or names within the grid, space or comma separated: {shape_list}"
    )
    parser.add_argument("--max-call-s", type=float, default=2.0, help="skip competitors slower than this per call")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON, MD and PNG")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Read when JAX creates its GPU client (lazily, on first use): leave GPU memory to PyTorch as well.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    jax.config.update("jax_default_matmul_precision", "highest")
    backend = jax.default_backend()
    torch_device = torch.device("cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu")
    if torch_device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True  # PyTorch's best: shapes are fixed, so let cuDNN pick
    settings = Settings(
        rounds=args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS),
        min_sample_s=QUICK_MIN_SAMPLE_S if args.quick else DEFAULT_MIN_SAMPLE_S,
        max_call_s=args.max_call_s,
    )
    grid = GRIDS[args.grid]
    shapes = select_shapes(args.shapes, args.quick, grid)
    metadata = environment_metadata() | {
        "torch_device": torch_device.type,
        "rounds": settings.rounds,
        "min_sample_ms": settings.min_sample_s * 1e3,
        "max_call_s": settings.max_call_s,
        "tolerance": TOLERANCE,
        "quick": args.quick,
        "grid": args.grid,
        "command": " ".join(sys.argv),
    }
    print("\n".join(header_lines(metadata, settings, grid)) + "\n", flush=True)
    if backend == "gpu" and torch_device.type != "cuda":
        log("!! JAX runs on GPU but PyTorch has no CUDA: ratios compare a GPU with the CPU.")

    start = time.perf_counter()
    shape_results: list[dict[str, Any]] = []
    for index, shape in shapes:
        shape_results.append(bench_shape(index, shape, settings, torch_device, grid.methods))
        jax.clear_caches()
        paths = write_reports(args.out, backend, metadata, settings, shape_results, grid)
        log(f"  done in {time.perf_counter() - start:.0f} s so far; results in {paths[0]}")

    names = [c.name for c in competitors(torch_device, grid.methods)]
    ordered = [n for n in names if n.startswith("jdynconv ")] + [n for n in names if n.startswith("torch ")]
    print(report_table(shape_results, ordered))
    print(f"\nWrote {', '.join(map(str, paths))} in {time.perf_counter() - start:.0f} s.")
    wrong = [
        f"{shape['name']} {name} [{mode}]"
        for shape in shape_results
        for mode in MODES
        for name, record in shape["results"][mode].items()
        if record["status"] in ("wrong", "error")
    ]
    if wrong:
        print(f"\nNot timed (wrong result or error): {', '.join(wrong)}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
