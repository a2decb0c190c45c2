"""Parity of ``jdynconv.dcnv3`` with InternImage's ``dcnv3_core_pytorch`` (``parity/dcnv3_reference.py``).

Forward and the gradients w.r.t. input, offsets and mask (``jax.vjp`` of a random cotangent against torch
autograd through the original's ``F.grid_sample``), in float32 and float64, over kernel 3/5, stride 1/2, pad
0/1, dilation 1/2, group 1/4, offset_scale 0.5/1 and remove_center on/off: every level of every option in three
configurations (:data:`CONFIGS`), all three in float32, the two with a 3 x 3 kernel in float64. Offsets are a
few pixels (normal, sigma 2), so taps land between pixels and off the (padded) input.

float32: ``parity/conftest.py``'s tolerance (``1e-5`` relative plus ``1e-5 * max(1, max |expected|)``). The two
sides compute the sampling positions differently -- jdynconv in pixels, ``origin + scale * (tap + offset)``,
the original in ``grid_sample``'s normalised coordinates, ``(ref + grid * scale + offset * scale / W) * 2 - 1``,
unnormalised again by ``grid_sample`` -- each with a few float32 roundings of values up to ``W`` pixels: about
``4 W 2^-24 ~ 4e-6`` pixel for ``W = 16``, which moves a bilinear sample by that times its slope (~1e-6
relative); the sums over taps and channels add ~sqrt(n) 2^-24. Measured (Intel Xeon, jax 0.10.2, torch 2.13.0):
at most 9.7e-7 of ``max(1, max |expected|)`` (a mask gradient), 10x inside 1e-5.

float64: the original builds its regular grid (reference points ``(c + 0.5 + o * s) / H`` and the dilation grid
``tap / W``) in float32 whatever the input dtype. Where the padded sizes are powers of two and offset_scale is
0.5 or 1 that grid is exact (dyadic numerators over a power of two, times a power of two), and the rest of the
original runs in float64: the comparison holds to ``1e-12`` (measured 1.9e-15), float64 rounding of a few sums.
Elsewhere the float32 grid rounds by up to ``2^-24`` of a normalised coordinate, ``~W 2^-24 = 1e-6`` pixel:
measured 4e-7 to 6e-7 relative (padded 7 x 11), checked on the output
(:func:`test_float64_non_power_of_two_sizes_differ_by_the_float32_grid`) to lie between 1e-9 and 1e-5.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np
import pytest
import torch

import jdynconv as jdc

from .dcnv3_reference import dcnv3_core_pytorch


@dataclasses.dataclass(frozen=True)
class Config:
    kernel: int
    stride: int
    pad: int
    dilation: int
    group: int
    offset_scale: float
    remove_center: bool
    size: tuple[int, int]  # (H, W) before padding

    @property
    def name(self) -> str:
        return (
            f"k{self.kernel}-s{self.stride}-p{self.pad}-d{self.dilation}-g{self.group}-os{self.offset_scale}"
            f"{'-rc' if self.remove_center else ''}-{self.size[0]}x{self.size[1]}"
        )

    @property
    def taps(self) -> int:
        return self.kernel * self.kernel - int(self.remove_center)

    @property
    def out_size(self) -> tuple[int, int]:
        span = self.dilation * (self.kernel - 1) + 1
        return tuple((s + 2 * self.pad - span) // self.stride + 1 for s in self.size)


# Every level of every option; padded sizes are powers of two (8 x 16, 16 x 8, 16 x 16). A 5 x 5 kernel costs
# jdynconv's gradient ~5 s of compilation on a CPU (one gather per tap and corner), so it appears once.
CONFIGS = [
    Config(3, 1, 1, 1, 4, 1.0, False, (6, 14)),
    Config(3, 2, 0, 2, 1, 0.5, True, (16, 8)),
    Config(5, 2, 1, 1, 1, 1.0, True, (14, 14)),
]
CHANNELS = 8
BATCH = 2
FLOAT64_TOL = 1e-12


def _arrays(config: Config, dtype: type, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, *map(ord, config.name)])
    out_h, out_w = config.out_size
    return {
        "input": rng.normal(size=(BATCH, *config.size, CHANNELS)).astype(dtype),
        "offset": rng.normal(0.0, 2.0, (BATCH, out_h, out_w, config.group * config.taps * 2)).astype(dtype),
        "mask": rng.uniform(-0.5, 1.5, (BATCH, out_h, out_w, config.group * config.taps)).astype(dtype),
        "cotangent": rng.normal(size=(BATCH, out_h, out_w, CHANNELS)).astype(dtype),
    }


def _torch(config: Config, arrays: dict[str, np.ndarray], grads: bool = True) -> dict[str, np.ndarray]:
    leaves = {k: torch.tensor(arrays[k], requires_grad=grads) for k in ("input", "offset", "mask")}
    out = dcnv3_core_pytorch(
        leaves["input"], leaves["offset"], leaves["mask"], config.kernel, config.kernel, config.stride, config.stride,
        config.pad, config.pad, config.dilation, config.dilation, config.group, CHANNELS // config.group,
        config.offset_scale, config.remove_center,
    )  # fmt: skip
    results = {"output": out.detach().numpy()}
    if grads:
        out.backward(torch.tensor(arrays["cotangent"]))
        results |= {k: leaves[k].grad.numpy() for k in ("input", "offset", "mask")}
    return results


def _call(config: Config, inputs, offsets, mask):
    return jdc.dcnv3(
        inputs, offsets, mask, kernel_size=config.kernel, strides=config.stride, padding=config.pad,
        kernel_dilation=config.dilation, groups=config.group, offset_scale=config.offset_scale,
        remove_center=config.remove_center,
    )  # fmt: skip


@functools.cache
def _value_and_grads(config: Config):
    def value_and_grads(inputs, offsets, mask, cotangent):
        out, vjp = jax.vjp(functools.partial(_call, config), inputs, offsets, mask)
        return dict(zip(("output", "input", "offset", "mask"), (out, *vjp(cotangent)), strict=True))

    return jax.jit(value_and_grads)


def _jax(config: Config, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    args = (arrays[k] for k in ("input", "offset", "mask", "cotangent"))
    return jax.tree.map(np.asarray, _value_and_grads(config)(*args))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_float32_matches_internimage(config: Config, assert_close: Callable[[object, object, str], None]) -> None:
    arrays = _arrays(config, np.float32)
    expected = _torch(config, arrays)
    got = _jax(config, arrays)
    for quantity, value in expected.items():
        assert_close(got[quantity], value, f"{config.name} {quantity}")


@pytest.mark.parametrize("config", CONFIGS[:2], ids=lambda c: c.name)
def test_float64_matches_internimage_exactly_on_power_of_two_sizes(config: Config) -> None:
    with jax.enable_x64(True):
        arrays = _arrays(config, np.float64)
        got = _jax(config, arrays)
    expected = _torch(config, arrays)
    for quantity, value in expected.items():
        assert got[quantity].dtype == np.float64, quantity
        error = float(np.abs(got[quantity] - value).max())
        assert error <= FLOAT64_TOL * max(1.0, float(np.abs(value).max())), f"{quantity}: {error:.3g}"


def test_float64_non_power_of_two_sizes_differ_by_the_float32_grid() -> None:
    """Padded 7 x 11: the original's float32 grid rounds, so float64 agrees to ~1e-6, not to float64 rounding."""
    config = dataclasses.replace(CONFIGS[0], size=(5, 9))
    with jax.enable_x64(True):
        arrays = _arrays(config, np.float64)
        got = np.asarray(jax.jit(functools.partial(_call, config))(arrays["input"], arrays["offset"], arrays["mask"]))
    expected = _torch(config, arrays, grads=False)["output"]
    relative = float(np.abs(got - expected).max()) / float(np.abs(expected).max())
    assert 1e-9 < relative <= 1e-5, relative
