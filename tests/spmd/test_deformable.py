"""Deformable convolution with the batch split over 8 devices: each device samples and convolves only its own
samples, and a training step only all-reduces parameter-sized gradients.

One subprocess (tests/spmd/programs_deformable.py) compiles every case; the assertions read its report. The
control shows the check able to fail: the sampling primitive without the batch-parallel wrapper has XLA's
partitioner gather the batch for its row gathers.
"""

from __future__ import annotations

import pytest

from tests.helpers import F32_RTOL
from tests.spmd.launch import report


@pytest.fixture(scope="module")
def programs() -> dict:
    return report("tests.spmd.programs_deformable")


def test_no_batch_data_moves_and_values_equal_one_device(programs: dict) -> None:
    cases = {name: result for name, result in programs.items() if "control" not in name}
    # deform_conv (with a mask) and dcnv3, fwd+bwd; linen DeformConv and DCNv3 (batch norm): training steps
    assert len(cases) == 4, sorted(cases)
    moved = {name: result["moved"] for name, result in cases.items() if result["moved"]}
    assert not moved, f"bytes all-gathered / all-to-all'd / permuted per device: {moved}"
    too_large = {
        name: (result["largest_reduced"], result["largest_variable"])
        for name, result in cases.items()
        if result.get("largest_reduced", 0) > result.get("largest_variable", 0)
    }
    assert not too_large, f"all-reduces larger than any parameter or statistic: {too_large}"
    # The same per-sample arithmetic on each shard; sums over the batch (gradients of shared parameters,
    # BatchNorm statistics) add in another order, to float32 rounding.
    errors = {name: result["error"] for name, result in cases.items() if result["error"] > F32_RTOL}
    assert not errors, errors


def test_the_check_sees_a_gathered_batch(programs: dict) -> None:
    # The other devices' samples of the input: at least 7/8 of 16 x 8 x 8 x 8 floats.
    assert programs["control: sampling without map_batch_shards"]["moved"] >= 7 / 8 * 4 * 16 * 8 * 8 * 8
