"""Data parallelism: a training run sharded over 4 (virtual CPU) devices equals the 1-device run.

XLA fixes the CPU device count at start-up, so the comparison runs in a subprocess with
``--xla_force_host_platform_device_count=4``; it trains the same configuration on ``jax.devices()[:1]``
and on all four, and reports the largest differences of parameters and batch statistics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from trainer.loop import ConfigError, TrainConfig, fit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

SCRIPT = """
import json, sys
import jax, numpy as np
from trainer.loop import TrainConfig, fit, make_trainer
from trainer.sharding import batch_split, data_mesh

def leaves(tree):
    return {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}

report = {"devices": jax.device_count()}
mesh = data_mesh()
batch = jax.jit(lambda: jax.numpy.zeros((16, 4)), out_shardings=batch_split(mesh))()
report["batch_shard_rows"] = sorted(int(s.data.shape[0]) for s in batch.addressable_shards)
for api in ("linen", "nnx"):
    config = TrainConfig(api=api, steps=3, batch_size=16, eval_every=3, eval_size=16)
    initial = leaves(make_trainer(config, data_mesh(jax.devices()[:1])).variables())
    single = leaves(fit(config, devices=jax.devices()[:1], progress=False).trainer.variables())
    sharded = fit(config, progress=False)
    variables = leaves(sharded.trainer.variables())
    report[api] = {
        "num_devices": sharded.num_devices,
        "replicated_on": sorted({len(v.sharding.device_set) for v in variables.values()}),
        "keys_equal": sorted(single) == sorted(variables),
        "max_abs_diff": max(float(np.max(np.abs(np.asarray(variables[k]) - np.asarray(single[k])))) for k in single),
        "max_abs_value": max(float(np.max(np.abs(np.asarray(single[k])))) for k in single),
        "moved_from_init": max(float(np.max(np.abs(np.asarray(single[k]) - np.asarray(initial[k])))) for k in single),
    }
print("REPORT", json.dumps(report))
"""


@pytest.fixture(scope="module")
def report() -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLES), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


def test_subprocess_has_four_devices_and_splits_the_batch(report: dict) -> None:
    assert report["devices"] == 4
    assert report["batch_shard_rows"] == [4, 4, 4, 4]


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_sharded_run_equals_single_device_run(report: dict, api: str) -> None:
    result = report[api]
    assert result["num_devices"] == 4
    assert result["replicated_on"] == [4]  # every parameter and statistic lives on all four devices
    assert result["keys_equal"]
    assert result["moved_from_init"] > 1e-3  # training changed the variables: the comparison means something
    # float32: the all-reduced sums add in another order than one device's; 3 AdamW steps.
    assert result["max_abs_diff"] <= 1e-5 * max(1.0, result["max_abs_value"]), result


def test_batch_that_does_not_split_evenly_is_refused() -> None:
    config = TrainConfig(batch_size=6, eval_size=8)
    with pytest.raises(ConfigError, match=r"`batch_size` must be a multiple of the number of devices \(4\)"):
        config.check(num_devices=4)
    with pytest.raises(ConfigError, match=r"`eval_size` must be a multiple of the number of devices \(3\)"):
        TrainConfig(batch_size=6, eval_size=8).check(num_devices=3)


def test_empty_device_list_is_refused() -> None:
    with pytest.raises(ValueError, match="`devices` must name at least one device"):
        fit(TrainConfig(), devices=[], progress=False)
