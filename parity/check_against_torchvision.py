"""Compare ``parity/deform_conv_reference.py`` (and ``tests/deform_reference.py``) with torchvision's own
``torchvision.ops.deform_conv2d``: the forward and every gradient, in float64, on many random cases.

The parity tests hold jdynconv to the float64 references; ``parity/test_deform_conv_reference.py`` holds the N-d
definition of ``tests/deform_reference.py`` to the line-by-line translation of torchvision's CPU kernel. This
script closes the loop by holding both to torchvision itself. It is not part of the test suite (no ``test_``
prefix): torchvision's compiled ops do not load with the CPU torch wheel of the development environment, so it
runs in a separate environment with torch's CUDA build and torchvision's wheel (both run on CPU here)::

    # from the repository root; the tool makes (once) a venv with torch 2.13.0 and torchvision 0.28.0
    "$(../shared/tools/torchvision-venv)" parity/check_against_torchvision.py

or with any Python that has torch, torchvision (with its compiled ops) and numpy. It prints the number of
comparisons and the largest absolute difference per quantity, and exits with status 1 if any difference exceeds
``TOL * max(1, max |torchvision's value|)`` (0 if all agree). The recorded output is in
``parity/results/deform_conv_torchvision_check.txt``.

Cases (:func:`all_cases`): the full grid of groups 1/2, offset groups 1/2/4, stride 1/2, dilation 1/2, padding 0
and ``k // 2``, kernels 1x1/3x3/2x3, mask on/off and four kinds of offsets -- ``normal`` (small, fractional),
``large`` (up to +-15: most points outside the image), ``integer`` (points exactly on pixel rows/columns in one
or both coordinates) and ``border`` (points exactly at -2, -1, 0, H - 1, H, H + 1 and likewise in x, or a random
in-image fraction) -- with batch 1 to 4 (several blocks of torchvision's ``n_parallel_imgs``), then cases with
different stride, dilation and padding per axis. Bias is present in half the cases.

Tolerance: ``1e-12``: float64 sums of at most a few hundred terms in a different order differ by a few hundred
ulps (2.2e-16); a wrong convention (offset order, group mapping, a one-sided derivative on the wrong side) is O(1).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parity import deform_conv_reference as ref
from tests import deform_reference as definition

TOL = 1e-12
OFFSET_KINDS = ("normal", "large", "integer", "border")
KERNELS = ((1, 1), (3, 3), (2, 3))
QUANTITIES = ("output", "grad_input", "grad_weight", "grad_offset", "grad_mask", "grad_bias")


@dataclasses.dataclass(frozen=True)
class DeformCase:
    """One call of ``deform_conv2d`` and the cotangent of its output, in torchvision's layout (float64)."""

    name: str
    x: np.ndarray
    offset: np.ndarray
    weight: np.ndarray
    bias: np.ndarray | None
    mask: np.ndarray | None
    grad_out: np.ndarray
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


def _offsets(
    rng: np.random.Generator,
    kind: str,
    shape: tuple[int, ...],
    spatial: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> np.ndarray:
    """Offsets ``(B, 2 * G_off * kh * kw, H_out, W_out)`` of one kind (see the module doc)."""
    if kind == "normal":
        return rng.normal(0.0, 1.5, shape)
    if kind == "large":
        return rng.uniform(-15.0, 15.0, shape)
    if kind == "integer":
        whole = rng.integers(-3, 4, shape).astype(np.float64)
        return np.where(rng.random(shape) < 0.6, whole, whole + rng.random(shape))
    if kind != "border":
        raise ValueError(kind)
    batch, channels, out_h, out_w = shape
    kh, kw = kernel
    taps = kh * kw
    groups = channels // (2 * taps)
    i, j = np.divmod(np.arange(taps), kw)
    oy, ox = np.arange(out_h), np.arange(out_w)
    base_y = (oy[None, :, None] * stride[0] - padding[0]) + i[:, None, None] * dilation[0]  # (taps, H_out, 1)
    base_x = (ox[None, None, :] * stride[1] - padding[1]) + j[:, None, None] * dilation[1]  # (taps, 1, W_out)
    base = np.stack(np.broadcast_arrays(base_y, base_x), axis=1)  # (taps, 2, H_out, W_out)
    full = (batch, groups, taps, 2, out_h, out_w)
    choices = np.array([[-2, -1, 0, s - 1, s, s + 1] for s in spatial])  # (2 coordinates, 6 border positions)
    coordinate = np.arange(2).reshape(1, 1, 1, 2, 1, 1)
    target = choices[coordinate, rng.integers(0, 6, full)].astype(np.float64)
    size = np.array(spatial).reshape(1, 1, 1, 2, 1, 1)
    inside = rng.uniform(-0.5, size - 0.5, full)
    target = np.where(rng.random(full) < 0.3, inside, target)
    return (target - base).reshape(shape)


def make_case(
    rng: np.random.Generator,
    *,
    groups: int,
    offset_groups: int,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    padding: tuple[int, int],
    kernel: tuple[int, int],
    use_mask: bool,
    offsets: str,
    max_batch: int = 2,
) -> DeformCase:
    """A random case: channels 4 or 8, maps of 5 to 9 per side, batch 1 to ``max_batch``."""
    batch = int(rng.integers(1, max_batch + 1))
    channels = int(rng.choice([4, 8]))
    filters = groups * int(rng.integers(1, 3))
    height, width = (int(v) for v in rng.integers(5, 10, 2))
    kh, kw = kernel
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    offset_shape = (batch, 2 * offset_groups * kh * kw, out_h, out_w)
    name = (
        f"g{groups} og{offset_groups} s{stride} d{dilation} p{padding} k{kernel} "
        f"{'mask' if use_mask else 'nomask'} {offsets} B{batch} C{channels} F{filters} {height}x{width}"
    )
    bias = rng.normal(size=filters) if rng.random() < 0.5 else None
    return DeformCase(
        name=name,
        x=rng.normal(size=(batch, channels, height, width)),
        offset=_offsets(rng, offsets, offset_shape, (height, width), kernel, stride, padding, dilation),
        weight=rng.normal(size=(filters, channels // groups, kh, kw)),
        bias=bias,
        mask=rng.uniform(-0.5, 1.5, (batch, offset_groups * kh * kw, out_h, out_w)) if use_mask else None,
        grad_out=rng.normal(size=(batch, filters, out_h, out_w)),
        stride=stride,
        padding=padding,
        dilation=dilation,
    )


def all_cases(seed: int = 0, *, max_batch: int = 4, n_mixed: int = 96) -> Iterator[DeformCase]:
    """The full grid (1152 cases), then ``n_mixed`` cases with per-axis stride, dilation and padding."""
    rng = np.random.default_rng(seed)
    grid = itertools.product((1, 2), (1, 2, 4), (1, 2), (1, 2), (False, True), KERNELS, (False, True), OFFSET_KINDS)
    for groups, offset_groups, stride, dilation, half_pad, kernel, use_mask, offsets in grid:
        padding = (kernel[0] // 2, kernel[1] // 2) if half_pad else (0, 0)
        yield make_case(
            rng,
            groups=groups,
            offset_groups=offset_groups,
            stride=(stride, stride),
            dilation=(dilation, dilation),
            padding=padding,
            kernel=kernel,
            use_mask=use_mask,
            offsets=offsets,
            max_batch=max_batch,
        )
    for _ in range(n_mixed):
        kernel = KERNELS[int(rng.integers(len(KERNELS)))]
        yield make_case(
            rng,
            groups=int(rng.choice([1, 2])),
            offset_groups=int(rng.choice([1, 2, 4])),
            stride=(int(rng.integers(1, 3)), int(rng.integers(1, 3))),
            dilation=(int(rng.integers(1, 3)), int(rng.integers(1, 3))),
            padding=(int(rng.integers(0, kernel[0] // 2 + 2)), int(rng.integers(0, kernel[1] // 2 + 2))),
            kernel=kernel,
            use_mask=bool(rng.random() < 0.5),
            offsets=OFFSET_KINDS[int(rng.integers(len(OFFSET_KINDS)))],
            max_batch=max_batch,
        )


def reference_results(case: DeformCase) -> dict[str, np.ndarray]:
    """Forward and gradients from ``parity/deform_conv_reference.py``."""
    args = (case.x, case.offset, case.weight, case.bias, case.stride, case.padding, case.dilation, case.mask)
    out = ref.deform_conv2d_forward(*args)
    grad_input, grad_weight, grad_offset, grad_mask, grad_bias = ref.deform_conv2d_backward(case.grad_out, *args)
    results = {"output": out, "grad_input": grad_input, "grad_weight": grad_weight, "grad_offset": grad_offset}
    if grad_mask is not None:
        results["grad_mask"] = grad_mask
    if case.bias is not None:
        results["grad_bias"] = grad_bias
    return results


def definition_results(case: DeformCase) -> dict[str, np.ndarray]:
    """Forward and gradients from the N-d definition in ``tests/deform_reference.py``."""
    geometry = {
        "strides": case.stride,
        "padding": [(p, p) for p in case.padding],
        "dilation": case.dilation,
    }
    out = definition.deform_conv(case.x, case.offset, case.weight, case.bias, case.mask, **geometry)
    grad_input, grad_offset, grad_mask, grad_weight, grad_bias = definition.deform_conv_vjp(
        case.x, case.offset, case.weight, case.bias, case.mask, case.grad_out, **geometry
    )
    results = {"output": out, "grad_input": grad_input, "grad_weight": grad_weight, "grad_offset": grad_offset}
    if grad_mask is not None:
        results["grad_mask"] = grad_mask
    if grad_bias is not None:
        results["grad_bias"] = grad_bias
    return results


def torchvision_results(case: DeformCase) -> dict[str, np.ndarray]:
    """Forward and gradients (torch autograd through torchvision's CPU kernel), float64."""
    import torch
    from torchvision.ops import deform_conv2d

    def leaf(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.tensor(a, dtype=torch.float64, requires_grad=True)

    x, offset, weight, bias, mask = (leaf(a) for a in (case.x, case.offset, case.weight, case.bias, case.mask))
    out = deform_conv2d(
        x, offset, weight, bias, stride=case.stride, padding=case.padding, dilation=case.dilation, mask=mask
    )
    out.backward(torch.tensor(case.grad_out, dtype=torch.float64))
    results = {
        "output": out.detach().numpy(),
        "grad_input": x.grad.numpy(),
        "grad_weight": weight.grad.numpy(),
        "grad_offset": offset.grad.numpy(),
    }
    if mask is not None:
        results["grad_mask"] = mask.grad.numpy()
    if bias is not None:
        results["grad_bias"] = bias.grad.numpy()
    return results


def main() -> int:
    import torch
    import torchvision

    torch.set_num_threads(1)
    print("deform_conv2d: parity/deform_conv_reference.py and tests/deform_reference.py vs torchvision, float64")
    print(f"date (UTC): {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, {platform.machine()}")  # fmt: skip
    print(f"reference follows pytorch/vision {ref.TORCHVISION_FILE} at commit {ref.TORCHVISION_COMMIT}")
    print('rerun (from the repository root): "$(../shared/tools/torchvision-venv)" parity/check_against_torchvision.py')
    print(f"tolerance: {TOL:g} * max(1, max |torchvision|)\n")

    worst = {src: dict.fromkeys(QUANTITIES, (0.0, "")) for src in ("reference", "definition")}
    counts = {src: dict.fromkeys(QUANTITIES, 0) for src in worst}
    failures = []
    n_cases = 0
    for case in all_cases():
        n_cases += 1
        expected = torchvision_results(case)
        for src, got in (("reference", reference_results(case)), ("definition", definition_results(case))):
            if got.keys() != expected.keys():
                failures.append(f"{src} {case.name}: quantities {sorted(got)} != {sorted(expected)}")
                continue
            for quantity, value in expected.items():
                if got[quantity].shape != value.shape:
                    failures.append(f"{src} {case.name} {quantity}: shape {got[quantity].shape} != {value.shape}")
                    continue
                diff = float(np.abs(got[quantity] - value).max(initial=0.0))
                counts[src][quantity] += 1
                if diff > worst[src][quantity][0]:
                    worst[src][quantity] = (diff, case.name)
                if diff > TOL * max(1.0, float(np.abs(value).max(initial=0.0))):
                    failures.append(f"{src} {case.name} {quantity}: max abs diff {diff:.3g}")

    print(f"{n_cases} cases")
    for src, label in (("reference", "parity/deform_conv_reference.py"), ("definition", "tests/deform_reference.py")):
        total = sum(counts[src].values())
        print(f"\n{label} vs torchvision: {total} comparisons (arrays)")
        for quantity in QUANTITIES:
            diff, where = worst[src][quantity]
            print(f"  {quantity:12s} {counts[src][quantity]:5d} compared, max abs diff {diff:.2e}  ({where})")
    print()
    if failures:
        print(f"{len(failures)} comparisons DIFFER:")
        print("\n".join(failures[:50]))
        return 1
    print("all comparisons agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
