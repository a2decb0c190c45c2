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

import dataclasses
import functools
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import _harness as harness
import _report as report
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from _harness import Built, Check, Competitor, Settings, run_case
from _report import format_paired, format_ratio
from _timing import Call, PairedRatio, time_calls

import jdynconv

MODES = ("fwd", "fwd+bwd")
JDYNCONV_METHODS = ("auto", "im2col", "direct", "scan", "hybrid", "grouped", "vmap")
TORCH_FORMS = ("grouped", "vmap", "loop")
# PyTorch's grouped conv is the reference every result is checked against.
REFERENCE = "torch grouped"
SUBJECT = "jdynconv auto"
CHECK = Check(tolerance=1e-4)
# Lowerings whose cost grows faster than the batch (XLA:CPU's masked grouped / batch-group convs); they
# are probed on slices of the batch first, so a call that would take minutes is never run in full.
BATCH_PROBED = frozenset({"jdynconv vmap", "jdynconv grouped"})
DEFAULTS = harness.Defaults(rounds=15)
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


def probe(build: Callable[[Problem, str], Call], problem: Problem, mode: str, limit_s: float) -> float | None:
    """The seconds a full-batch call would take, estimated from calls on slices of the batch, once an estimate
    is over ``limit_s`` (else None): a call that would take minutes is never run in full."""
    batch = problem.shape.batch
    for probe_batch in sorted({b for b in (batch // 16, batch // 4) if 1 <= b < batch}):
        call = build(problem.head(probe_batch), mode)
        call()
        estimate = time_calls(call, 1) * batch / probe_batch
        if estimate > limit_s:
            return estimate
    return None


def competitors(
    problem: Problem, torch_device: torch.device, methods: Sequence[str] = JDYNCONV_METHODS
) -> list[Competitor]:
    """The reference first: its result is what every other competitor is checked against. All but the
    reference and ``jdynconv auto`` are skipped when too slow."""
    builds: dict[str, Callable[[Problem, str], Call]] = {
        **{f"torch {form}": functools.partial(build_torch, form, torch_device) for form in TORCH_FORMS},
        **{f"jdynconv {method}": functools.partial(build_jdynconv, method) for method in methods},
    }
    return [
        Competitor(
            name,
            lambda mode, build=build: Built(build(problem, mode)),
            functools.partial(probe, build, problem) if name in BATCH_PROBED else None,
            capped=name not in (SUBJECT, REFERENCE),
        )
        for name, build in builds.items()
    ]


def report_names(methods: Sequence[str]) -> list[str]:
    """The report's columns: jdynconv's methods, then PyTorch's formulations."""
    return [*(f"jdynconv {method}" for method in methods), *(f"torch {form}" for form in TORCH_FORMS)]


def bench_shape(
    index: int, shape: Shape, settings: Settings, torch_device: torch.device, methods: Sequence[str] = JDYNCONV_METHODS
) -> dict[str, Any]:
    problem = Problem.random(shape, seed=index)
    label = f"{shape.label}; {shape.fwd_gflop:.3g} GFLOP forward"
    run = run_case(
        index, label, MODES, lambda mode: competitors(problem, torch_device, methods), settings, CHECK, SUBJECT
    )
    best_torch: dict[str, dict[str, Any]] = {}
    ratios: dict[str, dict[str, float]] = {}
    paired: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        medians = run.medians(mode)
        torch_medians = {n: t for n, t in medians.items() if n.startswith("torch ")}
        best_name = min(torch_medians, key=torch_medians.__getitem__)
        best_torch[mode] = {"name": best_name, "median_ms": torch_medians[best_name] * 1e3}
        ratios[mode] = {
            name: t / torch_medians[best_name] for name, t in medians.items() if name.startswith("jdynconv ")
        }
        if SUBJECT in medians:
            paired[mode] = PairedRatio.of(run.stats[SUBJECT, mode], run.stats[best_name, mode]).as_json()
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
        "results": run.results,
        "best_torch": best_torch,
        "ratios": ratios,
        "paired_ratios": paired,
    }


# --- Reporting ------------------------------------------------------------------------------------------


def report_table(shape_results: Sequence[Mapping[str, Any]], names: Sequence[str]) -> str:
    def cells(shape: Mapping[str, Any], mode: str) -> list[str]:
        best = shape["best_torch"][mode]["name"].removeprefix("torch ")
        ratio = format_ratio(shape["ratios"][mode].get(SUBJECT))
        per_round = format_paired(shape.get("paired_ratios", {}).get(mode))
        return [*(report.time_cell(shape["results"][mode].get(name)) for name in names), best, ratio, per_round]

    headers = ["shape", "pass", *(f"{n} (ms)" for n in names), "best torch", "auto / best torch", "per round"]
    return report.mode_table(
        headers, shape_results, MODES, cells, lambda shape: f"{shape['name']}: {shape['description']}"
    )


def header_lines(metadata: Mapping[str, Any], grid: Grid) -> list[str]:
    return report.header_lines(
        f"{grid.title}: jdynconv vs PyTorch",
        metadata,
        report.timing_line(
            metadata, f"non-reference competitors slower than {metadata['max_call_s']:g} s/call are skipped"
        ),
        "- fwd+bwd: gradients of sum(y * g) w.r.t. inputs and kernels; ratio = jdynconv auto / fastest PyTorch "
        "(< 1: jdynconv faster)",
        "- per round: the same ratio round by round (both timed in every round): its middle half (25th-75th "
        "percentile) and the rounds in which auto was no slower",
    )


def write_reports(
    out_dir: Path, backend: str, metadata: Mapping[str, Any], shape_results: list[dict[str, Any]], grid: Grid
) -> tuple[Path, ...]:
    names = report_names(grid.methods)
    markdown = "\n".join([*header_lines(metadata, grid), "", report_table(shape_results, names), ""])
    panels = {
        mode: {
            method: [shape["ratios"][mode].get(f"jdynconv {method}") for shape in shape_results]
            for method in grid.methods
        }
        for mode in MODES
    }
    return report.write_reports(
        out_dir / f"{grid.stem}_{backend}",
        {"benchmark": "per_sample_conv", "metadata": dict(metadata), "shapes": shape_results},
        markdown,
        lambda png: report.plot_ratio_bars(
            png,
            groups=[shape["name"] for shape in shape_results],
            panels=panels,
            title=report.plot_title(f"{grid.stem}, jdynconv / fastest PyTorch", metadata),
            highlight="auto",
        ),
    )


# --- CLI ------------------------------------------------------------------------------------------------


def select_shapes(tokens: Sequence[str] | None, quick: bool, grid: Grid = GRIDS["main"]) -> list[tuple[int, Shape]]:
    """The shapes named (indices or names within ``grid``); without names, the grid's quick shapes or all."""
    return harness.select(grid.shapes, tokens or (grid.quick_shapes if quick else None), "shape")


def main(argv: Sequence[str] | None = None) -> int:
    parser = harness.parser(
        __doc__,
        DEFAULTS,
        Path("benchmarks/results"),
        quick_help=f"smoke test: {DEFAULTS.quick_rounds} rounds, short samples, the grid's quick shapes or --shapes",
    )
    parser.add_argument("--grid", choices=GRIDS, default="main", help="main (default) or depthwise; own report files")
    shape_list = "; ".join(
        f"{name}: " + ", ".join(f"{i}={shape.label}" for i, shape in enumerate(grid.shapes))
        for name, grid in GRIDS.items()
    )
    parser.add_argument(
        "--shapes", nargs="+", help=f"indices or names within the grid, space or comma separated: {shape_list}"
    )
    parser.add_argument("--max-call-s", type=float, default=2.0, help="skip competitors slower than this per call")
    args = parser.parse_args(argv)
    backend = harness.configure_jax()
    device = harness.torch_device(backend)
    settings = DEFAULTS.settings(args, max_call_s=args.max_call_s)
    grid = GRIDS[args.grid]
    metadata = harness.run_metadata(
        args.quick,
        device.type,
        **settings.metadata(),
        max_call_s=settings.max_call_s,
        tolerance=CHECK.tolerance,
        grid=args.grid,
    )
    print("\n".join(header_lines(metadata, grid)) + "\n", flush=True)
    return harness.run_cases(
        select_shapes(args.shapes, args.quick, grid),
        lambda index, shape: bench_shape(index, shape, settings, device, grid.methods),
        lambda results: write_reports(args.out, backend, metadata, results, grid),
        lambda results: report_table(results, report_names(grid.methods)),
    )


if __name__ == "__main__":
    sys.exit(main())
