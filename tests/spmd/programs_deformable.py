"""Run in a subprocess with 8 forced CPU devices (see tests/spmd/launch.py): deformable convolution with the
batch split over the devices.

Cases: ``deform_conv`` (with a mask) and ``dcnv3``, forward and VJP w.r.t. every argument in one program, with
every batched argument sharded; one SGD training step of each deformable layer (linen: DCNv3 with BatchNorm,
whose statistics are the one sum over the batch, and its centre feature scale) with the parameters replicated.
The NNX layers, ``channels_first`` and DCNv3's LayerNorm run the same sharded core and are left out, for CI's
time. For every case: the bytes produced by all-gather / all-to-all /
collective-permute in the per-device program (``moved``), the largest all-reduced array against the largest
variable (training steps), and the largest difference from the same program on one device (``error``, as
tests/spmd/programs_conv.py).
A control: the sampling primitive called without the batch-parallel wrapper. Prints ``REPORT <json>``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jdynconv
from benchmarks._compiled import moved_bytes, reduced_arrays
from jdynconv import _sampling
from jdynconv import linen as jl
from tests.spmd.programs_conv import relative_error

BATCH, SIZE, CHANNELS, GROUPS = 16, 8, 8, 2
TX = optax.sgd(0.1)


def normal(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> jax.Array:
    return scale * jax.random.normal(jax.random.key(seed), shape)


def function_cases() -> dict[str, tuple[Callable[..., Any], tuple[jax.Array, ...], int]]:
    """name -> (function, arguments, how many leading arguments are batched)."""
    x = normal(0, (BATCH, SIZE, SIZE, CHANNELS))
    kernel = normal(1, (3, 3, CHANNELS // GROUPS, CHANNELS), 0.2)
    offsets = normal(2, (BATCH, SIZE, SIZE, GROUPS * 9 * 2), 1.5)
    mask = jax.nn.sigmoid(normal(3, (BATCH, SIZE, SIZE, GROUPS * 9)))
    conv = dict(padding=1, feature_group_count=GROUPS)
    return {
        "deform_conv mask": (
            lambda x, o, m, k: jdynconv.deform_conv(x, o, k, mask=m, **conv),
            (x, offsets, mask, kernel),
            3,
        ),
        "dcnv3": (
            lambda x, o, m: jdynconv.dcnv3(x, o, m, kernel_size=3, padding=1, groups=GROUPS),
            (x, offsets, jax.nn.softmax(mask.reshape(*mask.shape[:-1], GROUPS, 9), -1).reshape(mask.shape)),
            3,
        ),
    }


def with_vjp(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``'s output and its VJP w.r.t. every argument for the cotangent ``sin(output)``."""

    def both(*args: jax.Array) -> Any:
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(jnp.sin(out))

    return both


LINEN: dict[str, nn.Module] = {
    "DeformConv": jl.DeformConv(CHANNELS, (3, 3), feature_group_count=GROUPS, offset_groups=GROUPS, use_mask=True),
    "DCNv3 batch norm": jl.DCNv3(CHANNELS, groups=GROUPS, norm="batch", center_feature_scale=True),
}


def linen_step(module: nn.Module) -> Callable[..., Any]:
    batch_norm = getattr(module, "norm", None) == "batch"
    mutable = ["batch_stats"] if batch_norm else []
    kwargs = {"use_running_average": False} if batch_norm else {}

    def step(params: Any, stats: Any, opt_state: Any, x: jax.Array) -> Any:
        def loss_fn(params: Any) -> Any:
            y, updates = module.apply({"params": params, "batch_stats": stats}, x, mutable=mutable, **kwargs)
            return jnp.mean(jnp.square(y - 0.5)), updates.get("batch_stats", stats)

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = TX.update(grads, opt_state)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    return step


def linen_state(module: nn.Module) -> tuple[Any, Any, Any]:
    kwargs = {"use_running_average": False} if getattr(module, "norm", None) == "batch" else {}
    variables = module.init(jax.random.key(1), normal(0, (2, SIZE, SIZE, CHANNELS)), **kwargs)
    # Offsets, masks and the centre-feature scale start at zero; random values make the sampling non-trivial.
    params = jax.tree.map(lambda p: p + 0.1 * normal(5, p.shape), variables["params"])
    return params, variables.get("batch_stats", {}), TX.init(params)


def training_case(
    step: Callable[..., Any],
    state: tuple[Any, ...],
    x: jax.Array,
    place: Callable[[Any], Any],
    unsharded: jax.Array | None = None,
) -> dict:
    """``unsharded``: ``x`` on one device (default: this file's input)."""
    compiled = jax.jit(step).lower(*place(state), x).compile()
    expected = jax.jit(step)(*state, normal(0, (BATCH, SIZE, SIZE, CHANNELS)) if unsharded is None else unsharded)
    return {
        "moved": moved_bytes(compiled),
        "largest_reduced": max((c.largest for c in reduced_arrays(compiled)), default=0),
        "largest_variable": max(v.size for v in jax.tree.leaves(state[:2])),
        "error": relative_error(compiled(*place(state), x), expected),
    }


def main() -> None:
    devices = np.asarray(jax.devices())
    assert devices.size == 8, devices
    mesh = Mesh(devices, ("data",))
    shard = lambda a: jax.device_put(a, NamedSharding(mesh, PartitionSpec("data")))  # noqa: E731
    replicate = lambda tree: jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))  # noqa: E731
    report: dict[str, Any] = {}

    for name, (fn, args, batched) in function_cases().items():
        placed = [shard(a) if i < batched else replicate(a) for i, a in enumerate(args)]
        # The forward and its VJP in one program (the forward alone is a part of it).
        compiled = jax.jit(with_vjp(fn)).lower(*placed).compile()
        report[f"{name} fwd+bwd"] = {
            "moved": moved_bytes(compiled),
            "error": relative_error(compiled(*placed), jax.jit(with_vjp(fn))(*args)),
        }

    # Control: the primitive without the wrapper; XLA's partitioner gathers the batch for the row gathers.
    x = normal(0, (BATCH, SIZE, SIZE, GROUPS, CHANNELS // GROUPS))
    positions = normal(4, (BATCH, SIZE * SIZE, 9, GROUPS, 2), 3.0) + SIZE / 2
    compiled = jax.jit(_sampling.sample).lower(shard(x), shard(positions)).compile()
    report["control: sampling without map_batch_shards"] = {"moved": moved_bytes(compiled)}

    x = shard(normal(0, (BATCH, SIZE, SIZE, CHANNELS)))
    for name, module in LINEN.items():
        report[f"linen {name}"] = training_case(linen_step(module), linen_state(module), x, replicate)
    print("REPORT", json.dumps(report))


if __name__ == "__main__":
    main()
