"""PerSampleConv, CondConv and DynamicConv (linen and NNX) against float64 references written per sample."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdynconv as jdc
from jdynconv import _kernel_mix
from jdynconv import linen as jl
from jdynconv import nnx as jn
from tests import reference
from tests.helpers import F32_RTOL, assert_close


def _random_params(variables: dict[str, Any], seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.5, a.dtype), variables)


def _expected(x: np.ndarray, routing: np.ndarray, params: dict[str, Any], geo: reference.Geometry) -> np.ndarray:
    """Mix each sample's kernel and bias in float64, then the direct-definition conv."""
    routing = np.asarray(routing, np.float64)
    bank = np.asarray(params["kernel"], np.float64)
    kernels = np.einsum("bk,k...->b...", routing, bank)
    bias = routing @ np.asarray(params["bias"], np.float64) if "bias" in params else None
    return reference.conv(x, kernels, bias, geo)


CONFIGS = [
    # (spatial, C_in, attributes (features, kernel_size, num_experts, ...), geometry)
    ((8, 8), 4, {"features": 6, "kernel_size": (3, 3), "num_experts": 3}, reference.Geometry.simple(2, padding=1)),
    (
        (9, 7),
        4,
        {"features": 6, "kernel_size": (3, 3), "num_experts": 4, "strides": 2, "padding": 1, "feature_group_count": 2},
        reference.Geometry.simple(2, padding=1, stride=2, groups=2),
    ),
    (
        (10,),
        3,
        {"features": 2, "kernel_size": (3,), "num_experts": 2, "padding": "VALID"},
        reference.Geometry.simple(1),
    ),
    (
        (4, 5, 4),
        2,
        {"features": 3, "kernel_size": (3, 3, 3), "num_experts": 2, "use_bias": False, "padding": 1},
        reference.Geometry.simple(3, padding=1),
    ),
]


@pytest.mark.parametrize("mixing", ["mix_kernels", "mix_outputs", "auto"])
@pytest.mark.parametrize(("spatial", "in_features", "attributes", "geometry"), CONFIGS)
def test_cond_conv_matches_reference(spatial, in_features, attributes, geometry, mixing: str) -> None:
    x = np.random.default_rng(0).standard_normal((3, *spatial, in_features)).astype(np.float32)
    module = jl.CondConv(**attributes, mixing=mixing)
    variables = _random_params(module.init(jax.random.key(0), x), seed=1)
    params = {name: np.asarray(value, np.float64) for name, value in variables["params"].items()}
    pooled = x.astype(np.float64).mean(axis=tuple(range(1, x.ndim - 1)))
    routing = 1 / (1 + np.exp(-(pooled @ params["routing_kernel"] + params["routing_bias"])))
    out = jax.jit(module.apply)(variables, x)
    assert_close(out, _expected(x, routing, params, geometry), F32_RTOL)
    # External routing weights, as timm's CondConv2d takes them.
    given = np.random.default_rng(2).uniform(size=(3, attributes["num_experts"])).astype(np.float32)
    assert_close(module.apply(variables, x, given), _expected(x, given, params, geometry), F32_RTOL)


@pytest.mark.parametrize("temperature", [30.0, 1.0, 0.5])
@pytest.mark.parametrize("mixing", ["mix_kernels", "mix_outputs"])
@pytest.mark.parametrize(("spatial", "in_features", "attributes", "geometry"), CONFIGS[:3])
def test_dynamic_conv_matches_reference(
    spatial, in_features, attributes, geometry, mixing: str, temperature: float
) -> None:
    x = np.random.default_rng(3).standard_normal((3, *spatial, in_features)).astype(np.float32)
    module = jl.DynamicConv(**attributes, mixing=mixing)
    variables = _random_params(module.init(jax.random.key(0), x), seed=4)
    params = {name: np.asarray(value, np.float64) for name, value in variables["params"].items()}
    assert params["attention_hidden_kernel"].shape == (in_features, int(in_features * 0.25) + 1)
    pooled = x.astype(np.float64).mean(axis=tuple(range(1, x.ndim - 1)))
    logits = (
        np.maximum(pooled @ params["attention_hidden_kernel"], 0) @ params["attention_kernel"]
        + params["attention_bias"]
    )
    attention = np.exp(logits / temperature - (logits / temperature).max(1, keepdims=True))
    attention /= attention.sum(1, keepdims=True)
    out = jax.jit(module.apply)(variables, x, jnp.float32(temperature))
    assert_close(out, _expected(x, attention, params, geometry), F32_RTOL)


@pytest.mark.parametrize("layer", ["cond", "dynamic"])
def test_mixing_lowerings_agree_on_gradients(layer: str) -> None:
    x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 7, 7, 4)), jnp.float32)
    grads = {}
    for mixing in ("mix_kernels", "mix_outputs"):
        cls = jl.CondConv if layer == "cond" else jl.DynamicConv
        module = cls(6, 3, 3, feature_group_count=2, strides=2, mixing=mixing)
        variables = _random_params(module.init(jax.random.key(0), x), seed=6)
        grads[mixing] = jax.jit(jax.grad(lambda v, x, m=module: jnp.sum(jnp.sin(m.apply(v, x))), argnums=(0, 1)))(
            variables, x
        )
    for (path, a), b in zip(
        jax.tree.leaves_with_path(grads["mix_kernels"]), jax.tree.leaves(grads["mix_outputs"]), strict=True
    ):
        assert_close(a, b, 1e-5, jax.tree_util.keystr(path))


def test_auto_mixing_rule() -> None:
    # k experts: mixing outputs costs k*B*P; mixing kernels overhead*B*P + B*k.
    assert _kernel_mix.choose_mixing("cpu", 1, 64, 1024) == "mix_outputs"
    assert _kernel_mix.choose_mixing("cpu", 2, 64, 1024) == "mix_outputs"
    assert _kernel_mix.choose_mixing("cpu", 4, 64, 1024) == "mix_kernels"
    assert _kernel_mix.choose_mixing("gpu", 2, 64, 1024) == "mix_kernels"


def test_per_sample_conv_layer_matches_the_function() -> None:
    x = np.random.default_rng(7).standard_normal((3, 9, 4)).astype(np.float32)
    kernels = np.random.default_rng(8).standard_normal((3, 3, 2, 6)).astype(np.float32)
    bias = np.random.default_rng(9).standard_normal((3, 6)).astype(np.float32)
    layer = jl.PerSampleConv(6, 3, strides=2, feature_group_count=2)
    expected = jdc.per_sample_conv(x, kernels, bias, strides=2, feature_group_count=2)
    np.testing.assert_array_equal(layer.apply({}, x, kernels, bias), expected)
    np.testing.assert_array_equal(
        jn.PerSampleConv(4, 6, (3,), strides=2, feature_group_count=2)(x, kernels, bias), expected
    )


def test_per_sample_conv_layer_checks_kernels_against_attributes() -> None:
    layer = jl.PerSampleConv(6, (3, 3))
    x = np.ones((2, 5, 5, 4), np.float32)
    with pytest.raises(ValueError, match=r"`kernels` must have shape \(2, 3, 3, 4, 6\).*got shape \(2, 3, 3, 4, 5\)"):
        layer.apply({}, x, np.ones((2, 3, 3, 4, 5), np.float32))
    with pytest.raises(ValueError, match=r"`bias` must have shape \(2, 6\) or \(6,\), got shape \(3,\)"):
        layer.apply({}, x, np.ones((2, 3, 3, 4, 6), np.float32), np.ones(3, np.float32))


@pytest.mark.parametrize("cls", [jl.CondConv, jl.DynamicConv])
def test_linen_and_nnx_are_equal(cls) -> None:
    x = np.random.default_rng(10).standard_normal((3, 6, 6, 4)).astype(np.float32)
    module = cls(6, (3, 3), 3, feature_group_count=2)
    variables = _random_params(module.init(jax.random.key(0), x), seed=11)
    twin = (jn.CondConv if cls is jl.CondConv else jn.DynamicConv)(
        4, 6, (3, 3), 3, feature_group_count=2, rngs=nnx.Rngs(0)
    )
    for name, value in variables["params"].items():
        getattr(twin, name)[...] = value
    np.testing.assert_array_equal(twin(x), module.apply(variables, x))


def test_temperature_is_a_traced_call_argument_and_schedule() -> None:
    x = jnp.asarray(np.random.default_rng(12).standard_normal((2, 5, 5, 3)), jnp.float32)
    module = jl.DynamicConv(4, 3, 4)
    variables = module.init(jax.random.key(0), x)
    apply = jax.jit(module.apply)
    outs = [apply(variables, x, jdc.temperature_schedule(step, anneal_steps=10)) for step in (0, 5, 10, 20)]
    assert apply._cache_size() == 1  # one compiled program for the whole schedule
    assert not np.allclose(outs[0], outs[2])
    np.testing.assert_array_equal(outs[2], outs[3])  # constant after annealing
    np.testing.assert_allclose(
        [float(jdc.temperature_schedule(s, anneal_steps=10)) for s in (0, 5, 10, 99)], [30.0, 15.5, 1.0, 1.0]
    )


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), (1.0, 2.0)])
def test_non_positive_temperature_is_refused_when_concrete(bad: Any) -> None:
    module = jl.DynamicConv(4, 3, 2)
    x = np.ones((2, 5, 5, 3), np.float32)
    variables = module.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="`temperature` must be a positive finite scalar"):
        module.apply(variables, x, bad)


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: jl.CondConv(4, 3, 0), "`num_experts` must be a positive int, got 0"),
        (lambda: jl.CondConv(4, 3, 2, mixing="fast"), "`mixing` must be one of"),
        (lambda: jl.CondConv(5, 3, 2, feature_group_count=3), "`features` (=5) must be divisible"),
        (lambda: jl.DynamicConv(4, (3, 3, 3), 2), "`kernel_size` must have one entry per spatial dimension (2)"),
    ],
)
def test_bad_attributes(build, fragment: str) -> None:
    # Attribute errors come at construction, those that need the inputs at the call: both inside the check.
    with pytest.raises(ValueError, match="`") as info:
        build().init(jax.random.key(0), np.ones((2, 5, 5, 3), np.float32))
    assert fragment in str(info.value), str(info.value)


def test_bad_call_arguments() -> None:
    x = np.ones((2, 5, 5, 3), np.float32)
    cond = jl.CondConv(4, 3, 2)
    dynamic = jl.DynamicConv(4, 3, 2)
    cond_vars, dynamic_vars = cond.init(jax.random.key(0), x), dynamic.init(jax.random.key(0), x)
    with pytest.raises(
        ValueError, match=r"`routing_weights` must have shape \(2, 2\) \(batch, num_experts\), got shape \(2, 3\)"
    ):
        cond.apply(cond_vars, x, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"`attention_weights` must have shape \(2, 2\)"):
        dynamic.apply(dynamic_vars, x, 1.0, jnp.ones((3, 2)))
    with pytest.raises(ValueError, match=r"`inputs` must have rank 4 .* built for, got shape \(5, 3\)"):
        cond.apply(cond_vars, x[0, 0])


def test_nnx_constructor_errors() -> None:
    with pytest.raises(ValueError, match="`kernel_size` 3 is an int"):
        jn.CondConv(3, 4, 3, 2, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"`in_features` must be a positive int divisible by `feature_group_count` \(=2\)"
    ):
        jn.DynamicConv(3, 4, (3, 3), 2, feature_group_count=2, rngs=nnx.Rngs(0))
    model = jn.CondConv(3, 4, (3, 3), 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`inputs` must have rank 4 \(B, \*spatial, C_in\) with 2 spatial dims"):
        model(jnp.ones((2, 5, 3)))


def test_per_sample_conv_layer_input_dilation() -> None:
    x = np.arange(5, dtype=np.float32).reshape(1, 5, 1)
    kernels = np.ones((1, 1, 1, 1), np.float32)
    expected = jdc.per_sample_conv(x, kernels, padding="VALID", input_dilation=2)
    assert expected.shape == (1, 9, 1)
    linen_layer = jl.PerSampleConv(1, 1, input_dilation=2, padding="VALID")
    np.testing.assert_array_equal(linen_layer.apply({}, x, kernels), expected)
    np.testing.assert_array_equal(jn.PerSampleConv(1, 1, (1,), input_dilation=2, padding="VALID")(x, kernels), expected)


def test_method_is_checked_whatever_the_mixing() -> None:
    x = np.ones((2, 5, 5, 3), np.float32)
    # k = 2 on CPU picks mix_outputs, which never calls per_sample_conv: the typo must still be caught.
    with pytest.raises(ValueError, match=r"`method` must be one of .*'typo'"):
        jl.CondConv(4, 3, 2, method="typo").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"`method` must be one of .*'typo'"):
        jn.DynamicConv(3, 4, (3, 3), 2, mixing="mix_outputs", method="typo", rngs=nnx.Rngs(0))


def test_dynamic_conv_temperature_attribute_is_the_call_default() -> None:
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 3)).astype(np.float32)
    module = jl.DynamicConv(4, 3, 2, temperature=4.0)
    variables = module.init(jax.random.key(0), x)
    np.testing.assert_array_equal(module.apply(variables, x), module.apply(variables, x, 4.0))
    assert not np.array_equal(module.apply(variables, x), module.apply(variables, x, 1.0))
    # The attribute came last, so positional construction keeps its meaning (the fifth is strides).
    assert jl.DynamicConv(4, 3, 2, 0.25, 2).strides == 2
    model = jn.DynamicConv(3, 4, (3, 3), 2, temperature=4.0, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(model(x), model(x, 4.0))
    with pytest.raises(ValueError, match=r"`temperature` must be a positive finite scalar, got 0\.0"):
        jl.DynamicConv(4, 3, 2, temperature=0.0)
    with pytest.raises(ValueError, match=r"`temperature` must be a positive finite scalar, got -2\.0"):
        jn.DynamicConv(3, 4, (3, 3), 2, temperature=-2.0, rngs=nnx.Rngs(0))


def test_scalar_attributes_may_be_numpy_or_jax_scalars_and_schedules_traced() -> None:
    # Attributes given as 0-d arrays (a config read with NumPy or JAX) are numbers like any other.
    assert jl.DynamicConv(4, 3, 2, ratio=jnp.float32(0.5)).ratio == 0.5
    assert jl.BranchMixConv(4, 3, 2, momentum=np.float32(0.9)).momentum == np.float32(0.9)
    # A schedule swept over its start under jit: traced values are the caller's to keep positive.
    swept = jax.jit(lambda start: jdc.temperature_schedule(5, start=start, anneal_steps=10))(jnp.float32(31.0))
    np.testing.assert_allclose(swept, 16.0, rtol=1e-6)
    with pytest.raises(TypeError, match="`start` must be a finite number > 0"):
        jdc.temperature_schedule(5, start="30", anneal_steps=10)
