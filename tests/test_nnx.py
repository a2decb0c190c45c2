"""jdynconv.nnx.BranchMixConv: identical to the linen module given the same variables, and trainable."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jdynconv import linen as jl
from jdynconv import nnx as jn
from jdynconv._lowering import im2col


def _linen_and_nnx(attributes: dict[str, Any], x: np.ndarray, **nnx_kwargs: Any):
    """A linen module with random variables and an NNX module loaded with the same values."""
    linen_module = jl.BranchMixConv(**attributes)
    variables = linen_module.init(jax.random.key(0), x, use_running_average=True)
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.5 + 0.1, a.dtype), variables)
    variables["batch_stats"]["var"] = jnp.abs(variables["batch_stats"]["var"]) + 0.5
    nnx_module = jn.BranchMixConv(
        x.shape[-1],
        attributes["features"],
        attributes["kernel_size"],
        attributes["num_branches"],
        **{key: value for key, value in attributes.items() if key not in ("features", "kernel_size", "num_branches")},
        **nnx_kwargs,
        rngs=nnx.Rngs(2),
    )
    for collection in variables.values():
        for name, value in collection.items():
            getattr(nnx_module, name)[...] = value
    return linen_module, variables, nnx_module


CONFIGS = [
    ({"features": 4, "kernel_size": 3, "num_branches": 3}, (6, 6), {"input_shape": (6, 6)}),
    (
        {
            "features": 4,
            "kernel_size": (3,),
            "num_branches": 2,
            "strides": 2,
            "feature_group_count": 2,
            "gate_input": "mean",
        },
        (9,),
        {},
    ),
    (
        {"features": 2, "kernel_size": (1, 3, 3), "num_branches": 4, "use_bias": False, "remat": True},
        (3, 4, 4),
        {"input_shape": (3, 4, 4)},
    ),
]


@pytest.mark.parametrize(("attributes", "spatial", "nnx_kwargs"), CONFIGS)
def test_nnx_equals_linen_in_train_and_eval(attributes: dict, spatial: tuple, nnx_kwargs: dict) -> None:
    x = np.random.default_rng(3).standard_normal((4, *spatial, 2)).astype(np.float32)
    linen_module, variables, nnx_module = _linen_and_nnx(attributes, x, **nnx_kwargs)

    nnx_module.train()
    out_nnx = nnx_module(x)
    out_linen, updates = linen_module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_array_equal(out_nnx, out_linen)
    np.testing.assert_array_equal(nnx_module.mean[...], updates["batch_stats"]["mean"])
    np.testing.assert_array_equal(nnx_module.var[...], updates["batch_stats"]["var"])

    nnx_module.eval()
    variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    np.testing.assert_array_equal(nnx_module(x), linen_module.apply(variables, x, use_running_average=True))
    # eval leaves the statistics alone.
    np.testing.assert_array_equal(nnx_module.mean[...], updates["batch_stats"]["mean"])


def test_nnx_training_step_with_optimizer_under_nnx_jit() -> None:
    x = jnp.asarray(np.random.default_rng(4).standard_normal((8, 8, 8, 3)), jnp.float32)
    model = jn.BranchMixConv(3, 4, 3, 3, input_shape=(8, 8), gate_activation="softmax", rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(model: jn.BranchMixConv, optimizer: nnx.Optimizer, x: jax.Array, temperature: jax.Array) -> jax.Array:
        def loss_fn(model: jn.BranchMixConv) -> jax.Array:
            return jnp.mean(model(x, temperature=temperature) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    model.train()
    before = np.asarray(model.mean[...])
    # A traced temperature: one compiled step serves an annealing schedule.
    losses = [float(step(model, optimizer, x, jnp.float32(t))) for t in (4.0, 3.0, 2.0, 1.0, 1.0)]
    assert losses[-1] < losses[0]
    assert not np.array_equal(before, model.mean[...])


def test_nnx_chunked_equals_linen_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    """``method`` reaches the NNX lowering: chunks of 2 over a batch of 5 give the fused values."""
    attributes = {"features": 4, "kernel_size": 3, "num_branches": 3}
    x = np.random.default_rng(4).standard_normal((5, 6, 6, 2)).astype(np.float32)
    _, variables, nnx_module = _linen_and_nnx({**attributes, "method": "chunked"}, x, input_shape=(6, 6))
    monkeypatch.setattr(im2col, "_CHUNK_BYTES", 2 * 36 * 9 * 2 * 4)  # two samples' im2col patches
    fused = jl.BranchMixConv(**attributes, method="fused")
    expected, updates = fused.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    nnx_module.train()
    # Chunked and fused sum the same float32 products in another order (one rounding apart a term);
    # a wrong chunk or a dropped sample would be O(1).
    np.testing.assert_allclose(nnx_module(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nnx_module.var[...], updates["batch_stats"]["var"], rtol=1e-5)


@pytest.mark.parametrize(
    ("args", "kwargs", "fragments"),
    [
        ((3, 4, 3, 2), {}, ["`input_shape` (the spatial shape", 'gate_input="flatten"']),
        ((3, 4, 3, 2), {"gate_input": "mean"}, ["`kernel_size` 3 is an int", "pass one int per spatial dim"]),
        ((3, 4, (3, 3), 0), {"input_shape": (8, 8)}, ["`num_branches` must be a positive int, got 0"]),
        (
            (3, 4, (3, 3), 2),
            {"input_shape": (8, 8), "feature_group_count": 2},
            ["`in_features` must be a positive int divisible"],
        ),
        ((3, 4, (3, 3), 2), {"input_shape": (8, 8, 8, 8)}, ["`input_shape` must have 1 to 3 spatial dims"]),
        ((3, 4, (3,), 2), {"input_shape": (6, 6)}, ["`kernel_size` must have one entry per spatial dimension (2)"]),
        ((3, 4, (3, 3), 2), {"input_shape": (8, 8), "method": "loop"}, ["`method` must be one of"]),
        ((3, 4, (3, 3), 2), {"input_shape": (8, 8), "method": "fused", "remat": True}, ["`remat=True` runs its own"]),
    ],
)
def test_constructor_errors(args: tuple, kwargs: dict, fragments: list[str]) -> None:
    with pytest.raises(ValueError, match="`") as info:
        jn.BranchMixConv(*args, **kwargs, rngs=nnx.Rngs(0))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_call_errors() -> None:
    model = jn.BranchMixConv(3, 4, 3, 2, input_shape=(8, 8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`inputs` must have 3 channels \(last axis\), got shape \(2, 8, 8, 4\)"):
        model(jnp.ones((2, 8, 8, 4)))
    with pytest.raises(ValueError, match=r"`inputs` must have 2 spatial dims"):
        model(jnp.ones((2, 8, 3)))
    with pytest.raises(ValueError, match=r"give 48 gate features.*built for 192"):
        model(jnp.ones((2, 4, 4, 3)))
    with pytest.raises(ValueError, match=r"`gate_weights` must have shape \(2, 2\)"):
        model(jnp.ones((2, 8, 8, 3)), gate_weights=jnp.ones((2, 4)))
