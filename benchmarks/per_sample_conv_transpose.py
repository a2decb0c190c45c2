"""Per-sample transposed convolution: jdynconv's two forms against PyTorch's grouped ``conv_transpose2d``.

Competitors, per-sample kernels ``(B, C_in, C_out, k, k)`` (PyTorch's ``ConvTranspose2d.weight`` per sample):

- ``jdynconv sub_pixel``: ``jdynconv.per_sample_conv_transpose(..., form="sub_pixel")`` (``"auto"``'s choice for
  dilation 1): ``stride**2`` phase convs run as one conv over the undilated input, then depth-to-space;
- ``jdynconv input_dilated``: ``form="input_dilated"``, a conv over the input with ``stride - 1`` zeros inserted;
- ``torch grouped``: the batch folded into channels, one ``F.conv_transpose2d`` with ``groups = B`` (how
  NVIDIA's fused modulated convolution runs its up-sampling).

Passes: ``fwd``; ``grad``: forward and the gradients w.r.t. inputs and kernels of ``sum(y * g)``. Outputs are
checked against PyTorch's within 1e-4 relative first. Interleaved shuffled rounds, medians (``_timing``).

    PYTHONPATH=. python benchmarks/per_sample_conv_transpose.py      # -> benchmarks/results/families/
    PYTHONPATH=. python benchmarks/per_sample_conv_transpose.py --quick --out /tmp/bench_transpose
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import _harness as harness
import _report as report
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from _harness import log, relative_error
from _report import environment_metadata, markdown_table
from _timing import warmed_medians

import jdynconv as jdc


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    in_channels: int
    out_channels: int
    size: int
    kernel_size: int
    stride: int
    padding: int


CASES = (
    Case("256ch_32x32_k3_s2", 16, 256, 256, 32, 3, 2, 0),
    Case("64ch_32x32_k4_s2_p1", 16, 64, 64, 32, 4, 2, 1),
    Case("32ch_16x16_k3_s2", 64, 32, 32, 16, 3, 2, 1),
)
FORMS = ("sub_pixel", "input_dilated")
TOLERANCE = 1e-4
# Samples of at least 50 ms and at most 20 calls, quick or not: these calls are long.
DEFAULTS = harness.Defaults(rounds=7, min_sample_s=0.05, quick_min_sample_s=0.05)


def competitors(case: Case) -> tuple[dict[str, dict], np.ndarray, dict[str, jax.Array]]:
    rng = np.random.default_rng(0)
    b, ci, co, k = case.batch, case.in_channels, case.out_channels, case.kernel_size
    x = rng.normal(size=(b, ci, case.size, case.size)).astype(np.float32)
    w = rng.normal(size=(b, ci, co, k, k)).astype(np.float32)
    settings = {"stride": case.stride, "padding": case.padding}

    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)

    def torch_forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose2d(
            x.reshape(1, b * ci, case.size, case.size), w.reshape(b * ci, co, k, k), groups=b, **settings
        )
        return y.reshape(b, co, *y.shape[2:])

    with torch.no_grad():
        expected = torch_forward(tx, tw).numpy()
    cotangent = torch.tensor(rng.normal(size=expected.shape).astype(np.float32))

    def torch_fwd() -> None:
        with torch.inference_mode():
            torch_forward(tx, tw)

    def torch_grad() -> None:
        torch.autograd.grad(torch_forward(tx, tw), (tx, tw), cotangent)

    calls = {"torch grouped": {"fwd": torch_fwd, "grad": torch_grad}}
    outputs = {}
    jx, jw = jnp.asarray(np.moveaxis(x, 1, -1)), jnp.asarray(np.moveaxis(w, (1, 2), (-1, -2)))
    jg = jnp.asarray(np.moveaxis(cotangent.numpy(), 1, -1))
    for form in FORMS:

        def forward(x, w, form=form):
            return jdc.per_sample_conv_transpose(x, w, strides=case.stride, padding=case.padding, form=form)

        fwd = jax.jit(forward)
        grad = jax.jit(lambda x, w, g, forward=forward: jax.grad(lambda x, w: jnp.sum(forward(x, w) * g), (0, 1))(x, w))
        outputs[form] = fwd(jx, jw)
        calls[f"jdynconv {form}"] = {
            "fwd": lambda fwd=fwd: jax.block_until_ready(fwd(jx, jw)),
            "grad": lambda grad=grad: jax.block_until_ready(grad(jx, jw, jg)),
        }
    return calls, np.moveaxis(expected, 1, -1), outputs


def main(argv: Sequence[str] | None = None) -> None:
    args = harness.parser(__doc__, DEFAULTS, Path(__file__).parent / "results" / "families").parse_args(argv)
    settings = DEFAULTS.settings(args)
    records = []
    for case in CASES:
        calls, expected, outputs = competitors(case)
        for form, out in outputs.items():
            error = relative_error((np.asarray(out),), (expected,))
            if not error <= TOLERANCE:
                raise AssertionError(f"{case.name} {form}: {error:.3g} relative error against PyTorch")
        for mode in ("fwd", "grad"):
            mode_calls = {name: competitor[mode] for name, competitor in calls.items()}
            stats = warmed_medians(mode_calls, settings.rounds, settings.min_sample_s, max_inner=20)
            torch_s = stats["torch grouped"].median_s
            record = {
                "case": case.name,
                "mode": mode,
                "competitors": {name: s.as_json() for name, s in stats.items()},
                "ratios_over_torch": {name: s.median_s / torch_s for name, s in stats.items()},
            }
            records.append(record)
            log(f"{case.name} {mode}: " + ", ".join(f"{n} {s.median_s * 1e3:.1f} ms" for n, s in stats.items()))
    payload = {
        "benchmark": "per_sample_conv_transpose",
        "metadata": environment_metadata(),
        "rounds": settings.rounds,
        "results": records,
    }
    names = list(records[0]["competitors"])
    rows = [
        [
            f"{r['case']} {r['mode']}",
            *(f"{r['competitors'][n]['median_ms']:.1f} ({r['ratios_over_torch'][n]:.2f}x)" for n in names),
        ]
        for r in records
    ]
    meta = payload["metadata"]
    header = (
        f"# Per-sample transposed convolution (CPU)\n\nMachine: {meta['cpu']}; jax {meta['jax']}, torch "
        f"{meta.get('torch')}; {meta['date']}. Made by `python benchmarks/per_sample_conv_transpose.py`; "
        f"{settings.rounds} interleaved rounds; medians in ms (time / torch grouped).\n\n"
    )
    markdown = header + markdown_table(["case / pass", *names], rows) + "\n"
    report.write_reports(args.out / "per_sample_conv_transpose_cpu", payload, markdown)


if __name__ == "__main__":
    main()
