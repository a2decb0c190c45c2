"""Compare the modules of ``parity/deform_conv_modules.py`` with torchvision itself, in float64.

* ``parity.deform_conv_modules.DeformConv2d`` against ``torchvision.ops.DeformConv2d`` with the same state dict:
  the output and the gradients w.r.t. the input, the offsets, the mask (when one is passed), ``weight`` and
  ``bias``.
* mmcv's ``DeformConv2dPack`` and ``ModulatedDeformConv2dPack`` (as written in that file) against their arithmetic
  computed with torchvision: ``offset = F.conv2d(x, conv_offset.weight, conv_offset.bias, stride, padding,
  dilation)``, for the modulated one the offsets its first ``2 * G_off * K`` channels and the mask the sigmoid of
  the last ``G_off * K``, then ``torchvision.ops.deform_conv2d(x, offset, weight, bias, stride, padding, dilation,
  mask)``: the output and the gradients w.r.t. the input and every parameter (``weight``, ``bias``,
  ``conv_offset.weight``, ``conv_offset.bias``). ``conv_offset`` is drawn non-zero (mmcv initialises it to zero),
  so the sampling is not the regular grid.

Not part of the test suite (no ``test_`` prefix): torchvision's compiled ops do not load with the CPU torch wheel of
the development environment. Run it, from the repository root, with the environment that
``../shared/tools/torchvision-venv`` makes (torch 2.13.0's CUDA build and torchvision 0.28.0, on CPU)::

    "$(../shared/tools/torchvision-venv)" parity/check_modules_against_torchvision.py

It prints the number of comparisons and the largest absolute difference per quantity and exits with status 1 if any
difference exceeds ``TOL * max(1, max |torchvision's value|)``. The recorded output is in
``parity/results/deform_conv_modules_check.txt``.

Cases: the full grid of groups 1/2, offset groups 1/2, stride 1/2 (and ``(1, 2)``), padding 0 / ``k // 2``,
dilation 1/2, kernels 3x3 and 2x3, bias on/off, and for ``DeformConv2d`` mask on/off; batch 1 to 3, 4 or 8 input
channels, maps 5x5 to 8x8. Offsets are drawn ``N(0, 1.5)``, so many points fall between pixels and some outside the
image. Tolerance ``1e-12``, as ``parity/check_against_torchvision.py``: float64 sums in a different order.
"""

from __future__ import annotations

import datetime
import itertools
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOL = 1e-12
KERNELS = ((3, 3), (2, 3))
STRIDES = ((1, 1), (2, 2), (1, 2))


def _geometries(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for groups, offset_groups, stride, dilation, kernel, pad, bias in itertools.product(
        (1, 2), (1, 2), STRIDES, (1, 2), KERNELS, (False, True), (False, True)
    ):
        padding = tuple(k // 2 for k in kernel) if pad else (0, 0)
        yield {
            "groups": groups,
            "offset_groups": offset_groups,
            "stride": stride,
            "padding": padding,
            "dilation": (dilation, dilation),
            "kernel": kernel,
            "bias": bias,
            "batch": int(rng.integers(1, 4)),
            "in_channels": int(rng.choice((4, 8))),
            "out_channels": 2 * int(rng.integers(1, 4)),
            "size": (int(rng.integers(5, 9)), int(rng.integers(5, 9))),
        }


def _name(g: dict[str, Any], extra: str = "") -> str:
    return (
        f"g{g['groups']} og{g['offset_groups']} s{g['stride']} d{g['dilation']} p{g['padding']} k{g['kernel']} "
        f"{'bias' if g['bias'] else 'nobias'}{extra} B{g['batch']} C{g['in_channels']} F{g['out_channels']} "
        f"{g['size'][0]}x{g['size'][1]}"
    )


def _out_size(g: dict[str, Any]) -> tuple[int, int]:
    return tuple(
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, p, d, k, s in zip(g["size"], g["padding"], g["dilation"], g["kernel"], g["stride"], strict=True)
    )


def _grads(torch: Any, out: Any, cotangent: Any, named: dict[str, Any]) -> dict[str, np.ndarray]:
    """The output and the gradients of ``sum(out * cotangent)`` w.r.t. ``named`` tensors."""
    grads = torch.autograd.grad(out, list(named.values()), cotangent)
    results = {"output": out.detach().numpy()}
    results.update({f"grad_{name}": grad.numpy() for name, grad in zip(named, grads, strict=True)})
    return results


def deform_conv2d_cases(torch: Any, torchvision: Any, rng: np.random.Generator) -> Iterator[tuple[str, dict, dict]]:
    """``(name, ours, torchvision's)`` for the torchvision ``DeformConv2d`` module."""
    from parity import deform_conv_modules as modules

    for g, use_mask in itertools.product(_geometries(rng), (False, True)):
        kh, kw = g["kernel"]
        args = (g["in_channels"], g["out_channels"], g["kernel"])
        settings = {
            "stride": g["stride"],
            "padding": g["padding"],
            "dilation": g["dilation"],
            "groups": g["groups"],
            "bias": g["bias"],
        }
        ours = modules.DeformConv2d(*args, **settings).double()
        theirs = torchvision.ops.DeformConv2d(*args, **settings).double()
        state = {k: torch.from_numpy(rng.normal(size=tuple(v.shape))) for k, v in theirs.state_dict().items()}
        ours.load_state_dict(state, strict=True)
        theirs.load_state_dict(state, strict=True)
        out_h, out_w = _out_size(g)
        x = rng.normal(size=(g["batch"], g["in_channels"], *g["size"]))
        offset = rng.normal(0.0, 1.5, size=(g["batch"], 2 * g["offset_groups"] * kh * kw, out_h, out_w))
        mask = rng.uniform(size=(g["batch"], g["offset_groups"] * kh * kw, out_h, out_w)) if use_mask else None
        cotangent = torch.from_numpy(rng.normal(size=(g["batch"], g["out_channels"], out_h, out_w)))
        results = []
        for module in (ours, theirs):
            inputs = {"input": x, "offset": offset} | ({"mask": mask} if use_mask else {})
            tensors = {name: torch.tensor(value, requires_grad=True) for name, value in inputs.items()}
            out = module(*tensors.values())
            results.append(_grads(torch, out, cotangent, tensors | dict(module.named_parameters())))
        yield "DeformConv2d " + _name(g, " mask" if use_mask else " nomask"), results[0], results[1]


def _pack_expected(torch: Any, torchvision: Any, module: Any, x: Any, modulated: bool) -> Any:
    """mmcv's Pack arithmetic with torchvision: ``conv_offset``, the channels split by position, the kernel."""
    import torch.nn.functional as F

    out = F.conv2d(
        x, module.conv_offset.weight, module.conv_offset.bias, module.stride, module.padding, module.dilation
    )
    if not modulated:
        return torchvision.ops.deform_conv2d(
            x, out, module.weight, None, module.stride, module.padding, module.dilation
        )
    n_offsets = 2 * module.deform_groups * module.kernel_size[0] * module.kernel_size[1]
    offset, mask = out[:, :n_offsets], torch.sigmoid(out[:, n_offsets:])
    return torchvision.ops.deform_conv2d(
        x, offset, module.weight, module.bias, module.stride, module.padding, module.dilation, mask
    )


def pack_cases(torch: Any, torchvision: Any, rng: np.random.Generator) -> Iterator[tuple[str, dict, dict]]:
    """``(name, ours, torchvision's arithmetic)`` for mmcv's ``DeformConv2dPack`` and ``ModulatedDeformConv2dPack``."""
    from parity import deform_conv_modules as modules

    for g, modulated in itertools.product(_geometries(rng), (False, True)):
        if not modulated and g["bias"]:
            continue  # mmcv's DeformConv2d asserts bias=False
        cls = modules.ModulatedDeformConv2dPack if modulated else modules.DeformConv2dPack
        module = cls(
            g["in_channels"],
            g["out_channels"],
            g["kernel"],
            stride=g["stride"],
            padding=g["padding"],
            dilation=g["dilation"],
            groups=g["groups"],
            deform_groups=g["offset_groups"],
            bias=g["bias"],
        ).double()
        with torch.no_grad():
            for name, value in module.named_parameters():
                scale = 0.5 if name.startswith("conv_offset") else 1.0  # offsets of about a pixel
                value.copy_(torch.from_numpy(scale * rng.normal(size=tuple(value.shape))))
        out_h, out_w = _out_size(g)
        x = rng.normal(size=(g["batch"], g["in_channels"], *g["size"]))
        cotangent = torch.from_numpy(rng.normal(size=(g["batch"], g["out_channels"], out_h, out_w)))
        results = []
        for ours in (True, False):
            tensor = torch.tensor(x, requires_grad=True)
            out = module(tensor) if ours else _pack_expected(torch, torchvision, module, tensor, modulated)
            results.append(_grads(torch, out, cotangent, {"input": tensor} | dict(module.named_parameters())))
        yield f"{cls.__name__} " + _name(g), results[0], results[1]


def main() -> int:
    import torch
    import torchvision

    from parity import deform_conv_modules as modules
    from parity import deform_conv_reference as ref

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    print("parity/deform_conv_modules.py vs torchvision, float64")
    print(f"date (UTC): {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}")
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__} (git {torchvision.version.git_version}), {platform.machine()}"
    )
    print(
        f"modules follow pytorch/vision {modules.TORCHVISION_FILE} (torchvision {modules.TORCHVISION_VERSION}, "
        f"git {modules.TORCHVISION_GIT_VERSION}) and open-mmlab/mmcv {', '.join(modules.MMCV_FILES)} at commit "
        f"{modules.MMCV_COMMIT}; their kernel is parity/deform_conv_reference.py (torchvision "
        f"{ref.TORCHVISION_FILE} at commit {ref.TORCHVISION_COMMIT})"
    )
    rerun = '"$(../shared/tools/torchvision-venv)" parity/check_modules_against_torchvision.py'
    print(f"rerun (from the repository root): {rerun}")
    print(f"tolerance: {TOL:g} * max(1, max |torchvision|)\n")

    failures: list[str] = []
    for label, cases in (
        ("DeformConv2d vs torchvision.ops.DeformConv2d", deform_conv2d_cases(torch, torchvision, rng)),
        ("mmcv Packs vs their arithmetic with torchvision.ops.deform_conv2d", pack_cases(torch, torchvision, rng)),
    ):
        worst: dict[str, tuple[float, str]] = {}
        counts: dict[str, int] = {}
        by_class: dict[str, int] = {}
        for name, got, expected in cases:
            by_class[name.split()[0]] = by_class.get(name.split()[0], 0) + 1
            if got.keys() != expected.keys():
                failures.append(f"{name}: quantities {sorted(got)} != {sorted(expected)}")
                continue
            for quantity, value in expected.items():
                if got[quantity].shape != value.shape:
                    failures.append(f"{name} {quantity}: shape {got[quantity].shape} != {value.shape}")
                    continue
                diff = float(np.abs(got[quantity] - value).max(initial=0.0))
                counts[quantity] = counts.get(quantity, 0) + 1
                if diff >= worst.get(quantity, (-1.0, ""))[0]:
                    worst[quantity] = (diff, name)
                if diff > TOL * max(1.0, float(np.abs(value).max(initial=0.0))):
                    failures.append(f"{name} {quantity}: max abs diff {diff:.3g}")
        cases_text = ", ".join(f"{n} {cls}" for cls, n in by_class.items())
        print(f"{label}: {cases_text} cases, {sum(counts.values())} comparisons (arrays)")
        for quantity, count in counts.items():
            diff, where = worst[quantity]
            print(f"  {quantity:27s} {count:4d} compared, max abs diff {diff:.2e}  ({where})")
        print()
    if failures:
        print(f"{len(failures)} comparisons DIFFER:")
        print("\n".join(failures[:50]))
        return 1
    print("all comparisons agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
