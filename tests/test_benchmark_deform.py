"""benchmarks/deform_conv.py without torchvision: its JAX competitors on a small case against the float64
definition (``tests/deform_reference.py``) in both layouts, its memory measurements, and its report's verdicts
on the issue's targets. The torchvision side needs torchvision's compiled ops, which the benchmark's own
environment has (see its docstring); the comparison with torchvision itself is the benchmark's check."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

# The benchmarks import their siblings as top-level modules (they run as scripts from benchmarks/).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _harness as harness
import deform_conv as bench

from tests import deform_reference as dr

TOLERANCE = 1e-5


SMALL = (
    bench.case(2, 8, 7, 2, True),  # two offset groups, mask
    bench.case(1, 4, 6, 1, False),
)


def expected(data: bench.Arrays) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The float64 definition's output and gradients (torchvision's layout) for the case's arrays."""
    args = (data["input"], data["offset"], data["weight"], data["bias"], data["mask"])
    pads = [(bench.PADDING, bench.PADDING)] * 2
    out = dr.deform_conv(*args, padding=pads)
    grads = dr.deform_conv_vjp(*args, data["cotangent"], padding=pads)
    by_name = dict(zip(("input", "offset", "mask", "weight", "bias"), grads, strict=True))
    return out, {name: value for name, value in by_name.items() if value is not None}


@pytest.mark.parametrize("case", SMALL, ids=lambda case: case.name)
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_jax_competitors_compute_torchvision_s_function(case: bench.Case, layout: str) -> None:
    data = bench.arrays(case, seed=0)
    out, grads = expected(data)
    for mode in ("fwd", "fwd+bwd"):
        built = bench.build_jax(data, layout, mode)
        (result,) = harness.as_arrays(built.call(), built.channels_last)
        assert harness.relative_error((result,), (out,)) < TOLERANCE, mode
    assert built.gradients is not None
    got = built.gradients()
    assert sorted(got) == sorted(grads)  # the mask's gradient exactly when there is a mask
    for name, value in grads.items():
        assert got[name].shape == value.shape, name
        assert harness.relative_error((got[name],), (value,)) < TOLERANCE, name


def test_layouts_round_trip() -> None:
    data = bench.arrays(SMALL[0], seed=2)
    for name, array in data.items():
        if array is not None:
            moved = bench.to_layout(name, array, "channels_last")
            np.testing.assert_array_equal(bench.from_layout(name, moved, "channels_last"), array)
    assert bench.to_layout("weight", data["weight"], "channels_last").shape == (3, 3, 8, 8)  # HWIO
    assert bench.to_layout("offset", data["offset"], "channels_last").shape == (2, 7, 7, 36)


def test_xla_peak_of_a_dense_conv_holds_its_output() -> None:
    data = bench.arrays(SMALL[1], seed=0)
    args = [jax.device_put(data[name]) for name in ("input", "weight", "bias")]
    stats = bench.xla_bytes(jax.jit(bench.dense_conv), *args)
    assert stats["output_bytes"] == data["input"].nbytes  # C_out = C_in, same map
    assert stats["peak_bytes"] == stats["output_bytes"] + stats["temp_bytes"]


def case_record(case: bench.Case, fwd: float, fwd_bwd: float) -> dict:
    """A case's record as the benchmark writes it: jdynconv NCHW's ratios per pass, its VJP's share of
    fwd+bwd (75%), and peak memory (jdynconv 1 MiB, torchvision 3 MiB, XLA's dense conv 4 MiB)."""
    mib = {bench.SUBJECT: 1, "jdynconv NHWC": 1, bench.REFERENCE: 3, "XLA dense conv": 4, "torch dense conv": 2}
    return {
        **dataclasses.asdict(case),
        "ratios": {"fwd": {bench.SUBJECT: fwd}, "fwd+bwd": {bench.SUBJECT: fwd_bwd}},
        "paired_ratios": {},
        "results": {"fwd": {}, "fwd+bwd": {}},
        "bwd_share": 0.75,
        "memory": {
            name: {mode: {"peak_bytes": size * 2**20} for mode in ("fwd", "fwd+bwd")} for name, size in mib.items()
        },
    }


def test_report_marks_the_missed_targets() -> None:
    met, missed = case_record(SMALL[0], 0.2, 0.5), case_record(SMALL[1], 0.31, 0.6)
    assert bench.misses([met]) == []
    assert bench.misses([met, missed]) == ["B1 C4 6x6 og1 fwd 0.31x", "B1 C4 6x6 og1 fwd+bwd 0.6x"]
    table = bench.ratio_table([met, missed])
    for cell in ("| B2 C8 7x7 og2 m |", "0.2x ok", "0.5x ok", "0.31x MISS", "0.6x MISS", "75%"):
        assert cell in table
    assert "NCHW bwd / fwd+bwd" in table
    assert "bwd / fwd+bwd" not in bench.ratio_table([{**met, "bwd_share": None}])  # bwd timed with --breakdown only
    memory = bench.memory_table([met])
    # jdynconv NCHW 1 MiB, torchvision 3 MiB, XLA dense conv 4 MiB.
    for cell in ("0.333x", "0.25x"):
        assert cell in memory
    assert "Targets missed: B1 C4 6x6 og1 fwd 0.31x" in bench.summary([met, missed])


def test_breakdown_parts_add_up_to_deform_conv() -> None:
    data = bench.arrays(SMALL[0], seed=3)
    parts = {name: jax.jit(function)(*args) for name, (function, args) in bench.breakdown_parts(data).items()}
    assert sorted(parts) == sorted(bench.BREAKDOWN_PARTS)
    out = np.asarray(parts["deform_conv"]) - data["bias"]  # the parts leave the bias out
    assert harness.relative_error((np.asarray(parts["contraction"]),), (out,)) < TOLERANCE
    assert harness.relative_error((np.asarray(parts["contraction as 1x1 conv"]),), (out,)) < TOLERANCE
    assert parts["dense conv"].shape == out.shape
