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
    cases = {name: result for name, result in programs.items() if "moved" in result and "control" not in name}
    # every shape and layout (fwd, fwd + bwd), every method, jvp, grad of grad, outer vmap, the (4, 2) mesh,
    # explicit sharding and the caller's shard_map
    assert len(cases) == 25, sorted(cases)
    moved = {name: result["moved"] for name, result in cases.items() if result["moved"]}
    assert not moved, f"bytes all-gathered / all-to-all'd / permuted per device: {moved}"
    compared = {name: result["error"] for name, result in cases.items() if "error" in result}
    assert len(compared) == 19, sorted(compared)  # all but the 6 forward-only programs
    # The same per-sample arithmetic on each shard; only sums over the batch (the shared bias's gradient)
    # add in another order. Largest measured 1.4e-6 (3d).
    errors = {name: error for name, error in compared.items() if error > F32_RTOL}
    assert not errors, errors


def test_the_check_sees_a_gathered_batch(programs: dict) -> None:
    control = programs["control: bare vmap lowering"]
    # The other devices' inputs and kernels: 7/8 of (16 x 16 x 16 x 24 + 16 x 3 x 3 x 24 x 24) floats, 0.63 MB.
    assert control["moved"] >= 7 / 8 * 4 * (16 * 16 * 16 * 24 + 16 * 3 * 3 * 24 * 24), control
    assert control["error"] <= F32_RTOL


def test_each_device_holds_about_an_eighth_of_the_scratch_memory(programs: dict) -> None:
    memory = programs["temp bytes"]
    # 128 samples: 16 a device. Measured 0.147 of the 1-device program's scratch (a few fixed buffers do not
    # shrink with the batch); the gathering programs held more than the 1-device program.
    assert memory["8 devices"] <= memory["1 device"] / 4, memory
