"""Run in a subprocess with 8 forced CPU devices (see tests/spmd/conftest.py): compiles ``per_sample_conv``
with the batch split over the devices and reports what each device's program moves and holds.

For every case: the bytes produced by all-gather / all-to-all / collective-permute in the per-device program
(``moved``), and but for forward-only programs the largest difference from the same function on one device
(``error``, relative to the largest magnitude of the 1-device result). Prints ``REPORT <json>``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

import jdynconv as jdc
from benchmarks._compiled import moved_bytes, temp_bytes
from jdynconv import _lowering
from jdynconv._lowering import methods

BATCH = 16  # 2 samples a device on 8 devices

# name: inputs shape, kernels shape, keyword arguments; B = BATCH in front of both.
SHAPES: dict[str, tuple[tuple[int, ...], tuple[int, ...], dict[str, Any]]] = {
    "1d channels first": ((8, 64), (16, 8, 5), {"data_format": "channels_first", "kernel_dilation": 2}),
    "2d": ((16, 16, 24), (3, 3, 24, 24), {"strides": 2}),
    "2d grouped channels first": (
        (24, 12, 12),
        (24, 12, 3, 3),
        {"data_format": "channels_first", "feature_group_count": 2},
    ),
    "3d": ((6, 6, 6, 8), (3, 3, 3, 8, 12), {"padding": "VALID"}),
    "2d depthwise": ((16, 16, 32), (3, 3, 1, 32), {"feature_group_count": 32}),
    "2d depthwise channels first": (
        (32, 16, 16),
        (32, 1, 3, 3),
        {"feature_group_count": 32, "data_format": "channels_first"},
    ),
}


def arrays(name: str, batch: int = BATCH) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standard normal inputs, kernels (scaled by 0.2) and biases, float32, on the host.

    Drawn by NumPy: ``jax.random``, called eagerly, compiled its programs for every shape (the subprocess
    has no compilation cache), a quarter of this program's time, and ``device_put`` splits host arrays
    without a resharding program."""
    x_shape, w_shape, _ = SHAPES[name]
    rng = np.random.default_rng(0)
    out_channels = w_shape[0] if SHAPES[name][2].get("data_format") == "channels_first" else w_shape[-1]
    return (
        rng.standard_normal((batch, *x_shape), np.float32),
        rng.standard_normal((batch, *w_shape), np.float32) * np.float32(0.2),
        rng.standard_normal((batch, out_channels), np.float32),
    )


def conv(name: str, method: str = "auto") -> Callable[..., jax.Array]:
    kwargs = SHAPES[name][2]
    return lambda x, w, b: jdc.per_sample_conv(x, w, b, method=method, **kwargs)


def value_and_grads(fn: Callable[..., jax.Array]) -> Callable[..., Any]:
    def loss(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.sum(jnp.sin(fn(x, w, b)))

    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def relative_error(actual: Any, expected: Any) -> float:
    """The largest difference of each leaf relative to its largest 1-device magnitude, or to 1e-3 of the largest
    magnitude of all leaves where that is more: a quantity that is zero in exact arithmetic (the gradient of a
    conv bias that BatchNorm follows, ~1e-9 here) is rounding noise on both sides, and its own relative error
    means nothing. The smallest real quantity compared (BatchNorm's running mean after one step) is 1.2e-3 of
    the largest."""
    pairs = [
        (np.asarray(a, np.float64), np.asarray(e, np.float64))
        for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
    ]
    floor = 1e-3 * max(float(np.abs(e).max(initial=0.0)) for _, e in pairs)
    return max(float(np.abs(a - e).max(initial=0.0)) / max(float(np.abs(e).max(initial=0.0)), floor) for a, e in pairs)


def split(mesh: Mesh, spec: PartitionSpec, *xs: np.ndarray) -> tuple[jax.Array, ...]:
    return tuple(jax.device_put(x, NamedSharding(mesh, spec)) for x in xs)


def case(fn: Callable[..., Any], sharded: tuple[jax.Array, ...], expected: Any) -> dict[str, Any]:
    """``fn`` on the sharded arrays against ``expected`` (``fn`` on one device)."""
    compiled = jax.jit(fn).lower(*sharded).compile()
    return {"moved": moved_bytes(compiled), "error": relative_error(compiled(*sharded), expected)}


def one_device(cases: dict[str, tuple[Callable[..., Any], tuple[np.ndarray, ...]]]) -> dict[str, Any]:
    """Each case's function on its arrays on one device: the references. One compiled program computes them
    all, each case an independent computation on its own arguments, as it would be alone: compiled one by
    one (the subprocess has no compilation cache), XLA's fixed cost of a compilation came 17 times."""
    return jax.jit(lambda args: {name: fn(*args[name]) for name, (fn, _) in cases.items()})(
        {name: single for name, (_, single) in cases.items()}
    )


def main() -> None:
    devices = np.asarray(jax.devices())
    assert devices.size == 8, devices
    data = Mesh(devices, ("data",))
    data_model = Mesh(devices.reshape(4, 2), ("data", "model"))
    report: dict[str, Any] = {}
    # name: the function, its arrays split over "data", the same arrays for one device
    cases: dict[str, tuple[Callable[..., Any], tuple[jax.Array, ...], tuple[np.ndarray, ...]]] = {}

    # Every shape and layout, value and value + gradients, with `auto`.
    for name in SHAPES:
        single = arrays(name)
        sharded = split(data, PartitionSpec("data"), *single)
        # The forward's values are also the first output of the value-and-gradients program below.
        report[f"{name} forward"] = {"moved": moved_bytes(jax.jit(conv(name)).lower(*sharded).compile())}
        cases[f"{name} value and gradients"] = (value_and_grads(conv(name)), sharded, single)

    # Every method, through the same mechanism.
    for method in _lowering.LOWERINGS:
        name = "2d depthwise" if method == "depthwise" else "2d"
        single = arrays(name)
        sharded = split(data, PartitionSpec("data"), *single)
        cases[f"method {method} value and gradients"] = (value_and_grads(conv(name, method)), sharded, single)

    # Every derivative: forward mode, second order, an outer vmap.
    single = arrays("2d")
    sharded = split(data, PartitionSpec("data"), *single)
    f = conv("2d")
    cases["jvp"] = (lambda x, w, b: jax.jvp(f, (x, w, b), (jnp.cos(x), w, b)), sharded, single)

    def grad_of_grad(x: jax.Array, w: jax.Array, b: jax.Array) -> Any:
        inner = jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w, b))))
        return jax.grad(lambda w: jnp.sum(inner(x, w) ** 2))(w)

    cases["grad of grad"] = (grad_of_grad, sharded, single)
    stacked = tuple(np.stack([a, 2 * a]) for a in single)
    cases["outer vmap"] = (jax.vmap(value_and_grads(f)), split(data, PartitionSpec(None, "data"), *stacked), stacked)

    # The check can fail: a lowering called without the mechanism gathers the batch.
    spec = jdc.functional.conv_spec((16, 16), (3, 3), **_spec_arguments(strides=2))
    cases["control: bare vmap lowering"] = (lambda x, w, b: methods.conv_vmap(x, w, spec), sharded, single)

    references = one_device({name: (fn, single) for name, (fn, _, single) in cases.items()})
    for name, (fn, sharded, _) in cases.items():
        report[name] = case(fn, sharded, references[name])

    # A 2-D mesh, the batch over "data" and replicated over "model"; the same 1-device values as below:
    # value_and_grads(f) on arrays("2d") is the "2d value and gradients" case.
    expected = references["2d value and gradients"]
    report["mesh (4, 2), batch over data"] = case(
        value_and_grads(f), split(data_model, PartitionSpec("data"), *single), expected
    )
    # Explicit sharding mode.
    explicit = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(explicit):
        on_mesh = tuple(jax.device_put(a, PartitionSpec("data")) for a in single)
        report["explicit mode"] = case(value_and_grads(f), on_mesh, expected)

    # Inside the caller's shard_map: local shapes.
    def local_step(x: jax.Array, w: jax.Array, b: jax.Array) -> Any:
        loss, grads = value_and_grads(f)(x, w, b)
        return jax.lax.psum(loss, "data"), grads

    mapped = jax.shard_map(
        local_step, mesh=data, in_specs=PartitionSpec("data"), out_specs=(PartitionSpec(), PartitionSpec("data"))
    )
    report["inside shard_map"] = case(mapped, sharded, expected)

    # Memory: per-device scratch of the 8-device program against the 1-device one, at 8 x 16 samples.
    single = arrays("2d", batch=128)
    program = jax.jit(value_and_grads(conv("2d")))
    report["temp bytes"] = {
        "1 device": temp_bytes(program.lower(*single).compile()),
        "8 devices": temp_bytes(program.lower(*split(data, PartitionSpec("data"), *single)).compile()),
    }
    print("REPORT", json.dumps(report))


def _spec_arguments(**given: Any) -> dict[str, Any]:
    defaults = {"strides": 1, "padding": "SAME", "kernel_dilation": 1, "input_dilation": 1, "feature_group_count": 1}
    return {**defaults, **given}


if __name__ == "__main__":
    main()
