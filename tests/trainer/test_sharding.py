"""Data parallelism: a training run sharded over 4 (virtual CPU) devices equals the 1-device run.

XLA fixes the CPU device count at start-up, so the comparison runs in a subprocess with
``--xla_force_host_platform_device_count=4``; it trains the same configuration on ``jax.devices()[:1]``
and on all four, and reports the largest differences of parameters and batch statistics.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from trainer.loop import ConfigError, TrainConfig, fit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

SCRIPT = """
import dataclasses, json, shutil, sys, tempfile
from pathlib import Path
import jax, numpy as np
from jax.sharding import PartitionSpec
from trainer.loop import TrainConfig, eval_set, fit, make_trainer
from trainer.sharding import batch_split, data_mesh

def leaves(tree):
    return {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}

report = {"devices": jax.device_count()}
mesh = data_mesh()
batch = jax.jit(lambda: jax.numpy.zeros((16, 4)), out_shardings=batch_split(mesh))()
report["batch_shard_rows"] = sorted(int(s.data.shape[0]) for s in batch.addressable_shards)
# 512 held-out images: two chunks of 256, each split 4 ways (evaluation is data-parallel too).
eval_images, _ = eval_set(TrainConfig(eval_size=512), mesh)
chunk = eval_images[1]
report["eval_chunk"] = [list(chunk.shape), sorted(int(s.data.shape[0]) for s in chunk.addressable_shards)]

def max_diff(a, b, keys):
    return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in keys)

for api in ("linen", "nnx"):
    config = TrainConfig(api=api, steps=4, batch_size=16, eval_every=4, eval_size=512)
    initial = leaves(make_trainer(config, data_mesh(jax.devices()[:1])).variables())
    single_run = fit(config, devices=jax.devices()[:1], progress=False)
    single = leaves(single_run.trainer.variables())
    ckpt = Path(tempfile.mkdtemp()) / "ckpt"
    sharded = fit(dataclasses.replace(config, ckpt_dir=str(ckpt), ckpt_every=2), progress=False)
    variables = leaves(sharded.trainer.variables())
    # Sharded resume: drop the step-4 checkpoint, resume from step 2 on the 4 devices.
    shutil.rmtree(ckpt / "4")
    resumed = fit(dataclasses.replace(config, ckpt_dir=str(ckpt), ckpt_every=2, resume=True), progress=False)
    resumed_state, sharded_state = leaves(resumed.trainer.state()), leaves(sharded.trainer.state())
    params = [k for k in single if k.startswith("['params']")]
    if api == "linen":  # the run the two-process (multi-host) command must equal: the same 4 devices
        report["four_device_history"] = sharded.history
    report[api] = {
        "num_devices": sharded.num_devices,
        "fully_replicated": all(v.sharding.is_fully_replicated for v in variables.values()),
        "keys_equal": sorted(single) == sorted(variables),
        "max_abs_diff": max_diff(variables, single, single),
        "max_abs_value": max(float(np.max(np.abs(np.asarray(single[k])))) for k in single),
        "params_moved_from_init": max_diff(single, initial, params),
        "num_params": len(params),
        "eval_accuracy_diff": abs(sharded.final_accuracy - single_run.final_accuracy),
        "resumed_from": resumed.start_step,
        "resume_bitwise": sorted(resumed_state) == sorted(sharded_state)
        and all(np.array_equal(resumed_state[k], sharded_state[k]) for k in sharded_state),
        "resume_history_equal": resumed.history == sharded.history,
    }
print("REPORT", json.dumps(report))
"""


TRAIN_PY = EXAMPLES / "train.py"
# The configuration of the script's runs, as train.py flags (4 steps of 16 images, evaluated at step 4).
MULTI_HOST_FLAGS = ["--steps", "4", "--batch-size", "16", "--eval-every", "4", "--eval-size", "512", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _start_two_processes(out_dir: Path) -> list[subprocess.Popen]:
    """The multi-host command of docs/training.md: two processes on localhost with two CPU devices each."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, str(TRAIN_PY), *MULTI_HOST_FLAGS, "--out-dir", str(out_dir)]
    distributed = ["--coordinator-address", f"localhost:{_free_port()}", "--num-processes", "2", "--process-id"]
    return [
        subprocess.Popen(
            [*command, *distributed, str(process)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for process in (0, 1)
    ]


def _four_device_report() -> dict:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLES), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


def test_four_device_run_splits_the_batch_and_equals_one_device(tmp_path: Path) -> None:
    """One test over the one subprocess run: under pytest-xdist, tests sharing a module fixture can land
    on both workers, and each would run the subprocess (or wait for the other's). The two-process run
    (multi-host on localhost: 2 processes x 2 devices, gloo) goes alongside and must equal its 4 devices."""
    processes = _start_two_processes(tmp_path)
    report = _four_device_report()
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "on 4 device(s)" in outputs[0], outputs[0][-2000:]
    multi_host = json.loads((tmp_path / "train_linen.json").read_text())
    assert multi_host["devices"] == 4
    expected = report["four_device_history"]
    # The same per-device programs; only the all-reduces go through gloo between processes instead of
    # within one (measured: the losses agree to 1e-7 relative after 4 AdamW steps). The 4-device run saved
    # a checkpoint at step 2, so it logged the mean loss of steps 1-2 and of 3-4; the multi-host run (no
    # checkpoints) logs steps 1-4, the mean of the two.
    assert [row[0] for row in multi_host["history"]["train"]] == [4]
    assert [row[0] for row in expected["train"]] == [2, 4]
    want = (expected["train"][0][1] + expected["train"][1][1]) / 2
    got = multi_host["history"]["train"][0][1]
    assert abs(got - want) <= 1e-5 * abs(want), (got, want)  # mean training loss
    for (got_step, got_accuracy), (want_step, want_accuracy) in zip(
        multi_host["history"]["eval"], expected["eval"], strict=True
    ):
        assert got_step == want_step
        assert abs(got_accuracy - want_accuracy) <= 2 / 512  # at most a borderline image or two may flip
    assert report["devices"] == 4
    assert report["batch_shard_rows"] == [4, 4, 4, 4]
    assert report["eval_chunk"] == [[256, 32, 32, 1], [64, 64, 64, 64]]
    for api in ("linen", "nnx"):
        result = report[api]
        assert result["num_devices"] == 4, api
        assert result["fully_replicated"], api  # every parameter and statistic is whole on all four devices
        assert result["keys_equal"], api
        assert result["num_params"] > 0, api
        # The optimizer moved the parameters (not just the statistics): the comparison means something.
        assert result["params_moved_from_init"] > 1e-4, api
        # float32: the all-reduced sums add in another order than one device's; 4 AdamW steps
        # (measured: 2.4e-7 linen, 4.2e-7 NNX, values up to 3.2, so 1e-5 leaves 20x).
        assert result["max_abs_diff"] <= 1e-5 * max(1.0, result["max_abs_value"]), (api, result)
        assert result["eval_accuracy_diff"] <= 2 / 512, api  # at most a borderline image or two may flip
        # Sharded resume: from the step-2 checkpoint on the 4 devices, bit for bit the uninterrupted run.
        assert result["resumed_from"] == 2, api
        assert result["resume_bitwise"], api
        assert result["resume_history_equal"], api


def test_batch_that_does_not_split_evenly_is_refused() -> None:
    config = TrainConfig(batch_size=6, eval_size=8)
    with pytest.raises(ConfigError, match=r"`batch_size` must be a multiple of the number of devices \(4\)"):
        config.check(num_devices=4)
    with pytest.raises(
        ConfigError,
        match=r"`eval_size` must split into 1 chunk\(s\) .* devices \(3\): a multiple of 3, e\.g\. 6; got 8",
    ):
        TrainConfig(batch_size=6, eval_size=8).check(num_devices=3)


def test_empty_device_list_is_refused() -> None:
    with pytest.raises(ValueError, match="`devices` must name at least one device"):
        fit(TrainConfig(), devices=[], progress=False)
