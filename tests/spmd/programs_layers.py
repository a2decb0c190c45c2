"""Run in a subprocess with 8 forced CPU devices (see tests/spmd/conftest.py): one SGD training step of every
jdynconv layer with the batch split over the devices and the parameters replicated.

For every case: the bytes produced by all-gather / all-to-all / collective-permute in the per-device program
(``moved``); the element count of the largest array an all-reduce or reduce-scatter produces
(``largest_reduced``) against the largest parameter or statistic (``largest_variable``); and the largest
difference of the step's results (new parameters, batch statistics, loss) from the same step on one device,
relative to each result's largest magnitude (``error``). Prints ``REPORT <json>``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from benchmarks._compiled import moved_bytes, reduced_arrays
from jdynconv import linen as jl
from jdynconv import nnx as jn
from tests.spmd.programs_conv import relative_error

BATCH, SIZE, CHANNELS = 16, 12, 8
TX = optax.sgd(0.1)


class HyperConv(nn.Module):
    """PerSampleConv with kernels predicted from the pooled input (a hypernetwork)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernels = nn.Dense(3 * 3 * CHANNELS * CHANNELS)(jnp.mean(x, axis=(1, 2)))
        return jl.PerSampleConv(CHANNELS, 3)(x, kernels.reshape(x.shape[0], 3, 3, CHANNELS, CHANNELS))


class StyledConv(nn.Module):
    """ModulatedConv with its latents from the pooled input (a style mapping in one line)."""

    up: int = 1
    down: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jl.ModulatedConv(CHANNELS, 3, up=self.up, down=self.down)(x, jnp.mean(x, axis=(1, 2)))


LINEN: dict[str, nn.Module] = {
    "PerSampleConv": HyperConv(),
    "CondConv mix_kernels": jl.CondConv(CHANNELS, 3, 4, mixing="mix_kernels"),
    "CondConv mix_outputs": jl.CondConv(CHANNELS, 3, 4, mixing="mix_outputs"),
    "DynamicConv": jl.DynamicConv(CHANNELS, 3, 4),
    "BranchMixConv fused": jl.BranchMixConv(CHANNELS, 3, 4, method="fused"),
    "BranchMixConv chunked": jl.BranchMixConv(CHANNELS, 3, 4, method="chunked"),
    "BranchMixConv remat": jl.BranchMixConv(CHANNELS, 3, 4, remat=True),
    "ODConv": jl.ODConv(CHANNELS, 3, 4),
    # up=1: one shared conv over the batch (non-fused); up=2: per-sample transposed convs and the FIR filter.
    "ModulatedConv": StyledConv(),
    "ModulatedConv up=2": StyledConv(up=2),
    "ModulatedConv down=2": StyledConv(down=2),
}
STATEFUL = jl.BranchMixConv | jl.ODConv  # BatchNorm statistics in `batch_stats`


def linen_step(module: nn.Module, axis_name: str | None = None) -> Callable[..., Any]:
    """``(params, batch_stats, opt_state, x) -> (params, batch_stats, opt_state, loss)``; with ``axis_name``
    the step runs inside ``shard_map`` and averages the loss's gradients over it."""
    mutable = ["batch_stats"] if isinstance(module, STATEFUL) else []
    kwargs = {"use_running_average": False} if mutable else {}

    def step(params: Any, stats: Any, opt_state: Any, x: jax.Array) -> Any:
        def loss_fn(params: Any) -> Any:
            y, updates = module.apply({"params": params, "batch_stats": stats}, x, mutable=mutable, **kwargs)
            loss = jnp.mean(jnp.square(y - 0.5))
            return (loss if axis_name is None else jax.lax.pmean(loss, axis_name)), updates.get("batch_stats", stats)

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = TX.update(grads, opt_state)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    return step


@functools.cache
def inputs() -> jax.Array:
    """The batch, drawn once for every case."""
    return jax.random.normal(jax.random.key(0), (BATCH, SIZE, SIZE, CHANNELS))


def linen_states(modules: dict[str, nn.Module]) -> dict[str, tuple[Any, Any, Any]]:
    """Each module's parameters, statistics and optimizer state, all initialised by one compiled program.

    Run eagerly, ``init`` compiled every operation of every layer on its own (the subprocess has no compilation
    cache), 40% of this program's time; one program a module would pay XLA's fixed cost of a compilation 15
    times."""

    def init(key: jax.Array, x: jax.Array) -> dict[str, Any]:
        variables = {}
        for name, module in modules.items():
            kwargs = {"use_running_average": False} if isinstance(module, STATEFUL) else {}
            variables[name] = module.init(key, x, **kwargs)
        return variables

    initialised = jax.jit(init)(jax.random.key(1), inputs()[:2])
    return {name: (v["params"], v.get("batch_stats", {}), TX.init(v["params"])) for name, v in initialised.items()}


def case(
    step: Callable[..., Any],
    state: tuple[Any, ...],
    sharded_x: jax.Array,
    place: Callable[[Any], Any],
    expected: Any,
) -> dict:
    """The step with replicated ``state`` (placed by ``place``) and the sharded batch, against ``expected``
    (the step on one device)."""
    compiled = jax.jit(step).lower(*place(state), sharded_x).compile()
    variables = jax.tree.leaves(state[:2])
    return {
        "moved": moved_bytes(compiled),
        "largest_reduced": max((c.largest for c in reduced_arrays(compiled)), default=0),
        "largest_variable": max(v.size for v in variables),
        "error": relative_error(compiled(*place(state), sharded_x), expected),
    }


def nnx_step(graphdef: Any) -> Callable[..., Any]:
    """``(params, rest, x) -> (params, batch statistics, loss)``: one SGD step of the model ``graphdef`` describes."""

    def step(params: Any, rest: Any, x: jax.Array) -> Any:
        model = nnx.merge(graphdef, params, rest)
        loss, grads = nnx.value_and_grad(lambda model: jnp.mean(jnp.square(model(x) - 0.5)))(model)
        new_params = jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(model, nnx.Param), grads)
        return new_params, nnx.state(model, nnx.BatchStat), loss

    return step


@nnx.jit
def nnx_models() -> dict[str, nnx.Module]:
    """The NNX models, built by one compiled program (built eagerly, every operation compiled on its own)."""
    return {
        "CondConv": jn.CondConv(CHANNELS, CHANNELS, (3, 3), 4, rngs=nnx.Rngs(1)),
        "BranchMixConv": jn.BranchMixConv(CHANNELS, CHANNELS, 3, 4, input_shape=(SIZE, SIZE), rngs=nnx.Rngs(1)),
        # One expert, one tap: XLA's shared conv with both attentions on the activations.
        "ODConv 1x1": jn.ODConv(CHANNELS, CHANNELS, (1, 1), 1, rngs=nnx.Rngs(1)),
    }


# Inside the caller's shard_map: BatchNorm combines its statistics over `axis_name`. Each is a LINEN layer
# with `axis_name`, and its reference is that layer's step on one device.
SHARD_MAP: dict[str, nn.Module] = {
    "BranchMixConv fused": jl.BranchMixConv(CHANNELS, 3, 4, axis_name="data", method="fused"),
    "BranchMixConv chunked": jl.BranchMixConv(CHANNELS, 3, 4, axis_name="data", method="chunked"),
    "BranchMixConv remat": jl.BranchMixConv(CHANNELS, 3, 4, axis_name="data", remat=True),
    "ODConv": jl.ODConv(CHANNELS, 3, 4, axis_name="data"),
}


def main() -> None:
    devices = np.asarray(jax.devices())
    assert devices.size == 8, devices
    report: dict[str, Any] = {}
    data = Mesh(devices, ("data",))
    replicate = lambda tree: jax.device_put(tree, NamedSharding(data, PartitionSpec()))  # noqa: E731
    x = jax.device_put(inputs(), NamedSharding(data, PartitionSpec("data")))
    # Both sets of layers initialised by one program (two compiled 0.85 s more).
    states = linen_states({**LINEN, **{f"shard_map {name}": module for name, module in SHARD_MAP.items()}})
    shard_map_states = {name: states.pop(name) for name in list(states) if name.startswith("shard_map ")}
    nnx_steps, nnx_states = {}, {}
    for name, model in nnx_models().items():
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        nnx_steps[name], nnx_states[name] = nnx_step(graphdef), (params, rest)

    # Every step on one device, the references of every sharding mode below: one program computes them all
    # (each is its own computation in it, on the same arguments as alone).
    def references(states: dict[str, Any], nnx_states: dict[str, Any], x: jax.Array) -> dict[str, Any]:
        linen = {name: linen_step(module)(*states[name], x) for name, module in LINEN.items()}
        return linen, {name: nnx_steps[name](*nnx_states[name], x) for name in nnx_steps}

    one_device, nnx_one_device = jax.jit(references)(states, nnx_states, inputs())
    for name, module in LINEN.items():
        report[f"linen {name}"] = case(linen_step(module), states[name], x, replicate, one_device[name])

    # NNX: the same maths behind the other wrapper.
    for name, step in nnx_steps.items():
        report[f"nnx {name}"] = case(step, nnx_states[name], x, replicate, nnx_one_device[name])

    def two_layers(mode: str, x: jax.Array, place: Callable[[Any], Any]) -> None:
        for name in ("CondConv mix_kernels", "BranchMixConv chunked"):
            module = LINEN[name]
            report[f"{mode} {name}"] = case(linen_step(module), states[name], x, place, one_device[name])

    # A 2-D mesh: the batch over "data", replicated over "model".
    data_model = Mesh(devices.reshape(4, 2), ("data", "model"))
    two_layers(
        "mesh (4, 2)",
        jax.device_put(inputs(), NamedSharding(data_model, PartitionSpec("data"))),
        lambda tree: jax.device_put(tree, NamedSharding(data_model, PartitionSpec())),
    )
    # Explicit sharding mode.
    with jax.set_mesh(jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))):
        two_layers(
            "explicit",
            jax.device_put(inputs(), PartitionSpec("data")),
            lambda tree: jax.device_put(tree, PartitionSpec()),
        )

    # Inside the caller's shard_map: BatchNorm combines its statistics over `axis_name`.
    for name, module in SHARD_MAP.items():
        local = jax.shard_map(
            linen_step(module, axis_name="data"),
            mesh=data,
            in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec(), PartitionSpec("data")),
            out_specs=PartitionSpec(),
        )
        state = shard_map_states[f"shard_map {name}"]
        compiled = jax.jit(local).lower(*replicate(state), x).compile()
        report[f"shard_map {name}"] = {
            "moved": moved_bytes(compiled),
            "error": relative_error(compiled(*replicate(state), x), one_device[name]),
        }
    print("REPORT", json.dumps(report))


if __name__ == "__main__":
    main()
