"""Run in a subprocess with 8 forced CPU devices (see tests/spmd/launch.py): per-position convolution with the batch
split over the devices.

Cases: ``per_position_conv`` forward and VJP in one program, 1-D (the blocked kernel-gradient matmuls) and 2-D with
stride 2 (the per-tap reductions), inputs and kernels sharded; one SGD training step of linen ``Involution``
(BatchNorm: the one sum over the batch) and of linen ``DynamicLightweightConv`` with weight dropout (random bits
drawn per shard), parameters replicated. The NNX layers and ``LightweightConv`` run the same sharded core. For every
case: the bytes produced by all-gather / all-to-all / collective-permute per device (``moved``), the largest
all-reduced array against the largest variable (training steps), and the largest difference from the same program
on one device (``error``). A control that must move data: the op applied to the inputs rolled along the batch.
Prints ``REPORT <json>``.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jdynconv
from benchmarks._compiled import moved_bytes
from jdynconv import linen as jl
from tests.spmd.programs_conv import relative_error
from tests.spmd.programs_deformable import TX, normal, training_case, with_vjp

BATCH = 16


def function_cases() -> dict[str, tuple[Any, tuple[jax.Array, ...]]]:
    x1 = normal(0, (BATCH, 24, 8))
    k1 = normal(1, (BATCH, 24, 2, 5))
    x2 = normal(2, (BATCH, 9, 9, 8))
    k2 = normal(3, (BATCH, 5, 5, 2, 3, 3))
    return {
        "1-D causal": (lambda x, k: jdynconv.per_position_conv(x, k, padding="CAUSAL"), (x1, k1)),
        "2-D stride 2": (lambda x, k: jdynconv.per_position_conv(x, k, strides=2, padding=1), (x2, k2)),
    }


def involution_step() -> tuple[Any, tuple[Any, ...], jax.Array]:
    module = jl.Involution(3, strides=2, reduction_ratio=2, group_channels=4)
    x = normal(0, (BATCH, 8, 8, 8))
    variables = module.init(jax.random.key(1), x[:2], use_running_average=False)

    def step(params: Any, stats: Any, opt_state: Any, x: jax.Array) -> Any:
        def loss_fn(params: Any) -> Any:
            y, updates = module.apply(
                {"params": params, "batch_stats": stats}, x, use_running_average=False, mutable=["batch_stats"]
            )
            return jnp.mean(jnp.square(y - 0.5)), updates["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = TX.update(grads, opt_state)
        return jax.tree.map(jnp.add, params, updates), stats, opt_state, loss

    params = variables["params"]
    return step, (params, variables["batch_stats"], TX.init(params)), x


def dynamic_step() -> tuple[Any, tuple[Any, ...], jax.Array]:
    module = jl.DynamicLightweightConv(5, num_heads=2, padding="CAUSAL", weight_softmax=True, weight_dropout=0.2)
    x = normal(0, (BATCH, 24, 8))
    params = module.init(jax.random.key(1), x[:2], deterministic=True)["params"]

    def step(params: Any, stats: Any, opt_state: Any, x: jax.Array) -> Any:
        def loss_fn(params: Any) -> Any:
            y = module.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(7)})
            return jnp.mean(jnp.square(y - 0.5))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = TX.update(grads, opt_state)
        return jax.tree.map(jnp.add, params, updates), stats, opt_state, loss

    return step, (params, {}, TX.init(params)), x


def main() -> None:
    devices = np.asarray(jax.devices())
    assert devices.size == 8, devices
    mesh = Mesh(devices, ("data",))
    shard = lambda a: jax.device_put(a, NamedSharding(mesh, PartitionSpec("data")))  # noqa: E731
    replicate = lambda tree: jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))  # noqa: E731
    report: dict[str, Any] = {}
    for name, (fn, args) in function_cases().items():
        placed = [shard(a) for a in args]
        compiled = jax.jit(with_vjp(fn)).lower(*placed).compile()
        report[f"{name} fwd+bwd"] = {
            "moved": moved_bytes(compiled),
            "error": relative_error(compiled(*placed), jax.jit(with_vjp(fn))(*args)),
        }
    fn, (x, k) = function_cases()["1-D causal"]
    rolled = jax.jit(lambda x, k: fn(jnp.roll(x, 1, axis=0), k)).lower(shard(x), shard(k)).compile()
    report["control: inputs rolled along the batch"] = {"moved": moved_bytes(rolled)}
    for name, make in (("Involution batch norm", involution_step), ("DynamicLightweightConv dropout", dynamic_step)):
        step, state, x = make()
        report[f"linen {name}"] = training_case(step, state, shard(x), replicate, x)
    print("REPORT", json.dumps(report))


if __name__ == "__main__":
    main()
