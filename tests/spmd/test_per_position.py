"""Per-position convolution with the batch split over 8 devices: each device convolves only its own samples, and a
training step (BatchNorm statistics, weight dropout) only all-reduces parameter-sized arrays.

One subprocess (tests/spmd/programs_per_position.py) compiles every case; the assertions read its report. The control
(the op on inputs rolled along the batch) shows the byte count able to see data move.
"""

from __future__ import annotations

import pytest

from tests.helpers import F32_RTOL
from tests.spmd.launch import report


@pytest.fixture(scope="module")
def programs() -> dict:
    return report("tests.spmd.programs_per_position")


def test_no_batch_data_moves_and_values_equal_one_device(programs: dict) -> None:
    cases = {name: result for name, result in programs.items() if "control" not in name}
    assert len(cases) == 4, sorted(cases)
    moved = {name: result["moved"] for name, result in cases.items() if result["moved"]}
    assert not moved, f"bytes all-gathered / all-to-all'd / permuted per device: {moved}"
    too_large = {
        name: (result["largest_reduced"], result["largest_variable"])
        for name, result in cases.items()
        if result.get("largest_reduced", 0) > result.get("largest_variable", 0)
    }
    assert not too_large, f"all-reduces larger than any parameter or statistic: {too_large}"
    # Per-sample arithmetic is the same on each shard; sums over the batch add in another order.
    errors = {name: result["error"] for name, result in cases.items() if result["error"] > F32_RTOL}
    assert not errors, errors


def test_the_check_sees_moved_samples(programs: dict) -> None:
    # Rolling by one sample moves one sample's 24 x 8 floats into each device's shard.
    assert programs["control: inputs rolled along the batch"]["moved"] >= 24 * 8 * 4
