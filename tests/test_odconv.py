"""ODConv (linen and NNX) against a float64 NumPy reference written as the definition, plus its rules and errors.

The reference computes the original's formula directly: ``out[b] = filter[b] * conv(channel[b] * x[b],
spatial[b] * sum_n expert[b, n] * kernel[n])`` with the four attentions from ``relu(BatchNorm(mean(x) @
W_fc))``, the conv by ``tests/reference.py``'s loops. Interop here needs no torch (NumPy state dicts); numerical
parity with the original PyTorch layer is ``parity/test_odconv.py``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdynconv as jdc
from jdynconv import _odconv, interop
from jdynconv import linen as jl
from jdynconv import nnx as jn
from tests import reference
from tests.helpers import F32_RTOL, assert_close, equation_operand_shapes


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def odconv_reference(
    x: np.ndarray,
    params: dict[str, Any],
    stats: dict[str, Any],
    geo: reference.Geometry,
    *,
    temperature: float,
    training: bool,
    epsilon: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ODConv in float64 on channels-last ``x``: (output, batch mean, biased batch variance of the hidden)."""
    x = np.asarray(x, np.float64)
    p = {name: np.asarray(value, np.float64) for name, value in params.items()}
    batch, *spatial, in_channels = x.shape
    kernel_size = p["kernel"].shape[1:-2]
    features = p["kernel"].shape[-1]
    ones = (1,) * len(spatial)
    hidden = x.mean(axis=tuple(range(1, x.ndim - 1))) @ p["attention_kernel"]
    batch_mean, batch_var = hidden.mean(axis=0), hidden.var(axis=0)
    mean, var = (batch_mean, batch_var) if training else (np.asarray(stats["mean"]), np.asarray(stats["var"]))
    hidden = np.maximum((hidden - mean) / np.sqrt(var + epsilon) * p["scale"] + p["offset"], 0)

    def head(name: str, activation: Any, skipped_shape: tuple[int, ...]) -> np.ndarray:
        if f"{name}_kernel" not in p:
            return np.ones(skipped_shape)
        return activation((hidden @ p[f"{name}_kernel"] + p[f"{name}_bias"]) / temperature)

    channel = head("channel", _sigmoid, (batch, in_channels))
    filter_ = head("filter", _sigmoid, (batch, features))
    spatial_att = head("spatial", _sigmoid, (batch, math.prod(kernel_size)))
    expert = head("expert", _softmax, (batch, 1))
    kernels = np.einsum("bn,n...->b...", expert, p["kernel"]) * spatial_att.reshape(batch, *kernel_size, 1, 1)
    out = reference.conv(x * channel.reshape(batch, *ones, in_channels), kernels, None, geo)
    out = out * filter_.reshape(batch, *ones, features)
    if "bias" in p:
        out = out + p["bias"].reshape(1, *ones, features)
    return out, batch_mean, batch_var


def _random(tree: Any, seed: int) -> Any:
    """Normal values (scale 0.5) in ``tree``'s shapes; running variances in (0.5, 1.5)."""
    rng = np.random.default_rng(seed)
    values = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.5, a.dtype), tree)
    if "batch_stats" in values:
        values["batch_stats"]["var"] = jnp.asarray(rng.uniform(0.5, 1.5, tree["batch_stats"]["var"].shape), jnp.float32)
    return values


def _inputs(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Normal values plus a per-sample, per-channel offset: pooled descriptors O(1) and different per sample."""
    rng = np.random.default_rng(seed)
    offset = rng.standard_normal((shape[0], *(1,) * (len(shape) - 2), shape[-1]))
    return (rng.standard_normal(shape) + offset).astype(np.float32)


def _init(module: jl.ODConv, x: np.ndarray, seed: int) -> dict[str, Any]:
    shapes = jax.eval_shape(
        functools.partial(module.init, use_running_average=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct(x.shape, x.dtype),
    )
    return _random(shapes, seed)


@functools.partial(jax.jit, static_argnums=0)
def _both_modes(module: jl.ODConv, variables: Any, x: jax.Array, temperature: jax.Array) -> tuple[Any, ...]:
    eval_out = module.apply(variables, x, temperature, use_running_average=True)
    train_out, updates = module.apply(variables, x, temperature, use_running_average=False, mutable=["batch_stats"])
    return eval_out, train_out, updates["batch_stats"]


# (input shape (B, *spatial, C_in), attributes, geometry): 1-D to 3-D, every skip rule, groups, stride, bias.
CONFIGS = {
    "2d_k4_groups2_stride2": (
        (3, 7, 6, 4),
        {"features": 6, "kernel_size": 3, "num_experts": 4, "strides": 2, "padding": 1, "feature_group_count": 2},
        reference.Geometry.simple(2, padding=1, stride=2, groups=2),
    ),
    "2d_1x1_k1_bias": (
        (3, 5, 4, 6),
        {"features": 4, "kernel_size": 1, "num_experts": 1, "use_bias": True, "min_channels": 4},
        reference.Geometry.simple(2),
    ),
    "2d_depthwise_k2": (
        (3, 5, 5, 4),
        {"features": 4, "kernel_size": 3, "num_experts": 2, "feature_group_count": 4, "padding": "VALID"},
        reference.Geometry.simple(2, groups=4),
    ),
    "1d_k1_unbiased": (
        (4, 9, 3),
        {"features": 5, "kernel_size": 3, "num_experts": 1, "padding": 1, "unbiased_running_var": True},
        reference.Geometry.simple(1, padding=1),
    ),
    "3d_k2": (
        (2, 3, 4, 4, 2),
        {"features": 3, "kernel_size": (1, 3, 3), "num_experts": 2, "padding": "VALID", "reduction": 0.5},
        reference.Geometry.simple(3),
    ),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_float64_reference_in_both_modes(name: str) -> None:
    shape, attributes, geo = CONFIGS[name]
    module = jl.ODConv(**attributes)
    x = _inputs(shape, seed=0)
    variables = _init(module, x, seed=1)
    temperature = 0.7
    eval_out, train_out, stats = _both_modes(module, variables, x, jnp.float32(temperature))
    params, old = variables["params"], variables["batch_stats"]
    expected_eval, _, _ = odconv_reference(x, params, old, geo, temperature=temperature, training=False)
    expected_train, batch_mean, batch_var = odconv_reference(
        x, params, old, geo, temperature=temperature, training=True
    )
    assert_close(eval_out, expected_eval, F32_RTOL, "eval output")
    assert_close(train_out, expected_train, F32_RTOL, "train output")
    # Flax's momentum 0.9 (PyTorch's 0.1); the unbiased running variance on request, as PyTorch stores it.
    count = shape[0]
    var_update = batch_var * count / (count - 1) if attributes.get("unbiased_running_var") else batch_var
    assert_close(stats["mean"], 0.9 * np.asarray(old["mean"]) + 0.1 * batch_mean, F32_RTOL, "running mean")
    assert_close(stats["var"], 0.9 * np.asarray(old["var"]) + 0.1 * var_update, F32_RTOL, "running var")


@pytest.mark.parametrize(
    ("shape", "attributes"),
    [
        ((3, 6, 5, 4), {"features": 6, "kernel_size": 3, "num_experts": 3, "feature_group_count": 2, "strides": 2}),
        ((3, 5, 4, 6), {"features": 4, "kernel_size": 1, "num_experts": 1}),  # no per-sample kernel unless folded
    ],
    ids=["2d_k3_groups2", "1x1_k1"],
)
def test_attention_placements_agree_on_values_and_gradients(shape: tuple[int, ...], attributes: dict) -> None:
    x = jnp.asarray(_inputs(shape, seed=2))
    results = {}
    for placement in ("kernel", "activations"):  # "auto" picks one of them per attention
        module = jl.ODConv(**attributes, attention_placement=placement)
        variables = _init(module, np.asarray(x), seed=3)

        def loss(params: Any, x: jax.Array, module: jl.ODConv = module, stats: Any = variables["batch_stats"]) -> Any:
            y, _ = module.apply(
                {"params": params, "batch_stats": stats}, x, 2.0, use_running_average=False, mutable=["batch_stats"]
            )
            return jnp.sum(jnp.sin(y)), y

        results[placement] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(variables["params"], x)
    for (path, actual), expected in zip(
        jax.tree.leaves_with_path(results["kernel"]), jax.tree.leaves(results["activations"]), strict=True
    ):
        assert_close(actual, expected, F32_RTOL, jax.tree_util.keystr(path))


def test_auto_placement_rule() -> None:
    # Fold where the kernel has no more elements per sample than the activations the attention would scale.
    assert _odconv.choose_placement(9 * 64 * 64, 32 * 32 * 64) == "kernel"
    assert _odconv.choose_placement(9 * 64 * 64, 16 * 16 * 64) == "activations"
    assert _odconv.choose_placement(100, 100) == "kernel"


def _conv_shapes(module: jl.ODConv, x: np.ndarray) -> list[tuple[int, ...]]:
    """The operand shapes of every ``conv_general_dilated`` in the forward (traced only, nothing compiles)."""
    variables = jax.eval_shape(functools.partial(module.init, use_running_average=True), jax.random.key(0), x)
    return equation_operand_shapes(
        "conv_general_dilated", lambda v, x: module.apply(v, x, use_running_average=True), variables, x
    )


def test_skip_rules_and_the_shared_conv_of_one_expert_one_tap() -> None:
    x = np.ones((2, 5, 5, 8), np.float32)
    heads = {"channel_kernel", "filter_kernel", "spatial_kernel", "expert_kernel"}

    def present(**attributes: Any) -> set[str]:
        variables = jax.eval_shape(
            functools.partial(jl.ODConv(**attributes).init, use_running_average=True), jax.random.key(0), x
        )
        return heads & set(variables["params"])

    assert present(features=8, kernel_size=3) == heads
    assert present(features=8, kernel_size=3, feature_group_count=8) == heads - {"filter_kernel"}  # depthwise
    assert present(features=16, kernel_size=3, feature_group_count=8) == heads  # grouped, not depthwise
    assert present(features=8, kernel_size=1) == heads - {"spatial_kernel"}
    assert present(features=8, kernel_size=(1, 3)) == heads  # 3 taps
    assert present(features=8, kernel_size=3, num_experts=1) == heads - {"expert_kernel"}
    # One expert, one tap: the original's _forward_impl_pw1x, one conv with the shared (1, 1, C_in, F) kernel.
    assert _conv_shapes(jl.ODConv(6, 1, num_experts=1), x) == [(2, 5, 5, 8), (1, 1, 8, 6)]
    assert (1, 1, 8, 6) not in _conv_shapes(jl.ODConv(6, 1, num_experts=1, attention_placement="kernel"), x)
    # The attention's width: max(int(C_in * reduction), min_channels).
    assert _odconv.attention_width(8, 0.0625, 16) == 16
    assert _odconv.attention_width(64, 0.5, 16) == 32
    assert _odconv.attention_width(6, 0.5, 1) == 3


def test_linen_and_nnx_are_equal() -> None:
    x = _inputs((3, 6, 6, 4), seed=4)
    attributes = {"num_experts": 3, "feature_group_count": 2, "use_bias": True, "min_channels": 5}
    module = jl.ODConv(6, (3, 3), **attributes)
    variables = _init(module, x, seed=5)
    twin = jn.ODConv(4, 6, (3, 3), **attributes, rngs=nnx.Rngs(0))
    for collection in ("params", "batch_stats"):
        for name, value in variables[collection].items():
            getattr(twin, name)[...] = value

    @nnx.jit
    def nnx_both_modes(model: jn.ODConv, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        return model(x, t, use_running_average=True), model(x, t)  # NNX trains by default

    eval_out, train_out, stats = _both_modes(module, variables, x, jnp.float32(3.0))
    nnx_eval, nnx_train = nnx_both_modes(twin, x, jnp.float32(3.0))
    np.testing.assert_array_equal(nnx_eval, eval_out)
    np.testing.assert_array_equal(nnx_train, train_out)
    np.testing.assert_array_equal(twin.mean[...], stats["mean"])
    np.testing.assert_array_equal(twin.var[...], stats["var"])


def test_temperature_is_traced_defaults_to_the_attribute_and_follows_the_original_schedule() -> None:
    x = jnp.asarray(_inputs((2, 5, 5, 3), seed=6))
    module = jl.ODConv(4, 3, 2)
    variables = _init(module, np.asarray(x), seed=7)
    apply = jax.jit(lambda v, x, t: module.apply(v, x, t, use_running_average=True))
    outs = [apply(variables, x, jdc.temperature_schedule(step, anneal_steps=10)) for step in (0, 5, 10)]
    assert apply._cache_size() == 1  # one compiled program for the whole schedule
    assert not np.allclose(outs[0], outs[2], rtol=0.01, atol=0.01)

    def program(module: jl.ODConv, *temperature: float) -> str:
        return str(jax.make_jaxpr(lambda v: module.apply(v, x, *temperature, use_running_average=True))(variables))

    # No temperature: the attribute's (default 1.0); the same program as passing it.
    assert program(module) == program(module, 1.0)
    assert program(jl.ODConv(4, 3, 2, temperature=4.0)) == program(module, 4.0) != program(module, 1.0)

    def get_temperature(iteration: int, epoch: int, iter_per_epoch: int, temp_epoch: int = 10, temp_init: float = 30.0):
        """OSVAI/ODConv utils/misc.py (commit 0901cc1c), as written there."""
        total_temp_iter = iter_per_epoch * temp_epoch
        current_iter = iteration + epoch * iter_per_epoch
        return 1.0 + max(0, (temp_init - 1.0) * ((total_temp_iter - current_iter) / total_temp_iter))

    for epoch, iteration in ((0, 0), (0, 7), (3, 2), (9, 19), (12, 5)):
        step = epoch * 20 + iteration
        np.testing.assert_allclose(
            float(jdc.temperature_schedule(step, anneal_steps=20 * 10)),
            get_temperature(iteration, epoch, 20),
            rtol=1e-6,
        )


@pytest.mark.parametrize(
    ("attributes", "fragment"),
    [
        ({"num_experts": 0}, "`num_experts` must be a positive int, got 0"),
        ({"reduction": 0.0}, "`reduction` must be a finite number > 0, got 0.0"),
        ({"reduction": -0.5}, "`reduction` must be a finite number > 0, got -0.5"),
        ({"min_channels": 0}, "`min_channels` must be a positive int, got 0"),
        ({"features": 5, "feature_group_count": 3}, "`features` (=5) must be divisible by `feature_group_count` (=3)"),
        ({"feature_group_count": 2}, "`inputs` channels (=3) must be divisible by `feature_group_count` (=2)"),
        ({"kernel_size": (3, 3, 3)}, "`kernel_size` must have one entry per spatial dimension (2), got (3, 3, 3)"),
        ({"attention_placement": "weights"}, "`attention_placement` must be one of ('auto', 'kernel', 'activations')"),
        ({"method": "typo"}, "`method` must be one of"),
        ({"temperature": 0.0}, "`temperature` must be a positive finite scalar, got 0.0"),
    ],
)
def test_bad_attributes(attributes: dict, fragment: str) -> None:
    # Attribute errors come at construction, those that need the inputs at the call: both inside the check.
    with pytest.raises(ValueError, match="`") as info:
        jl.ODConv(**{"features": 4, "kernel_size": 3, **attributes}).init(
            jax.random.key(0), np.ones((2, 5, 5, 3), np.float32), use_running_average=True
        )
    assert fragment in str(info.value), str(info.value)


def test_bad_call_arguments() -> None:
    module = jl.ODConv(4, 3, 2)
    x = np.ones((2, 5, 5, 3), np.float32)
    variables = _init(module, x, seed=8)
    with pytest.raises(ValueError, match=r"`inputs` must have rank 4 .* built for, got shape \(5, 3\)"):
        module.apply(variables, x[0, 0], use_running_average=True)
    with pytest.raises(ValueError, match=r"`temperature` must be a positive finite scalar, got -1.0"):
        module.apply(variables, x, -1.0, use_running_average=True)
    out, updates = module.apply(variables, x[:0], use_running_average=False, mutable=["batch_stats"])
    assert out.shape == (0, 5, 5, 4)  # an empty batch leaves the running statistics as they were
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])
    with pytest.raises(ValueError, match=r"\"use_running_average\" must be passed"):
        module.apply(variables, x)


def test_nnx_constructor_and_call_errors() -> None:
    with pytest.raises(ValueError, match="`kernel_size` 3 is an int"):
        jn.ODConv(3, 4, 3, rngs=nnx.Rngs(0))  # raises before any initialiser runs
    with pytest.raises(
        ValueError, match=r"`in_features` must be a positive int divisible by `feature_group_count` \(=2\)"
    ):
        jn.ODConv(3, 4, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`reduction` must be a finite number > 0, got nan"):
        jn.ODConv(3, 4, (3, 3), reduction=float("nan"), rngs=nnx.Rngs(0))
    model = nnx.eval_shape(lambda: jn.ODConv(3, 4, (3, 3), 2, rngs=nnx.Rngs(0)))  # checks before any compute
    with pytest.raises(ValueError, match=r"`inputs` must have rank 4 \(B, \*spatial, C_in\) with 2 spatial dims"):
        model(jnp.ones((2, 5, 3)))
    with pytest.raises(ValueError, match=r"`inputs` must have 3 channels \(last axis\), got shape \(2, 5, 5, 4\)"):
        model(jnp.ones((2, 5, 5, 4)))


def test_default_initialisation_is_the_originals() -> None:
    """kaiming_normal_(mode="fan_out", nonlinearity="relu") per expert and for the heads; BatchNorm 1 and 0."""
    kernel = jl.kaiming_normal_fan_out(jax.random.key(0), (3, 3, 64, 128))
    np.testing.assert_allclose(float(jnp.std(kernel)), math.sqrt(2 / (128 * 9)), rtol=0.02)
    state = jax.jit(lambda: nnx.to_pure_dict(nnx.state(jn.ODConv(8, 6, (3, 3), 4, use_bias=True, rngs=nnx.Rngs(0)))))()
    np.testing.assert_array_equal(state["scale"], np.ones(16))
    for name in ("offset", "bias", "channel_bias", "expert_bias", "mean"):
        np.testing.assert_array_equal(state[name], np.zeros(state[name].shape))
    experts = np.asarray(state["kernel"])
    assert not np.array_equal(experts[0], experts[1])  # one draw per expert


# --- interop (NumPy state dicts, the original's names) ----------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "shape"),
    [
        ({"features": 6, "kernel_size": 3, "num_experts": 4}, (1, 5, 5, 8)),
        ({"features": 8, "kernel_size": (3,), "num_experts": 2, "feature_group_count": 8}, (1, 7, 8)),
        ({"features": 6, "kernel_size": 1, "num_experts": 1, "use_bias": True}, (1, 4, 4, 8)),
    ],
    ids=["2d", "1d_depthwise", "1x1_k1_bias"],
)
def test_interop_round_trips_bitwise_with_the_originals_names(attributes: dict, shape: tuple[int, ...]) -> None:
    module = jl.ODConv(**attributes)
    variables = _init(module, np.zeros(shape, np.float32), seed=9)
    state_dict = interop.linen_to_torch(module, variables)
    k, features = attributes["num_experts"], attributes["features"]
    kernel_size = (
        (attributes["kernel_size"],) * 2 if isinstance(attributes["kernel_size"], int) else attributes["kernel_size"]
    )
    in_channels, groups = shape[-1], attributes.get("feature_group_count", 1)
    ones = (1,) * len(kernel_size)
    expected = {
        "weight": (k, features, in_channels // groups, *kernel_size),
        "attention.fc.weight": (16, in_channels, *ones),
        "attention.bn.weight": (16,),
        "attention.bn.bias": (16,),
        "attention.bn.running_mean": (16,),
        "attention.bn.running_var": (16,),
        "attention.bn.num_batches_tracked": (),
        "attention.channel_fc.weight": (in_channels, 16, *ones),
        "attention.channel_fc.bias": (in_channels,),
    }
    if not in_channels == groups == features:
        expected |= {"attention.filter_fc.weight": (features, 16, *ones), "attention.filter_fc.bias": (features,)}
    if math.prod(kernel_size) > 1:
        taps = math.prod(kernel_size)
        expected |= {"attention.spatial_fc.weight": (taps, 16, *ones), "attention.spatial_fc.bias": (taps,)}
    if k > 1:
        expected |= {"attention.kernel_fc.weight": (k, 16, *ones), "attention.kernel_fc.bias": (k,)}
    if attributes.get("use_bias"):
        expected["bias"] = (features,)
    assert {key: value.shape for key, value in state_dict.items()} == expected
    # The expert bank (k, F, C_in // G, *K) <-> (k, *K, C_in // G, F), one element.
    last_tap = tuple(size - 1 for size in kernel_size)
    assert (
        state_dict["weight"][(k - 1, features - 1, 0, *last_tap)]
        == variables["params"]["kernel"][(k - 1, *last_tap, 0, features - 1)]
    )
    back = interop.torch_to_linen(module, state_dict)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), strict=True)
    nnx_kw = {key: value for key, value in attributes.items() if key not in ("features", "kernel_size", "num_experts")}
    model = nnx.eval_shape(lambda: jn.ODConv(in_channels, features, kernel_size, k, rngs=nnx.Rngs(0), **nnx_kw))
    exported = interop.nnx_to_torch(interop.torch_to_nnx(model, state_dict))
    assert list(exported) == list(state_dict)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(exported[key], value, key)


def test_interop_is_strict() -> None:
    module = jl.ODConv(6, 3, 4)
    state_dict = interop.linen_to_torch(module, _init(module, np.zeros((1, 5, 5, 8), np.float32), seed=10))
    broken = dict(state_dict)
    del broken["attention.kernel_fc.bias"]
    broken["attention.extra.weight"] = np.ones(3, np.float32)
    broken["attention.spatial_fc.weight"] = np.ones((8, 16, 1, 1), np.float32)
    model = nnx.eval_shape(lambda: jn.ODConv(8, 6, (3, 3), 4, rngs=nnx.Rngs(0)))
    for convert in (lambda sd: interop.torch_to_linen(module, sd), lambda sd: interop.torch_to_nnx(model, sd)):
        with pytest.raises(interop.StateDictError) as error:
            convert(broken)
        message = str(error.value)
        assert "1 missing key, 1 unexpected key, 1 shape mismatch" in message
        assert "missing key: attention.kernel_fc.bias (expected shape (4,))" in message
        assert "unexpected key: attention.extra.weight (shape (3,))" in message
        assert "shape mismatch: attention.spatial_fc.weight: expected (9, 16, 1, 1), got (8, 16, 1, 1)" in message
    # A 1x1 one-expert layer has neither a spatial nor a kernel head: the original's keys would be unexpected.
    pointwise = jl.ODConv(6, 1, 1)
    with pytest.raises(interop.StateDictError, match=r"unexpected key: attention\.spatial_fc\.weight"):
        interop.torch_to_linen(pointwise, {**state_dict, "weight": np.ones((1, 6, 8, 1, 1), np.float32)})
