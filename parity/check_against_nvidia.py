"""Compare ``parity/stylegan2_reference.py`` with NVIDIA's own stylegan2-ada-pytorch, on a checkout you supply.

jdynconv's parity tests hold jdynconv to ``stylegan2_reference.py``, our clean-room PyTorch reference; this script
closes the loop by holding that reference to NVIDIA's code. NVIDIA's code is under NVIDIA's non-commercial Source
Code License, so it is not part of this repository and this script is not part of the test suite (no ``test_``
prefix; CI does not run it): it imports NVIDIA's ``torch_utils`` and ``training`` modules from a checkout you
make yourself, runs them and ours on the same inputs and weights, prints the largest absolute difference of every
comparison, and exits with status 1 if any exceeds the tolerance (0 if all agree).

How to run it (CPU only; NVIDIA's ops take their reference implementations for CPU tensors, so no CUDA plugin is
built)::

    git clone https://github.com/NVlabs/stylegan2-ada-pytorch /tmp/stylegan2-ada-pytorch
    .venv/bin/python parity/check_against_nvidia.py --nvidia-repo /tmp/stylegan2-ada-pytorch

What is compared, in float64 (``resample_filter`` stays float32, the dtype NVIDIA's ``upfirdn2d`` takes):

* ``modulated_conv2d``: every case of ``test_modulated_conv.py`` plus up/down with both kernel orientations and
  asymmetric padding, each with ``fused_modconv`` True and False and with noise; the output and the gradients of
  ``sum(y * g)`` w.r.t. ``x``, ``weight`` and ``styles``.
* ``SynthesisLayer``: up 1 and 2, 3x3 and 1x1, with and without noise, clamp, other filters (3, 4 and 8 taps);
  NVIDIA's module is built first, its state dict loaded into ours strictly (names, order and shapes must match),
  then both run with ``noise_mode`` ``"const"``, ``"none"`` and ``"random"`` (the same seed before each call),
  ``fused_modconv`` True and False and ``gain`` 1 and 0.6: the output, and in ``"const"`` mode the gradients
  w.r.t. ``x``, ``w`` and every parameter. The attributes other code reads are compared too.
* ``ToRGBLayer`` (1x1 with and without clamp, 3x3) and ``FullyConnectedLayer`` (learning-rate multiplier,
  leaky ReLU) likewise.

Tolerance: ``1e-12`` of the largest magnitude of NVIDIA's value (``1e-7`` for the float32 filter buffers): float64
sums of a few hundred terms in a different order differ by a few hundred ulps (2.2e-16) at most; a wrong
convention (a flipped kernel, a misaligned filter, a gain) is O(1).

Result, recorded by hand (2026-12-07; NVIDIA's stylegan2-ada-pytorch at commit
d72cc7d041b42ec8e806021a205ed9349f87c6a4, checked out outside this repository; torch 2.13.0+cpu, Python 3.11):
all 716 comparisons agree, including the state-dict names and order and the ``resample_filter`` buffers (equal
exactly); the largest absolute difference is 1.8e-14, float64 rounding.
"""

from __future__ import annotations

import argparse
import importlib
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parity import stylegan2_reference as ours

TOL = 1e-12
FILTER_TOL = 1e-7


class Report:
    """Collects ``(name, max abs difference, allowed)`` and prints each as it comes."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float]] = []

    def compare(self, name: str, got: Any, want: Any, tol: float = TOL) -> None:
        got_np = _numpy(got)
        want_np = _numpy(want)
        if got_np.shape != want_np.shape:
            print(f"MISMATCH {name}: shape {got_np.shape} (ours) vs {want_np.shape} (NVIDIA's)")
            self.rows.append((name, math.inf, 0.0))
            return
        diff = float(np.max(np.abs(got_np - want_np), initial=0.0))
        allowed = tol * max(1.0, float(np.max(np.abs(want_np), initial=0.0)))
        status = "ok" if diff <= allowed else "MISMATCH"
        print(f"{status:8s} {name}: max abs diff {diff:.3g} (allowed {allowed:.3g})")
        self.rows.append((name, diff, allowed))

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        print(f"{'ok' if ok else 'MISMATCH':8s} {name}{': ' + detail if detail else ''}")
        self.rows.append((name, 0.0 if ok else math.inf, 0.0))

    @property
    def failures(self) -> list[str]:
        return [name for name, diff, allowed in self.rows if diff > allowed]


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().double().numpy()
    return np.asarray(value, np.float64)


def load_nvidia(repo: Path) -> tuple[ModuleType, ModuleType]:
    """NVIDIA's ``training.networks`` and ``torch_utils.ops.upfirdn2d``, imported from ``repo``."""
    if not (repo / "training" / "networks.py").is_file() or not (repo / "torch_utils").is_dir():
        raise SystemExit(f"--nvidia-repo {repo}: no training/networks.py and torch_utils/ there.")
    sys.path.insert(0, str(repo))
    networks = importlib.import_module("training.networks")
    upfirdn2d = importlib.import_module("torch_utils.ops.upfirdn2d")
    return networks, upfirdn2d


def _double_(module: torch.nn.Module) -> torch.nn.Module:
    """Parameters and buffers to float64, except ``resample_filter`` (NVIDIA's ``upfirdn2d`` takes float32)."""
    for param in module.parameters():
        param.data = param.data.double()
    for name, buffer in module.named_buffers():
        if not name.endswith("resample_filter"):
            owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            setattr(owner, name.rpartition(".")[2], buffer.double())
    return module


def _perturb_(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its initial constant (zeros, ones), so a wrong name or gain shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def _grads(out: torch.Tensor, inputs: Sequence[torch.Tensor], cotangent: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, cotangent)


MODULATED_CASES = [
    # kernel size, up, down, padding, demodulate, flip_weight: test_modulated_conv.py's cases, then more
    (3, 1, 1, 1, True, True),
    (3, 2, 1, 1, True, False),
    (3, 1, 2, 1, True, True),
    (1, 1, 1, 0, False, True),
    (1, 2, 1, 0, True, False),
    (1, 1, 2, 0, True, True),
    (3, 2, 1, 0, False, True),
    (3, 1, 1, 1, False, False),
    (3, 2, 1, 1, True, True),
    (3, 1, 2, 1, False, False),
    (2, 2, 1, (1, 0, 2, 1), True, False),
    (3, 1, 2, (2, 0, 1, 1), True, True),
    (3, 1, 1, (0, 2, 1, -1), True, True),
]


def check_modulated_conv2d(report: Report, networks: ModuleType, upfirdn2d: ModuleType) -> None:
    for index, (k, up, down, padding, demodulate, flip_weight) in enumerate(MODULATED_CASES):
        rng = np.random.default_rng(index)
        batch, in_channels, out_channels, size = 3, 5, 4, 8
        x = rng.normal(size=(batch, in_channels, size, size))
        weight = rng.normal(size=(out_channels, in_channels, k, k))
        styles = 1 + 0.5 * rng.normal(size=(batch, in_channels))
        for taps in ([1, 3, 3, 1], [1, 2, 1]):
            nvidia_filter = upfirdn2d.setup_filter(taps)
            our_filter = ours.setup_filter(taps)
            report.compare(f"setup_filter({taps})", our_filter, nvidia_filter, FILTER_TOL)
            results = {}
            competitors = {
                "nvidia": (networks.modulated_conv2d, nvidia_filter),
                "ours": (ours.modulated_conv2d, our_filter),
            }
            for who, (fn, f) in competitors.items():
                for fused in (True, False):
                    tensors = [torch.tensor(a, requires_grad=True) for a in (x, weight, styles)]
                    settings = {
                        "up": up,
                        "down": down,
                        "padding": padding,
                        "resample_filter": f,
                        "demodulate": demodulate,
                        "flip_weight": flip_weight,
                        "fused_modconv": fused,
                    }
                    out = fn(x=tensors[0], weight=tensors[1], styles=tensors[2], **settings)
                    noise = torch.tensor(np.random.default_rng(100 + index).normal(size=(batch, 1, *out.shape[2:])))
                    with_noise = fn(x=tensors[0], weight=tensors[1], styles=tensors[2], noise=noise, **settings)
                    cotangent = torch.tensor(np.random.default_rng(200 + index).normal(size=tuple(out.shape)))
                    results[who, fused] = (out, with_noise, _grads(out, tensors, cotangent))
            for fused in (True, False):
                name = f"modulated_conv2d k{k} up{up} down{down} pad{padding} demod{int(demodulate)} "
                name += f"flipw{int(flip_weight)} f{len(taps)} fused{int(fused)}"
                (want, want_noise, want_grads), (got, got_noise, got_grads) = (
                    results["nvidia", fused],
                    results["ours", fused],
                )
                report.compare(f"{name}: output", got, want)
                report.compare(f"{name}: output with noise", got_noise, want_noise)
                for label, g, w in zip(("x", "weight", "styles"), got_grads, want_grads, strict=True):
                    report.compare(f"{name}: d_{label}", g, w)


def _load_into_ours(report: Report, name: str, theirs: torch.nn.Module, mine: torch.nn.Module) -> None:
    state = theirs.state_dict()
    names, our_names = list(state), list(mine.state_dict())
    report.check(f"{name}: state dict names in order", names == our_names, f"NVIDIA's {names}, ours {our_names}")
    for key, value in state.items():
        if key.endswith("resample_filter"):
            report.compare(f"{name}: buffer {key}", mine.state_dict()[key], value, FILTER_TOL)
    mine.load_state_dict(state, strict=True)


def _attributes(
    report: Report, name: str, theirs: torch.nn.Module, mine: torch.nn.Module, names: Sequence[str]
) -> None:
    for attribute in names:
        want, got = theirs, mine
        for part in attribute.split("."):
            want, got = getattr(want, part), getattr(got, part)
        equal = (
            math.isclose(float(got), float(want), rel_tol=1e-15)
            if isinstance(want, int | float) and not isinstance(want, bool)
            else got == want
        )
        report.check(f"{name}: attribute {attribute}", equal, f"ours {got!r}, NVIDIA's {want!r}")


SYNTHESIS_CASES: list[dict[str, Any]] = [
    {"kernel_size": 3, "up": 1},
    {"kernel_size": 3, "up": 2, "conv_clamp": 0.8},
    {"kernel_size": 1, "up": 1, "conv_clamp": 2.0},
    {"kernel_size": 3, "up": 2, "use_noise": False},
    {"kernel_size": 3, "up": 2, "resample_filter": [1, 2, 1]},
    {"kernel_size": 3, "up": 2, "resample_filter": [1, 2, 2, 1], "activation": "linear"},
    {"kernel_size": 3, "up": 2, "resample_filter": [1, 2, 3, 4, 4, 3, 2, 1]},
]
SYNTHESIS_ATTRIBUTES = (
    "resolution", "up", "use_noise", "activation", "conv_clamp", "padding", "act_gain",
    "affine.weight_gain", "affine.bias_gain", "affine.activation",
)  # fmt: skip


def check_synthesis_layer(report: Report, networks: ModuleType) -> None:
    in_channels, out_channels, w_dim, resolution, batch = 4, 5, 6, 8, 2
    for index, case in enumerate(SYNTHESIS_CASES):
        name = "SynthesisLayer " + " ".join(f"{key}={value}" for key, value in case.items())
        torch.manual_seed(index)
        theirs = networks.SynthesisLayer(in_channels, out_channels, w_dim, resolution, **case)
        mine = ours.SynthesisLayer(in_channels, out_channels, w_dim, resolution, **case)
        _perturb_(theirs, index)
        _load_into_ours(report, name, theirs, mine)
        _attributes(report, name, theirs, mine, SYNTHESIS_ATTRIBUTES)
        _double_(theirs)
        _double_(mine)
        rng = np.random.default_rng(index)
        size = resolution // case["up"]
        x = rng.normal(size=(batch, in_channels, size, size))
        w = rng.normal(size=(batch, w_dim))
        cotangent = torch.tensor(rng.normal(size=(batch, out_channels, resolution, resolution)))
        for noise_mode in ("const", "none", "random"):
            for fused in (True, False):
                for gain in (1, 0.6):
                    outs = {}
                    for who, module in (("nvidia", theirs), ("ours", mine)):
                        module.zero_grad()
                        tensors = [torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)]
                        torch.manual_seed(1000 + index)
                        out = module(*tensors, noise_mode=noise_mode, fused_modconv=fused, gain=gain)
                        grads = {}
                        if noise_mode == "const":
                            out.backward(cotangent)
                            grads = {"x": tensors[0].grad, "w": tensors[1].grad}
                            grads.update({key: value.grad for key, value in module.named_parameters()})
                        outs[who] = (out, grads)
                    label = f"{name}: noise_mode={noise_mode} fused={fused} gain={gain}"
                    report.compare(f"{label}: output", outs["ours"][0], outs["nvidia"][0])
                    for key, want in outs["nvidia"][1].items():
                        report.compare(f"{label}: d_{key}", outs["ours"][1][key], want)


def check_to_rgb_layer(report: Report, networks: ModuleType) -> None:
    in_channels, out_channels, w_dim, batch = 4, 3, 6, 2
    for index, case in enumerate([{"kernel_size": 1}, {"kernel_size": 1, "conv_clamp": 0.5}, {"kernel_size": 3}]):
        name = "ToRGBLayer " + " ".join(f"{key}={value}" for key, value in case.items())
        torch.manual_seed(index)
        theirs = networks.ToRGBLayer(in_channels, out_channels, w_dim, **case)
        mine = ours.ToRGBLayer(in_channels, out_channels, w_dim, **case)
        _perturb_(theirs, 50 + index)
        _load_into_ours(report, name, theirs, mine)
        _attributes(report, name, theirs, mine, ("conv_clamp", "weight_gain", "affine.weight_gain"))
        _double_(theirs)
        _double_(mine)
        rng = np.random.default_rng(50 + index)
        x, w = rng.normal(size=(batch, in_channels, 8, 8)), rng.normal(size=(batch, w_dim))
        for fused in (True, False):
            outs = {}
            for who, module in (("nvidia", theirs), ("ours", mine)):
                module.zero_grad()
                tensors = [torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)]
                out = module(*tensors, fused_modconv=fused)
                out.backward(torch.tensor(np.random.default_rng(index).normal(size=tuple(out.shape))))
                grads = {"x": tensors[0].grad, "w": tensors[1].grad}
                grads.update({key: value.grad for key, value in module.named_parameters()})
                outs[who] = (out, grads)
            report.compare(f"{name} fused={fused}: output", outs["ours"][0], outs["nvidia"][0])
            for key, want in outs["nvidia"][1].items():
                report.compare(f"{name} fused={fused}: d_{key}", outs["ours"][1][key], want)


def check_fully_connected_layer(report: Report, networks: ModuleType) -> None:
    for index, case in enumerate([{"bias_init": 1}, {"activation": "lrelu", "lr_multiplier": 0.01, "bias_init": 0.5}]):
        name = "FullyConnectedLayer " + " ".join(f"{key}={value}" for key, value in case.items())
        torch.manual_seed(index)
        theirs = networks.FullyConnectedLayer(7, 5, **case)
        mine = ours.FullyConnectedLayer(7, 5, **case)
        _perturb_(theirs, 70 + index)
        _load_into_ours(report, name, theirs, mine)
        _attributes(report, name, theirs, mine, ("weight_gain", "bias_gain", "activation"))
        _double_(theirs)
        _double_(mine)
        x = np.random.default_rng(70 + index).normal(size=(3, 7))
        outs = {}
        for who, module in (("nvidia", theirs), ("ours", mine)):
            tensor = torch.tensor(x, requires_grad=True)
            out = module(tensor)
            outs[who] = (out, _grads(out, [tensor, *module.parameters()], torch.ones_like(out)))
        report.compare(f"{name}: output", outs["ours"][0], outs["nvidia"][0])
        for label, got, want in zip(("x", "weight", "bias"), outs["ours"][1], outs["nvidia"][1], strict=True):
            report.compare(f"{name}: d_{label}", got, want)


def _commit(repo: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nvidia-repo", type=Path, required=True, help="a checkout of NVlabs/stylegan2-ada-pytorch")
    args = parser.parse_args(argv)
    repo = args.nvidia_repo.resolve()
    networks, upfirdn2d = load_nvidia(repo)
    print(f"NVIDIA's stylegan2-ada-pytorch at {repo}, commit {_commit(repo)}; torch {torch.__version__}, CPU")
    report = Report()
    print("--- modulated_conv2d")
    check_modulated_conv2d(report, networks, upfirdn2d)
    print("--- SynthesisLayer")
    check_synthesis_layer(report, networks)
    print("--- ToRGBLayer")
    check_to_rgb_layer(report, networks)
    print("--- FullyConnectedLayer")
    check_fully_connected_layer(report, networks)
    largest = max((diff for _, diff, _ in report.rows), default=0.0)
    failures = report.failures
    print(f"\n{len(report.rows)} comparisons, largest absolute difference {largest:.3g}.")
    if failures:
        print(f"{len(failures)} MISMATCHES:\n  " + "\n  ".join(failures))
        return 1
    print("All agree.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
