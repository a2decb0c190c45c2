"""StyleGAN2's modulated convolution: jdynconv.modulated_conv against a PyTorch reference of both its formulations.

Shapes (StyleGAN2's synthesis layers, B = 16, 3x3 kernels, demodulated, padding 1, the [1, 3, 3, 1] filter):
``512 -> 512 at 16x16``, ``256 -> 256 at 32x32 -> 64x64`` (``up=2``) and ``128 -> 128 at 128x128``.
Competitors, same weights and inputs (PyTorch NCHW, JAX NHWC):

- ``jdynconv fused`` / ``jdynconv non-fused``: ``jdynconv.modulated_conv`` with ``fused`` True / False, and
  ``jdynconv auto`` (what ``fused="auto"`` picks: :func:`jdynconv._modulated.use_fused`);
- ``reference fused`` / ``reference non-fused``: ``modulated_conv2d`` of ``parity/stylegan2_reference.py`` (our
  clean-room PyTorch reference: a grouped conv over per-sample kernels, or the styles scaling the activations
  around one shared conv; a transposed conv then the FIR filter for ``up``) with ``fused_modconv`` True / False.
  StyleGAN2-ADA's synthesis network runs fused for inference and non-fused for training; the ratios compare
  ``jdynconv auto`` with that choice (``fwd``: fused, ``train``: non-fused).

Passes: ``fwd`` (PyTorch under ``inference_mode``) and ``train``: styles from an affine of latents
(``FullyConnectedLayer``, 512-d), loss = mean of the squared output, gradients w.r.t. weight and affine, an
SGD update (JAX: one jitted step, optax.sgd; PyTorch: backward, step, zero_grad). Outputs are checked
against the reference's within 1e-4 relative before timing. Timing as the other benchmarks: warm-up excluded,
interleaved shuffled rounds, medians (``_timing``).

    PYTHONPATH=. python benchmarks/modulated_conv.py               # -> benchmarks/results/families/
    PYTHONPATH=. python benchmarks/modulated_conv.py --quick --out /tmp/bench_mod
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import _harness as harness
import _report as report
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from _harness import Settings, log, relative_error
from _report import environment_metadata, markdown_table, plot_ratio_bars
from _timing import interleaved_medians, warmed_medians

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jdynconv as jdc
from jdynconv import _modulated
from parity import stylegan2_reference

LATENT_DIM = 512
TOLERANCE = 1e-4
# Samples of at least 50 ms and at most 20 calls, quick or not: these calls are long.
DEFAULTS = harness.Defaults(rounds=7, min_sample_s=0.05, quick_min_sample_s=0.05)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    channels: int
    size: int
    up: int = 1


CASES = (
    Case("512ch_16x16", 16, 512, 16),
    Case("256ch_32to64_up2", 16, 256, 32, up=2),
    Case("128ch_128x128", 16, 128, 128),
)
QUICK_CASES = (Case("64ch_16x16", 4, 64, 16), Case("64ch_8to16_up2", 4, 64, 8, up=2))


def _arrays(case: Case) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    c = case.channels
    return {
        "x": rng.normal(size=(case.batch, c, case.size, case.size)).astype(np.float32),
        "weight": rng.normal(size=(c, c, 3, 3)).astype(np.float32),
        "latents": rng.normal(size=(case.batch, LATENT_DIM)).astype(np.float32),
        "affine_weight": rng.normal(size=(c, LATENT_DIM)).astype(np.float32),
        "affine_bias": np.ones(c, np.float32),
    }


def _torch_competitors(case: Case, arrays: dict[str, np.ndarray], fused: bool) -> tuple[dict, torch.Tensor]:
    x = torch.tensor(arrays["x"])
    latents = torch.tensor(arrays["latents"])
    params = [torch.tensor(arrays[k], requires_grad=True) for k in ("weight", "affine_weight", "affine_bias")]
    resample_filter = stylegan2_reference.setup_filter([1, 3, 3, 1])
    optimizer = torch.optim.SGD(params, lr=1e-3)

    def forward() -> torch.Tensor:
        weight, affine_weight, affine_bias = params
        styles = torch.addmm(affine_bias.unsqueeze(0), latents, (affine_weight / np.sqrt(LATENT_DIM)).t())
        return stylegan2_reference.modulated_conv2d(
            x,
            weight,
            styles,
            up=case.up,
            padding=1,
            resample_filter=resample_filter,
            flip_weight=case.up == 1,
            fused_modconv=fused,
        )

    def fwd() -> None:
        with torch.inference_mode():
            forward()

    def train() -> None:
        loss = forward().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    with torch.no_grad():
        reference = forward()
    return {"fwd": fwd, "train": train}, reference


def _jax_competitors(case: Case, arrays: dict[str, np.ndarray], fused: bool | str) -> tuple[dict, jax.Array]:
    x = jnp.asarray(np.moveaxis(arrays["x"], 1, -1))
    latents = jnp.asarray(arrays["latents"])
    params = {
        "kernel": jnp.asarray(np.transpose(arrays["weight"], (2, 3, 1, 0))),
        "affine_kernel": jnp.asarray(arrays["affine_weight"].T),
        "affine_bias": jnp.asarray(arrays["affine_bias"]),
    }

    def forward(params, x, latents):
        styles = _modulated.affine_styles(latents, params["affine_kernel"], params["affine_bias"], 1.0)
        return jdc.modulated_conv(
            x, params["kernel"], styles, up=case.up, padding=1, flip_weight=case.up == 1, fused=fused
        )

    optimizer = optax.sgd(1e-3)
    state = {"params": params, "opt": optimizer.init(params)}
    forward_jit = jax.jit(forward)

    @jax.jit
    def step(params, opt_state, x, latents):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(jnp.square(forward(p, x, latents))))(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    def fwd() -> None:
        jax.block_until_ready(forward_jit(state["params"], x, latents))

    def train() -> None:
        state["params"], state["opt"], loss = step(state["params"], state["opt"], x, latents)
        jax.block_until_ready(loss)

    return {"fwd": fwd, "train": train}, forward_jit(params, x, latents)


def run(cases: tuple[Case, ...], settings: Settings, out_dir: Path) -> None:
    records = []
    for case in cases:
        arrays = _arrays(case)
        calls: dict[str, dict] = {}
        torch_fused, reference = _torch_competitors(case, arrays, True)
        calls["reference fused"] = torch_fused
        calls["reference non-fused"] = _torch_competitors(case, arrays, False)[0]
        expected = np.moveaxis(reference.numpy(), 1, -1)
        for name, fused in (("jdynconv auto", "auto"), ("jdynconv fused", True), ("jdynconv non-fused", False)):
            competitor, out = _jax_competitors(case, arrays, fused)
            error = relative_error((np.asarray(out),), (expected,))
            if not error <= TOLERANCE:
                raise AssertionError(f"{case.name} {name}: {error:.3g} relative error against the reference")
            calls[name] = competitor
        for mode in ("fwd", "train"):
            mode_calls = {name: competitor[mode] for name, competitor in calls.items()}
            stats = warmed_medians(mode_calls, settings.rounds, settings.min_sample_s, max_inner=20)
            reference_choice = "reference fused" if mode == "fwd" else "reference non-fused"
            record = {
                "case": case.name,
                "mode": mode,
                "auto_fused": _modulated.use_fused(case.up, 1, (case.size * case.up) ** 2),
                "reference_choice": reference_choice,
                "competitors": {name: s.as_json() for name, s in stats.items()},
                "ratio_auto_over_reference": stats["jdynconv auto"].median_s / stats[reference_choice].median_s,
            }
            records.append(record)
            log(
                f"{case.name} {mode}: "
                + ", ".join(f"{name} {s.median_s * 1e3:.1f} ms" for name, s in stats.items())
                + f"; auto / {reference_choice} {record['ratio_auto_over_reference']:.2f}"
            )
    payload = {
        "benchmark": "modulated_conv",
        "metadata": environment_metadata(),
        "rounds": settings.rounds,
        "results": records,
    }
    write_reports(payload, out_dir)


def write_reports(payload: dict, out_dir: Path) -> None:
    """``modulated_conv_cpu.{json,md,png}``: medians, and every jdynconv competitor over the reference's choice."""
    records = payload["results"]
    names = list(records[0]["competitors"])
    rows = [
        [
            f"{r['case']} {r['mode']}",
            *(f"{r['competitors'][n]['median_ms']:.1f}" for n in names),
            f"{r['ratio_auto_over_reference']:.2f}x",
        ]
        for r in records
    ]
    meta = payload["metadata"]
    header = (
        f"# Modulated convolution (CPU)\n\nMachine: {meta.get('cpu', '?')}; jax {meta.get('jax', '?')}, "
        f"torch {meta.get('torch', '?')}; {meta.get('date', '?')}. Made by `python benchmarks/modulated_conv.py`; "
        f"{payload['rounds']} interleaved rounds, medians in ms; ratio: jdynconv auto over the PyTorch reference in "
        "StyleGAN2-ADA's choice for the pass (fwd: fused, train: non-fused). ![ratios](modulated_conv_cpu.png)\n\n"
    )
    table = markdown_table(["case / pass", *names], [row[:-1] for row in rows])
    ratio_table = markdown_table(["case / pass", "auto / reference"], [[row[0], row[-1]] for row in rows])
    cases = list(dict.fromkeys(r["case"] for r in records))
    panels = {
        mode: {
            name: [
                next(
                    r["competitors"][name]["median_ms"] / r["competitors"][r["reference_choice"]]["median_ms"]
                    for r in records
                    if r["case"] == case and r["mode"] == mode
                )
                for case in cases
            ]
            for name in names
            if name.startswith("jdynconv")
        }
        for mode in ("fwd", "train")
    }
    report.write_reports(
        out_dir / "modulated_conv_cpu",
        payload,
        header + table + "\n\n" + ratio_table + "\n",
        lambda png: plot_ratio_bars(
            png,
            groups=cases,
            panels=panels,
            title=f"Modulated convolution: jdynconv over the PyTorch reference ({meta.get('cpu', '?')})",
            ylabel="time / the reference in StyleGAN2-ADA's choice (log scale)",
            highlight="jdynconv auto",
        ),
    )


RULE_GRID = tuple(Case(f"{c}ch_{s}x{s}", 16, c, s) for c in (64, 256, 512) for s in (8, 16, 32))


def run_rule_grid(rounds: int, out_dir: Path) -> None:
    """The training step of both paths without resampling over map sizes and channel counts: the evidence
    for ``use_fused``'s ``FUSED_MIN_POSITIONS``. Writes ``modulated_conv_rule_cpu.{json,md}``."""
    rows, records = [], []
    for case in RULE_GRID:
        arrays = _arrays(case)
        calls = {}
        for name, fused in (("fused", True), ("non-fused", False)):
            calls[name] = _jax_competitors(case, arrays, fused)[0]["train"]
            calls[name]()
        stats = interleaved_medians(calls, {name: 1 for name in calls}, rounds)
        fused_ms, shared_ms = (stats[name].median_s * 1e3 for name in ("fused", "non-fused"))
        auto = "fused" if _modulated.use_fused(1, 1, case.size**2) else "non-fused"
        records.append({"case": case.name, "fused_ms": fused_ms, "non_fused_ms": shared_ms, "auto": auto})
        rows.append([case.name, f"{fused_ms:.1f}", f"{shared_ms:.1f}", f"{shared_ms / fused_ms:.2f}", auto])
        log(str(rows[-1]))
    meta = environment_metadata()
    header = (
        f"# Modulated convolution: fused or not (CPU)\n\nMachine: {meta['cpu']}; jax {meta['jax']}; {meta['date']}. "
        f"Made by `python benchmarks/modulated_conv.py --rule-grid`; B 16, 3x3, no resampling, training step, "
        f"{rounds} interleaved rounds, medians in ms.\n\n"
    )
    table = markdown_table(["case", "fused", "non-fused", "non-fused / fused", "auto picks"], rows)
    payload = {"benchmark": "modulated_conv_rule", "metadata": meta, "rounds": rounds, "results": records}
    report.write_reports(out_dir / "modulated_conv_rule_cpu", payload, header + table + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = harness.parser(
        __doc__, DEFAULTS, Path(__file__).parent / "results" / "families", quick_help="small shapes, 3 rounds"
    )
    parser.add_argument("--rule-grid", action="store_true", help="only the fused/non-fused grid behind the rule")
    args = parser.parse_args(argv)
    settings = DEFAULTS.settings(args)
    if args.rule_grid:
        run_rule_grid(settings.rounds, args.out)
    else:
        run(QUICK_CASES if args.quick else CASES, settings, args.out)


if __name__ == "__main__":
    main()
