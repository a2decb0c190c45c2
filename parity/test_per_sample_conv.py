"""Parity of ``jdynconv.per_sample_conv`` with three PyTorch formulations of per-sample convolution.

PyTorch references (PyTorch layout, float32, CPU), each built only from ``torch.nn.functional``:

* ``grouped``: the batch folded into channels, one ``F.conv{n}d`` with ``groups = B * G`` (the trick
  timm's ``CondConv2d`` uses);
* ``vmap``: ``torch.func.vmap`` of ``F.conv{n}d`` over (sample, kernel, bias);
* ``loop``: a Python loop over the batch, ``torch.cat`` of the per-sample convs.

Each is compared forward and for the gradients of ``sum(y * g)`` (``g`` a random cotangent) with respect
to inputs, kernels and bias, for every jdynconv ``method``. Tolerance, float32: ``rtol=1e-5`` and
``atol=1e-5 * max(1, max |reference|)`` (see ``conftest.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jdynconv as jdc

METHODS = jdc.functional.METHODS
TORCH_CONVS: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

Pairs = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class Case:
    """One per-sample convolution, with arguments as jdynconv takes them (PyTorch layout shapes)."""

    name: str
    spatial: tuple[int, ...]
    kernel_size: tuple[int, ...]
    strides: int | tuple[int, ...] = 1
    padding: str | int | tuple[int, ...] | Pairs = 0
    dilation: int | tuple[int, ...] = 1
    groups: int = 1
    bias: str | None = "per_sample"  # "per_sample" (B, C_out), "shared" (C_out,) or None
    batch: int = 3
    in_channels: int = 4
    out_channels: int = 6

    @property
    def rank(self) -> int:
        return len(self.spatial)


CASES = (
    Case("1d_pad1", spatial=(9,), kernel_size=(3,), padding=1),
    Case("1d_stride2_pad1", spatial=(16,), kernel_size=(3,), strides=2, padding=1),
    # JAX SAME with an even kernel pads (1, 2); PyTorch's symmetric padding cannot express it.
    Case("1d_same_even_kernel", spatial=(9,), kernel_size=(4,), padding="SAME"),
    # Stride 2 on an even length: SAME pads (0, 1), where padding=1 would give the same shape.
    Case("1d_same_stride2", spatial=(8,), kernel_size=(3,), strides=2, padding="SAME"),
    Case("1d_dilated_groups", spatial=(11,), kernel_size=(3,), padding=2, dilation=2, groups=2, bias="shared"),
    Case("1d_causal", spatial=(7,), kernel_size=(3,), padding="CAUSAL", dilation=2, bias=None),
    Case("2d_per_dim", spatial=(7, 6), kernel_size=(3, 2), strides=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
    Case("2d_same_even_stride2", spatial=(7, 8), kernel_size=(2, 4), strides=2, padding="SAME"),
    Case(
        "2d_depthwise_pairs",
        spatial=(5, 6),
        kernel_size=(3, 3),
        padding=((2, 0), (0, 1)),
        groups=4,
        out_channels=8,
    ),
    Case("2d_valid_no_bias", spatial=(6, 5), kernel_size=(3, 3), padding="VALID", bias=None),
    Case("3d_per_dim", spatial=(4, 5, 3), kernel_size=(2, 3, 1), strides=(1, 2, 1), padding=(1, 1, 0), groups=2),
    Case("3d_same_stride2", spatial=(4, 5, 4), kernel_size=(2, 3, 3), strides=2, padding="SAME"),
    Case("3d_dilated_shared_bias", spatial=(5, 5, 5), kernel_size=(2, 2, 2), padding=1, dilation=2, bias="shared"),
)
CASE_IDS = [case.name for case in CASES]
# One case per rank is enough for the layout conversion; the maths is covered by the channels_first tests.
CHANNELS_LAST_CASES = tuple(case for case in CASES if case.name in ("1d_same_stride2", "2d_per_dim", "3d_per_dim"))


def _per_dim(value: int | tuple[int, ...], rank: int) -> tuple[int, ...]:
    return (value,) * rank if isinstance(value, int) else tuple(value)


def explicit_pads(case: Case) -> Pairs:
    """``case.padding`` as (low, high) per spatial dim, from the definitions, not from jdynconv.

    JAX/TF ``"SAME"``: output ``ceil(size / stride)``, total pad split with the odd one at the end.
    ``"CAUSAL"``: the whole dilated receptive field minus one, before the signal.
    """
    strides = _per_dim(case.strides, case.rank)
    dilation = _per_dim(case.dilation, case.rank)
    effective = [(k - 1) * d + 1 for k, d in zip(case.kernel_size, dilation, strict=True)]
    if case.padding == "VALID":
        return ((0, 0),) * case.rank
    if case.padding == "CAUSAL":
        return ((effective[0] - 1, 0),)
    if case.padding == "SAME":
        pads = []
        for size, k, s in zip(case.spatial, effective, strides, strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    return tuple((p, p) if isinstance(p, int) else p for p in _per_dim(case.padding, case.rank))


def make_arrays(case: Case) -> dict[str, np.ndarray]:
    """Random normal inputs, kernels, bias and output cotangent in PyTorch layout, seeded by the case."""
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    pads = explicit_pads(case)
    strides = _per_dim(case.strides, case.rank)
    dilation = _per_dim(case.dilation, case.rank)
    out_spatial = tuple(
        (size + lo + hi - (k - 1) * d - 1) // s + 1
        for size, (lo, hi), k, d, s in zip(case.spatial, pads, case.kernel_size, dilation, strides, strict=True)
    )
    shapes = {
        "inputs": (case.batch, case.in_channels, *case.spatial),
        "kernels": (case.batch, case.out_channels, case.in_channels // case.groups, *case.kernel_size),
        "cotangent": (case.batch, case.out_channels, *out_spatial),
    }
    if case.bias == "per_sample":
        shapes["bias"] = (case.batch, case.out_channels)
    elif case.bias == "shared":
        shapes["bias"] = (case.out_channels,)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}


def _torch_pad(x: torch.Tensor, pads: Pairs) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Symmetric pads go to the conv's own ``padding``; asymmetric ones need an explicit ``F.pad``."""
    if all(lo == hi for lo, hi in pads):
        return x, tuple(lo for lo, _ in pads)
    # F.pad lists (low, high) from the last dim backwards.
    return F.pad(x, [p for pair in reversed(pads) for p in pair]), (0,) * len(pads)


def torch_grouped(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, case: Case) -> torch.Tensor:
    """The batch folded into channels: one conv with ``groups = B * G``."""
    batch, in_channels, *spatial = x.shape
    out_channels, group_in, *kernel_size = w.shape[1:]
    folded, padding = _torch_pad(x.reshape(1, batch * in_channels, *spatial), explicit_pads(case))
    y = TORCH_CONVS[case.rank](
        folded,
        w.reshape(batch * out_channels, group_in, *kernel_size),
        None if b is None else b.expand(batch, out_channels).reshape(-1),
        stride=case.strides,
        padding=padding,
        dilation=case.dilation,
        groups=batch * case.groups,
    )
    return y.reshape(batch, out_channels, *y.shape[2:])


def _conv_one(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, case: Case) -> torch.Tensor:
    """``F.conv{n}d`` of one sample ``(1, C_in, *S)`` with its own kernel ``(C_out, C_in // G, *K)``."""
    x, padding = _torch_pad(x, explicit_pads(case))
    conv = TORCH_CONVS[case.rank]
    return conv(x, w, b, stride=case.strides, padding=padding, dilation=case.dilation, groups=case.groups)


def torch_vmap(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, case: Case) -> torch.Tensor:
    """``torch.func.vmap`` over (sample, kernel, bias) of an ordinary conv."""
    if b is None:
        return torch.func.vmap(lambda xi, wi: _conv_one(xi.unsqueeze(0), wi, None, case).squeeze(0))(x, w)
    per_sample_bias = b.expand(x.shape[0], w.shape[1])
    return torch.func.vmap(lambda xi, wi, bi: _conv_one(xi.unsqueeze(0), wi, bi, case).squeeze(0))(
        x, w, per_sample_bias
    )


def torch_loop(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, case: Case) -> torch.Tensor:
    """The for-loop the seed question wants to avoid: one conv per sample, concatenated."""
    per_sample_bias = None if b is None else b.expand(x.shape[0], w.shape[1])
    return torch.cat(
        [
            _conv_one(x[i : i + 1], w[i], None if per_sample_bias is None else per_sample_bias[i], case)
            for i in range(x.shape[0])
        ]
    )


TORCH_REFERENCES = {"grouped": torch_grouped, "vmap": torch_vmap, "loop": torch_loop}


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A leaf tensor owning a copy (torch warns on non-writable NumPy buffers, e.g. views of JAX arrays)."""
    return torch.tensor(np.array(array), requires_grad=True)


@functools.cache
def torch_results(case: Case, reference: str) -> dict[str, np.ndarray]:
    """Outputs and gradients of ``sum(y * g)`` from one PyTorch formulation (cached: all methods use it)."""
    arrays = make_arrays(case)
    leaves = {name: to_torch(arrays[name]) for name in ("inputs", "kernels", "bias") if name in arrays}
    y = TORCH_REFERENCES[reference](leaves["inputs"], leaves["kernels"], leaves.get("bias"), case)
    (y * torch.tensor(arrays["cotangent"])).sum().backward()
    return {"outputs": y.detach().numpy()} | {name: leaf.grad.numpy() for name, leaf in leaves.items()}


def _to_channels_last(name: str, array: np.ndarray) -> np.ndarray:
    if name == "kernels":  # (B, O, I, *K) -> (B, *K, I, O)
        rank = array.ndim - 3
        return array.transpose(0, *range(3, 3 + rank), 2, 1)
    if name == "bias":
        return array
    return np.moveaxis(array, 1, -1)


def _to_channels_first(name: str, array: np.ndarray) -> np.ndarray:
    if name == "kernels":  # (B, *K, I, O) -> (B, O, I, *K)
        rank = array.ndim - 3
        return array.transpose(0, rank + 2, rank + 1, *range(1, rank + 1))
    if name == "bias":
        return array
    return np.moveaxis(array, -1, 1)


def jdynconv_results(case: Case, method: str, data_format: str) -> dict[str, np.ndarray]:
    """Outputs and gradients of ``sum(y * g)`` from jitted jdynconv, returned in PyTorch layout."""
    arrays = make_arrays(case)
    if data_format == "channels_last":
        # Convert layouts here, explicitly, rather than relying on jdynconv's own channels_first path.
        arrays = {name: _to_channels_last(name, array) for name, array in arrays.items()}
    cotangent = jnp.asarray(arrays.pop("cotangent"))

    def loss(params: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        y = jdc.per_sample_conv(
            params["inputs"],
            params["kernels"],
            params.get("bias"),
            strides=case.strides,
            padding=case.padding,
            kernel_dilation=case.dilation,
            feature_group_count=case.groups,
            data_format=data_format,
            method=method,
        )
        return jnp.sum(y * cotangent), y

    grads, y = jax.jit(jax.grad(loss, has_aux=True))({name: jnp.asarray(a) for name, a in arrays.items()})
    results = {"outputs": np.asarray(y)} | {name: np.asarray(g) for name, g in grads.items()}
    if data_format == "channels_last":
        results = {name: _to_channels_first(name, array) for name, array in results.items()}
    return results


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_torch_references_agree(case: Case, assert_close: Callable[[object, object, str], None]) -> None:
    """The three PyTorch formulations are the same function: a broken reference fails here first."""
    expected = torch_results(case, "loop")
    for reference in ("grouped", "vmap"):
        actual = torch_results(case, reference)
        assert actual.keys() == expected.keys()
        for name in expected:
            assert_close(actual[name], expected[name], f"torch {reference} vs loop: {name}")


# Every method against PyTorch on one case per kind of geometry (padding pairs and groups, per-dim strides
# and dilations, depthwise), `auto` on all: tests/test_functional.py checks every method on every case
# against float64 definitions, and these compile-bound cases were the slowest part of the suite
# ("depthwise" on a 3-D case with several input channels per group compiles thousands of ops).
EVERY_METHOD_CASES = ("1d_dilated_groups", "2d_per_dim", "2d_depthwise_pairs")
METHOD_CASES = [
    pytest.param(case, method, id=f"{case.name}-{method}")
    for case in CASES
    for method in METHODS
    if method == "auto" or case.name in EVERY_METHOD_CASES
]


@pytest.mark.parametrize(("case", "method"), METHOD_CASES)
def test_matches_torch_channels_first(
    case: Case, method: str, assert_close: Callable[[object, object, str], None]
) -> None:
    actual = jdynconv_results(case, method, "channels_first")
    for reference in TORCH_REFERENCES:
        expected = torch_results(case, reference)
        assert actual.keys() == expected.keys()
        for name in expected:
            assert_close(actual[name], expected[name], f"jdynconv {method} vs torch {reference}: {name}")


@pytest.mark.parametrize("case", CHANNELS_LAST_CASES, ids=[case.name for case in CHANNELS_LAST_CASES])
def test_matches_torch_channels_last(case: Case, assert_close: Callable[[object, object, str], None]) -> None:
    """Flax layout in, PyTorch weights transposed by hand (OIHW -> HWIO per sample), same function."""
    actual = jdynconv_results(case, "auto", "channels_last")
    expected = torch_results(case, "grouped")
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_close(actual[name], expected[name], f"jdynconv channels_last vs torch grouped: {name}")


@pytest.mark.parametrize("method", METHODS)
def test_seed_kernel_size_one(method: str, assert_close: Callable[[object, object, str], None]) -> None:
    """The seed's answer: with kernel size 1, per-sample conv1d is a broadcast multiply-and-sum."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 4, 16), dtype=np.float32)
    w = rng.standard_normal((32, 8, 4, 1), dtype=np.float32)
    conv = jax.jit(functools.partial(jdc.per_sample_conv, padding="VALID", data_format="channels_first", method=method))
    y = np.asarray(conv(x, w))
    assert y.shape == (32, 8, 16)
    x_t, w_t = torch.tensor(x), torch.tensor(w)
    assert_close(y, torch.einsum("bin,boin->bon", x_t, w_t).numpy(), "vs torch.einsum('bin,boin->bon')")
    assert_close(y, (x_t.unsqueeze(1) * w_t).sum(dim=2).numpy(), "vs (x.unsqueeze(1) * w).sum(dim=2)")
