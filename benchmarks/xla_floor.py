"""How fast does XLA:CPU run a convolution of this size at all? A reference for the per-sample conv.

For each shape of ``benchmarks/per_sample_conv.py`` this times two programs that do the per-sample
conv's FLOPs with less work around them, next to PyTorch's per-sample grouped conv and jdynconv:

* XLA's own ``lax.conv_general_dilated`` with ONE kernel for the whole batch (an ordinary conv, less
  memory traffic than B kernels), in both layouts (NCHW/OIHW as PyTorch, NHWC/HWIO as Flax);
* ONE unbatched matmul with the same FLOPs as the im2col contraction, ``(B * positions, K * K * C_in)
  @ (K * K * C_in, C_out)``, on ready-made patches (no patch building, no per-sample kernels).

The reference is the fastest of the three. It is not a proof of a bound: another algorithm could beat
both. But where PyTorch's per-sample conv is faster than the reference, a lowering to XLA:CPU's conv or
matmul would have to beat XLA's own dense conv and dense matmul of the same size to match PyTorch.

For the forward pass it also times the contraction an im2col lowering cannot avoid, with per-sample
kernels but on ready-made patches (no patch building): ``B`` unbatched matmuls ``(positions, K * K *
C_in) @ (K * K * C_in, C_out)`` one sample at a time (``lax.map``), and the same as one batched
``dot_general``. The "im2col core" is the faster of the two; where it alone is slower than PyTorch's
per-sample forward, neither batching of the contraction matches PyTorch's forward there. (jdynconv's
im2col runs two samples a step, which this does not time.) (Not for fwd+bwd:
the gradient of ready-made patches is a ``(B, positions, K * K * C_in)`` array that a real lowering
never builds, so timing it would overstate the work.)

Besides the per-sample benchmark's shapes it runs ``mix-2d``, the convolution inside
``benchmarks/kernel_mixing.py``'s CondConv and DynamicConv layers (B64, 64 -> 64 channels, 32x32, 3x3).

The reference programs compute different functions from the per-sample conv, so they are not checked
against PyTorch; they are timed on arrays of the same shapes, with a cotangent in the fwd+bwd pass
(gradients with respect to both operands).

    PYTHONPATH=. python benchmarks/xla_floor.py                  # -> benchmarks/results/xla_floor_cpu.*
    PYTHONPATH=. python benchmarks/xla_floor.py --shapes 2d-a --rounds 5 --out /tmp/floor
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import _harness as harness
import _report as report
import jax
import jax.numpy as jnp
import numpy as np
import torch
from _harness import Settings, log
from _report import format_ms, format_ratio, mode_table, plot_ratio_bars
from _timing import Call, warmed_medians
from per_sample_conv import (
    MODES,
    SHAPES,
    Problem,
    Shape,
    build_jdynconv,
    build_torch,
    select_shapes,
    training_pass_call,
)

DEFAULTS = harness.Defaults(rounds=11)
TORCH = "torch grouped (per-sample)"
SUBJECT = "jdynconv auto (per-sample)"
FLOORS = ("XLA shared conv NCHW", "XLA shared conv NHWC", "XLA one matmul")
CORES = ("XLA per-sample matmuls", "XLA batched matmul")
RATIO_KEYS = ("floor / torch", "im2col core / torch", "auto / floor")
# The convolution of kernel_mixing.py's CondConv/DynamicConv cases, as a per-sample conv shape.
EXTRA_SHAPES = (Shape("mix-2d", 64, 64, 64, (32, 32), 3, 1, 1),)


def shared_conv_call(problem: Problem, mode: str, channels_last: bool) -> Call:
    """XLA's ordinary conv of the whole batch with sample 0's kernel."""
    shape = problem.shape
    n = shape.num_spatial
    inputs, kernels, cotangent = problem.jax_arrays()
    kernel = kernels[0]  # (O, I, *K)
    if channels_last:
        inputs = jnp.moveaxis(inputs, 1, -1)
        kernel = jnp.moveaxis(kernel, (0, 1), (-1, -2))
        cotangent = jnp.moveaxis(cotangent, 1, -1)
    spatial = "DHW"[-n:]
    numbers = (
        (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
        if channels_last
        else (f"NC{spatial}", f"OI{spatial}", f"NC{spatial}")
    )
    inputs, kernel, cotangent = (jax.block_until_ready(a + 0) for a in (inputs, kernel, cotangent))  # laid out once

    def conv(x: jax.Array, w: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            x,
            w,
            (shape.stride,) * n,
            ((shape.padding, shape.padding),) * n,
            dimension_numbers=numbers,
            precision=jax.lax.Precision.HIGHEST,
        )

    if mode == "fwd":
        forward = jax.jit(conv)
        return lambda: jax.block_until_ready(forward(inputs, kernel))
    return training_pass_call(conv, inputs, kernel, cotangent)


def random_arrays(*sizes: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """Standard-normal float32 arrays of these sizes on JAX's device (seeded: every run times the same data)."""
    rng = np.random.default_rng(0)
    return tuple(jax.device_put(rng.standard_normal(size, dtype=np.float32)) for size in sizes)


def matmul(a: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.dot(a, w, precision=jax.lax.Precision.HIGHEST)


def one_matmul_call(problem: Problem, mode: str) -> Call:
    """One unbatched matmul with the im2col contraction's FLOPs, on random patches of its shape."""
    shape = problem.shape
    rows = shape.batch * math.prod(shape.out_spatial)
    depth = shape.in_channels * shape.kernel**shape.num_spatial
    patches, kernel, cotangent = random_arrays((rows, depth), (depth, shape.out_channels), (rows, shape.out_channels))
    if mode == "fwd":
        forward = jax.jit(matmul)
        return lambda: jax.block_until_ready(forward(patches, kernel))
    return training_pass_call(matmul, patches, kernel, cotangent)


def per_sample_matmuls_call(problem: Problem, batched: bool) -> Call:
    """The im2col contraction's forward with per-sample kernels on random ready-made patches: ``B`` unbatched
    matmuls one sample at a time (``lax.map``), or one batched matmul over the whole batch."""
    shape = problem.shape
    positions = math.prod(shape.out_spatial)
    depth = shape.in_channels * shape.kernel**shape.num_spatial
    patches, kernels = random_arrays((shape.batch, positions, depth), (shape.batch, depth, shape.out_channels))

    def matmuls(a: jax.Array, w: jax.Array) -> jax.Array:
        if batched:
            return jax.vmap(matmul)(a, w)
        return jax.lax.map(lambda pair: matmul(*pair), (a, w))

    forward = jax.jit(matmuls)
    return lambda: jax.block_until_ready(forward(patches, kernels))


def bench_shape(index: int, shape: Shape, settings: Settings) -> dict[str, Any]:
    problem = Problem.random(shape, seed=index)
    calls: dict[str, Call] = {}
    for mode in MODES:
        calls[f"{TORCH} [{mode}]"] = build_torch("grouped", torch.device("cpu"), problem, mode)
        calls[f"{SUBJECT} [{mode}]"] = build_jdynconv("auto", problem, mode)
        calls[f"{FLOORS[0]} [{mode}]"] = shared_conv_call(problem, mode, channels_last=False)
        calls[f"{FLOORS[1]} [{mode}]"] = shared_conv_call(problem, mode, channels_last=True)
        calls[f"{FLOORS[2]} [{mode}]"] = one_matmul_call(problem, mode)
    for core, batched in zip(CORES, (False, True), strict=True):
        calls[f"{core} [fwd]"] = per_sample_matmuls_call(problem, batched)
    stats = warmed_medians(calls, settings.rounds, settings.min_sample_s, seed=index)
    results: dict[str, dict[str, Any]] = {mode: {} for mode in MODES}
    for key, value in stats.items():
        name, mode = key.removesuffix("]").rsplit(" [", 1)
        results[mode][name] = {"status": "ok", "median_ms": value.median_s * 1e3, "inner": value.inner}
    ratios = {mode: floor_ratios(results[mode]) for mode in MODES}
    log(f"[{shape.label}] {ratios}")
    return {"name": shape.name, "description": shape.description, "results": results, "ratios": ratios}


def floor_ratios(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    floor_ms = min(results[floor]["median_ms"] for floor in FLOORS)
    cores_ms = [results[core]["median_ms"] for core in CORES if core in results]
    torch_ms, auto_ms = results[TORCH]["median_ms"], results[SUBJECT]["median_ms"]
    return {
        "floor / torch": floor_ms / torch_ms,
        "im2col core / torch": min(cores_ms) / torch_ms if cores_ms else None,
        "auto / torch": auto_ms / torch_ms,
        "auto / floor": auto_ms / floor_ms,
    }


def program_seconds(results: dict[str, dict[str, Any]], name: str) -> float | None:
    return results[name]["median_ms"] / 1e3 if name in results else None


def report_table(shapes: Sequence[Mapping[str, Any]]) -> str:
    names = [TORCH, SUBJECT, *FLOORS, *CORES]
    return mode_table(
        ["shape", "pass", *(f"{name} (ms)" for name in names), *RATIO_KEYS],
        shapes,
        MODES,
        lambda shape, mode: [
            *(format_ms(program_seconds(shape["results"][mode], name)) for name in names),
            *(format_ratio(shape["ratios"][mode][key]) for key in RATIO_KEYS),
        ],
        lambda shape: f"{shape['name']}: {shape['description']}",
    )


def header_lines(metadata: Mapping[str, Any]) -> list[str]:
    return report.header_lines(
        "XLA's floor: a shared-kernel conv vs PyTorch's per-sample grouped conv",
        metadata,
        f"- float32, precision highest; {metadata['rounds']} interleaved rounds, medians",
        "- floor = the fastest of XLA's conv with ONE kernel for the whole batch (NCHW, NHWC) and ONE unbatched"
        " matmul of the im2col contraction's size: the per-sample conv's FLOPs with less work around them."
        " floor / torch > 1: to match PyTorch there, a lowering to XLA:CPU's conv or matmul would have to beat"
        " XLA's own dense conv and matmul of the same size (a reference, not a proof of a bound)",
        "- im2col core = the faster of B unbatched per-sample matmuls (lax.map) and one batched matmul of the"
        " im2col contraction on ready-made patches, forward only: the matmul work of any im2col lowering, without"
        " building patches (not two samples a step, as jdynconv runs). im2col core / torch > 1: neither batching"
        " matches PyTorch's forward there",
        "- mix-2d is the convolution inside benchmarks/kernel_mixing.py's CondConv and DynamicConv layers",
    )


def write_reports(out_dir: Path, metadata: Mapping[str, Any], shapes: Sequence[Mapping[str, Any]]) -> tuple[Path, ...]:
    panels = {
        mode: {
            label: [shape["ratios"][mode][key] for shape in shapes]
            for label, key in (
                ("XLA shared conv (floor)", "floor / torch"),
                ("XLA im2col core", "im2col core / torch"),
                ("jdynconv auto", "auto / torch"),
            )
        }
        for mode in MODES
    }
    return report.write_reports(
        out_dir / f"xla_floor_{metadata['jax_backend']}",
        {"benchmark": "xla_floor", "metadata": dict(metadata), "shapes": list(shapes)},
        "\n".join([*header_lines(metadata), "", report_table(shapes), ""]),
        lambda png: plot_ratio_bars(
            png,
            groups=[shape["name"] for shape in shapes],
            panels=panels,
            title=report.plot_title("XLA's floor vs PyTorch per-sample grouped conv", metadata),
            ylabel="time / PyTorch grouped conv (log scale)",
            highlight="XLA shared conv (floor)",
        ),
    )


def choose_shapes(tokens: Sequence[str] | None, quick: bool) -> list[tuple[int, Shape]]:
    """per_sample_conv.py's shape selection plus ``EXTRA_SHAPES`` by name; without names, the full run
    (not ``--quick``) takes all of both."""
    extra_names = [shape.name for shape in EXTRA_SHAPES]
    requested = [part for raw in tokens or () for part in raw.split(",") if part]
    standard = [token for token in requested if token not in extra_names]
    chosen = select_shapes(standard, quick) if standard or not requested else []
    wanted = set(requested) if requested else (set() if quick else set(extra_names))
    return chosen + [(len(SHAPES) + i, shape) for i, shape in enumerate(EXTRA_SHAPES) if shape.name in wanted]


def main(argv: Sequence[str] | None = None) -> int:
    parser = harness.parser(
        __doc__, DEFAULTS, Path(__file__).parent / "results", quick_help="smoke test: 3 rounds, shapes seed and 2d-a"
    )
    parser.add_argument(
        "--shapes", nargs="+", help="names of per_sample_conv.py's shapes or mix-2d (default: all of them)"
    )
    args = parser.parse_args(argv)
    harness.configure_jax()
    settings = DEFAULTS.settings(args)
    metadata = harness.run_metadata(args.quick, "cpu", rounds=settings.rounds)
    print("\n".join(header_lines(metadata)) + "\n", flush=True)
    return harness.run_cases(
        choose_shapes(args.shapes, args.quick),
        lambda index, shape: bench_shape(index, shape, settings),
        lambda shapes: write_reports(args.out, metadata, shapes),
        report_table,
    )


if __name__ == "__main__":
    sys.exit(main())
