"""One process of ``benchmarks/scaling.py``: builds the workloads over every process's devices, then times
them on request.

Reads commands from stdin, one a line, and answers each on stdout with ``RESULT <json>``:

* ``time <workload> <calls>``: runs the jitted step ``calls`` times and reports the seconds a call. Every
  process of a multi-process run gets the same command (the step's collectives keep them in step).
* ``quit``.

The batch is split over all devices of all processes (``NamedSharding`` on a one-axis ``Mesh``, parameters
replicated): the data-parallel recipe of docs/training.md, ``jax.jit`` propagating the shardings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jdynconv as jdc
from jdynconv import linen as jl

SIZE, CHANNELS, EXPERTS = 32, 32, 4
WORKLOADS = ("per_sample_conv", "dense_conv", "CondConv", "BranchMixConv")


def _loss_grads(fn: Callable[..., jax.Array], argnums: tuple[int, ...]) -> Callable[..., Any]:
    return jax.value_and_grad(lambda *args: jnp.mean(jnp.square(fn(*args))), argnums=argnums)


def _layer_step(module: nn.Module, x: jax.Array, mutable: list[str], **kwargs: Any) -> tuple[Callable, tuple]:
    variables = module.init(jax.random.key(1), x[:2], **kwargs)
    params, stats = variables["params"], variables.get("batch_stats", {})
    tx = optax.sgd(0.01)

    def step(params: Any, stats: Any, opt_state: Any, x: jax.Array) -> Any:
        def loss(params: Any) -> Any:
            y, updates = module.apply({"params": params, "batch_stats": stats}, x, mutable=mutable, **kwargs)
            return jnp.mean(jnp.square(y)), updates.get("batch_stats", stats)

        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), stats, opt_state, value

    return step, (params, stats, tx.init(params))


def programs(mesh: Mesh, per_device_batch: int) -> dict[str, tuple[Any, tuple[Any, ...]]]:
    """Each workload's jitted step and its arguments, the batch split over ``mesh``'s ``"data"`` axis."""
    batch = per_device_batch * mesh.devices.size
    split, whole = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())

    def generated(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> jax.Array:
        return jax.jit(lambda: scale * jax.random.normal(jax.random.key(seed), shape), out_shardings=split)()

    x = generated((batch, SIZE, SIZE, CHANNELS), 0)
    kernels = generated((batch, 3, 3, CHANNELS, CHANNELS), 1, 0.05)
    shared_kernel = jax.device_put(0.05 * jnp.ones((3, 3, CHANNELS, CHANNELS)), whole)

    def dense(x: jax.Array, w: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    found = {
        "per_sample_conv": (jax.jit(_loss_grads(lambda x, w: jdc.per_sample_conv(x, w), (0, 1))), (x, kernels)),
        "dense_conv": (jax.jit(_loss_grads(dense, (0, 1))), (x, shared_kernel)),
    }
    for name, module, mutable, kwargs in (
        ("CondConv", jl.CondConv(CHANNELS, 3, EXPERTS), [], {}),
        (
            "BranchMixConv",
            jl.BranchMixConv(CHANNELS, 3, EXPERTS, gate_input="mean"),
            ["batch_stats"],
            {"use_running_average": False},
        ),
    ):
        step, state = _layer_step(module, jnp.zeros((2, SIZE, SIZE, CHANNELS)), mutable, **kwargs)
        found[name] = (jax.jit(step), (*jax.device_put(state, whole), x))
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument("--coordinator-address")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    args = parser.parse_args()
    if args.num_processes > 1:
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    calls = {
        name: lambda fn=fn, fn_args=fn_args: jax.block_until_ready(fn(*fn_args))
        for name, (fn, fn_args) in programs(mesh, args.per_device_batch).items()
    }
    for call in calls.values():  # compile and warm up
        call()
        call()
    print("READY", flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "quit":
            break
        _, name, count = command
        started = time.perf_counter()
        for _ in range(int(count)):
            calls[name]()
        seconds = (time.perf_counter() - started) / int(count)
        print("RESULT", json.dumps({"workload": name, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
