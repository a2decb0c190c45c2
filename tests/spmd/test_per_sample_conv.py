"""``per_sample_conv`` with the batch split over 8 devices: each device computes only its own samples.

One subprocess (tests/spmd/programs_conv.py) compiles every case; the assertions read its report. The
check is shown able to fail by a control: a lowering called without the batch-parallel wrapper gathers the
whole batch onto every device (as every lowering did before it, 0.1 to 13 MB a program at these shapes).
"""

from __future__ import annotations

import pytest

from tests.helpers import F32_RTOL
from tests.spmd.launch import report


@pytest.fixture(scope="module")
def programs() -> dict:
    return report("tests.spmd.programs_conv")


def test_no_batch_data_moves_between_devices_and_values_equal_one_device(programs: dict) -> None:
    cases = {name: result for name, result in programs.items() if "error" in result and "control" not in name}
    # every shape and layout (fwd, fwd + bwd), every method, jvp, grad of grad, outer vmap, the (4, 2) mesh,
    # explicit sharding and the caller's shard_map
    assert len(cases) == 25, sorted(cases)
    moved = {name: result["moved"] for name, result in cases.items() if result["moved"]}
    assert not moved, f"bytes all-gathered / all-to-all'd / permuted per device: {moved}"
    # The same per-sample arithmetic on each shard; only sums over the batch (the shared bias's gradient)
    # add in another order. Largest measured 6.4e-7.
    errors = {name: result["error"] for name, result in cases.items() if result["error"] > F32_RTOL}
    assert not errors, errors


def test_the_check_sees_a_gathered_batch(programs: dict) -> None:
    control = programs["control: bare vmap lowering"]
    assert control["moved"] > 1_000_000, control  # the whole batch's inputs and kernels, 1.8 MB measured
    assert control["error"] <= F32_RTOL


def test_each_device_holds_about_an_eighth_of_the_scratch_memory(programs: dict) -> None:
    memory = programs["temp bytes"]
    # 128 samples: 16 a device. Measured 0.147 of the 1-device program's scratch (a few fixed buffers do not
    # shrink with the batch); the gathering programs held more than the 1-device program.
    assert memory["8 devices"] <= memory["1 device"] / 4, memory
