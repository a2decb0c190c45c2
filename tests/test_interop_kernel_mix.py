"""jdynconv.interop for CondConv and DynamicConv without PyTorch: state dicts are NumPy dicts.

CondConv <-> timm's ``CondConv2d`` (``weight (k, F * C_in // G * prod(K))`` flattened from ``(F, C_in // G,
*K)``, ``bias (k, F)``) plus ``routing_fn``; DynamicConv <-> the Dynamic Convolution layout
(``attention.fc1``/``fc2`` 1x1 convs, ``weight (k, F, C_in // G, *K)``, ``bias (k, F)``). Round trips are
bitwise both ways; the layouts are checked index by index; every problem comes in one strict error.
Numerical parity with PyTorch is in ``parity/test_kernel_mix.py``.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdynconv import interop
from jdynconv import linen as jdc_linen
from jdynconv import nnx as jdc_nnx

KEY = jax.random.key(0)
LAYERS = {
    "CondConv": (jdc_linen.CondConv, jdc_nnx.CondConv),
    "DynamicConv": (jdc_linen.DynamicConv, jdc_nnx.DynamicConv),
}

# (layer, linen attributes, input shape (B, *spatial, C_in)): ranks 1 to 3, int and tuple kernel sizes,
# groups, no bias, a DynamicConv ratio.
CONFIGS = [
    ("CondConv", {"features": 6, "kernel_size": 3, "num_experts": 3}, (2, 5, 6, 4)),
    ("CondConv", {"features": 4, "kernel_size": (3,), "num_experts": 2, "feature_group_count": 2}, (1, 7, 6)),
    ("CondConv", {"features": 2, "kernel_size": (2, 1, 3), "num_experts": 4, "use_bias": False}, (1, 3, 4, 5, 3)),
    ("DynamicConv", {"features": 6, "kernel_size": 3, "num_experts": 4}, (2, 5, 6, 4)),
    ("DynamicConv", {"features": 4, "kernel_size": (3,), "num_experts": 2, "feature_group_count": 2}, (1, 7, 6)),
    (
        "DynamicConv",
        {"features": 2, "kernel_size": (2, 1, 3), "num_experts": 3, "use_bias": False, "ratio": 0.5},
        (1, 3, 4, 5, 3),
    ),
]
CONFIG_IDS = ["cond_2d", "cond_1d_groups", "cond_3d_no_bias", "dyn_2d", "dyn_1d_groups", "dyn_3d_no_bias_ratio"]


def make_linen(layer: str, attributes: dict[str, Any]) -> nnx.Module:
    return LAYERS[layer][0](**attributes)


def make_nnx(layer: str, attributes: dict[str, Any], in_features: int, num_spatial: int) -> Any:
    """The NNX twin, built abstractly (``nnx.eval_shape``): no initialiser runs, nothing compiles."""
    attributes = dict(attributes)
    kernel_size = attributes.pop("kernel_size")
    if isinstance(kernel_size, int):
        kernel_size = (kernel_size,) * num_spatial
    args = (in_features, attributes.pop("features"), kernel_size, attributes.pop("num_experts"))
    return nnx.eval_shape(lambda: LAYERS[layer][1](*args, rngs=nnx.Rngs(0), **attributes))


def random_variables(module: Any, input_shape: tuple[int, ...], seed: int = 0) -> dict[str, Any]:
    """Variables with ``module.init``'s tree and shapes (from ``jax.eval_shape``) and random values."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, KEY, jax.ShapeDtypeStruct(input_shape, jnp.float32))
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(s.dtype)), shapes)


def assert_trees_equal(actual: Any, expected: Any) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), strict=True)


def assert_state_dicts_equal(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], key, strict=True)


def nnx_values(model: nnx.Module) -> dict[str, Any]:
    return nnx.to_pure_dict(nnx.state(model))


def _distinct(shape: tuple[int, ...]) -> np.ndarray:
    """Every entry different, so any axis mix-up shows."""
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("layer", "attributes", "input_shape"), CONFIGS, ids=CONFIG_IDS)
def test_linen_round_trip_is_bitwise(layer: str, attributes: dict[str, Any], input_shape: tuple[int, ...]) -> None:
    module = make_linen(layer, attributes)
    variables = random_variables(module, input_shape)
    state_dict = interop.linen_to_torch(module, variables)
    assert_trees_equal(interop.torch_to_linen(module, state_dict), variables)
    assert_state_dicts_equal(interop.linen_to_torch(module, interop.torch_to_linen(module, state_dict)), state_dict)


@pytest.mark.parametrize(("layer", "attributes", "input_shape"), CONFIGS, ids=CONFIG_IDS)
def test_nnx_round_trip_is_bitwise(layer: str, attributes: dict[str, Any], input_shape: tuple[int, ...]) -> None:
    """NNX -> torch -> NNX, and linen and NNX agree on every PyTorch key and value."""
    module = make_linen(layer, attributes)
    state_dict = interop.linen_to_torch(module, random_variables(module, input_shape))
    model = make_nnx(layer, attributes, input_shape[-1], len(input_shape) - 2)
    assert interop.torch_to_nnx(model, state_dict) is model
    assert_state_dicts_equal(interop.nnx_to_torch(model), state_dict)
    again = interop.torch_to_nnx(make_nnx(layer, attributes, input_shape[-1], len(input_shape) - 2), state_dict)
    assert_trees_equal(nnx_values(again), nnx_values(model))
    assert ("bias" in nnx_values(model)) == attributes.get("use_bias", True)


def test_torch_shapes_and_names() -> None:
    """The PyTorch names and shapes: timm's flattened bank, and the 1x1 convs' trailing 1s per rank."""
    module = make_linen("CondConv", {"features": 6, "kernel_size": 3, "num_experts": 3, "feature_group_count": 2})
    state_dict = interop.linen_to_torch(module, random_variables(module, (1, 5, 5, 4)))
    assert {key: value.shape for key, value in state_dict.items()} == {
        "weight": (3, 6 * 2 * 3 * 3),
        "bias": (3, 6),
        "routing_fn.weight": (3, 4),
        "routing_fn.bias": (3,),
    }
    for input_shape in ((1, 5, 8), (1, 5, 5, 8), (1, 3, 3, 3, 8)):
        ones = (1,) * (len(input_shape) - 2)
        module = make_linen("DynamicConv", {"features": 6, "kernel_size": 3, "num_experts": 4})
        state_dict = interop.linen_to_torch(module, random_variables(module, input_shape))
        assert {key: value.shape for key, value in state_dict.items()} == {
            "attention.fc1.weight": (3, 8, *ones),  # hidden = int(8 * 0.25) + 1
            "attention.fc2.weight": (4, 3, *ones),
            "attention.fc2.bias": (4,),
            "weight": (4, 6, 8, *(3,) * len(ones)),
            "bias": (4, 6),
        }


# --- layouts: index by index -----------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size", [(3,), (2, 3), (2, 1, 3)], ids=["1d", "2d", "3d"])
def test_cond_conv_layout(kernel_size: tuple[int, ...]) -> None:
    """timm's ``weight[n].view(F, C_in // G, *K)[o, i, *k]`` is ``kernel[n, *k, i, o]``."""
    k, features, in_features, groups = 3, 4, 6, 2
    module = make_linen(
        "CondConv",
        {"features": features, "kernel_size": kernel_size, "num_experts": k, "feature_group_count": groups},
    )
    per_group = in_features // groups
    state_dict = {
        "weight": _distinct((k, features * per_group * int(np.prod(kernel_size)))),
        "bias": _distinct((k, features)) + 0.5,
        "routing_fn.weight": _distinct((k, in_features)) + 0.25,
        "routing_fn.bias": _distinct((k,)) + 0.75,
    }
    params = interop.torch_to_linen(module, state_dict)["params"]
    expected_shapes = random_variables(module, (1, *(4,) * len(kernel_size), in_features))["params"]
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, expected_shapes)
    weight = state_dict["weight"].reshape(k, features, per_group, *kernel_size)
    kernel = np.asarray(params["kernel"])
    for n, o, i, *taps in itertools.product(*(range(s) for s in weight.shape)):
        assert kernel[(n, *taps, i, o)] == weight[(n, o, i, *taps)]
    np.testing.assert_array_equal(params["bias"], state_dict["bias"])
    np.testing.assert_array_equal(params["routing_kernel"], state_dict["routing_fn.weight"].T)
    np.testing.assert_array_equal(params["routing_bias"], state_dict["routing_fn.bias"])
    assert_state_dicts_equal(interop.linen_to_torch(module, {"params": params}), state_dict)


@pytest.mark.parametrize("kernel_size", [(3,), (2, 3), (2, 1, 3)], ids=["1d", "2d", "3d"])
def test_dynamic_conv_layout(kernel_size: tuple[int, ...]) -> None:
    """``weight[n, o, i, *k]`` is ``kernel[n, *k, i, o]``; ``fc1.weight[h, c, 1...]`` is
    ``attention_hidden_kernel[c, h]``; ``fc2.weight[n, h, 1...]`` is ``attention_kernel[h, n]``."""
    k, features, in_features, groups = 3, 6, 6, 3
    hidden = int(in_features * 0.25) + 1
    ones = (1,) * len(kernel_size)
    module = make_linen(
        "DynamicConv",
        {"features": features, "kernel_size": kernel_size, "num_experts": k, "feature_group_count": groups},
    )
    state_dict = {
        "attention.fc1.weight": _distinct((hidden, in_features, *ones)) + 0.25,
        "attention.fc2.weight": _distinct((k, hidden, *ones)) + 0.5,
        "attention.fc2.bias": _distinct((k,)) + 0.75,
        "weight": _distinct((k, features, in_features // groups, *kernel_size)),
        "bias": _distinct((k, features)) + 0.125,
    }
    params = interop.torch_to_linen(module, state_dict)["params"]
    expected_shapes = random_variables(module, (1, *(4,) * len(kernel_size), in_features))["params"]
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, expected_shapes)
    kernel, weight = np.asarray(params["kernel"]), state_dict["weight"]
    for n, o, i, *taps in itertools.product(*(range(s) for s in weight.shape)):
        assert kernel[(n, *taps, i, o)] == weight[(n, o, i, *taps)]
    np.testing.assert_array_equal(
        params["attention_hidden_kernel"], state_dict["attention.fc1.weight"].reshape(hidden, -1).T
    )
    np.testing.assert_array_equal(params["attention_kernel"], state_dict["attention.fc2.weight"].reshape(k, -1).T)
    np.testing.assert_array_equal(params["attention_bias"], state_dict["attention.fc2.bias"])
    np.testing.assert_array_equal(params["bias"], state_dict["bias"])
    assert_state_dicts_equal(interop.linen_to_torch(module, {"params": params}), state_dict)


def test_reshaped_permutation_inverts_itself() -> None:
    layout = interop.ReshapedPermutation((0, 3, 4, 2, 1), view=(2, 5, 3, 4, 1), torch_shape=(2, 60))
    torch_value = _distinct((2, 60))
    flax_value = layout.to_flax(torch_value)
    assert flax_value.shape == (2, 4, 1, 3, 5) == layout.flax_shape((2, 60))
    np.testing.assert_array_equal(layout.to_torch(flax_value), torch_value, strict=True)
    # One unknown size is inferred from the values.
    unknown = interop.ReshapedPermutation(
        (1, 0), view=(3, interop.Dim("C_in")), torch_shape=(3, interop.Dim("C_in"), 1)
    )
    np.testing.assert_array_equal(unknown.to_flax(_distinct((3, 4, 1))), _distinct((3, 4)).T)


def test_cond_conv_rules_for_a_shared_routing_fn() -> None:
    """timm's ``CondConvResidual``: one ``routing_fn`` next to ``conv_pw``/``conv_dw``; the rules take both
    prefixes, for a user's own model."""
    rules = interop.cond_conv_rules(
        num_experts=2,
        features=3,
        in_features=4,
        in_features_per_group=4,
        kernel_size=(1, 1),
        use_bias=False,
        torch_prefix="conv_pw.",
        routing_prefix="routing_fn",
    )
    state_dict = {
        "conv_pw.weight": _distinct((2, 12)),
        "routing_fn.weight": _distinct((2, 4)),
        "routing_fn.bias": _distinct((2,)),
    }
    params = interop.flax_from_torch(rules, state_dict, dtype=lambda _: np.float32)["params"]
    assert jax.tree.map(np.shape, params) == {"kernel": (2, 1, 1, 4, 3), "routing_kernel": (4, 2), "routing_bias": (2,)}
    assert_state_dicts_equal(interop.torch_from_flax(rules, {"params": params}), state_dict)


# --- what a linen module does not know, from the state dict ------------------------------------------


@pytest.mark.parametrize("num_spatial", [1, 2, 3])
def test_cond_conv_rank_from_the_flattened_weight(num_spatial: int) -> None:
    """An int ``kernel_size``: the rank is the one whose ``K ** r`` taps fit the flattened weight."""
    module = make_linen("CondConv", {"features": 2, "kernel_size": 3, "num_experts": 2})
    state_dict = interop.linen_to_torch(module, random_variables(module, (1, *(4,) * num_spatial, 5)))
    assert state_dict["weight"].shape == (2, 2 * 5 * 3**num_spatial)
    kernel = interop.torch_to_linen(module, state_dict)["params"]["kernel"]
    assert kernel.shape == (2, *(3,) * num_spatial, 5, 2)


def test_cond_conv_1x1_rank_is_ambiguous_and_defaults_to_2d() -> None:
    """With ``kernel_size=1`` any rank fits: ``CondConv2d``'s 2-D; a tuple ``kernel_size`` says otherwise."""
    module = make_linen("CondConv", {"features": 2, "kernel_size": 1, "num_experts": 2})
    state_dict = interop.linen_to_torch(module, random_variables(module, (1, 4, 3)))  # 1-D, (2, 6)
    assert interop.torch_to_linen(module, state_dict)["params"]["kernel"].shape == (2, 1, 1, 3, 2)
    module_1d = make_linen("CondConv", {"features": 2, "kernel_size": (1,), "num_experts": 2})
    assert interop.torch_to_linen(module_1d, state_dict)["params"]["kernel"].shape == (2, 1, 3, 2)


def test_cond_conv_without_routing_fn_still_checks_the_weight() -> None:
    """C_in // G then comes from the flattened weight; the missing routing Linear is reported."""
    module = make_linen("CondConv", {"features": 2, "kernel_size": (3, 3), "num_experts": 2})
    state_dict = interop.linen_to_torch(module, random_variables(module, (1, 4, 4, 5)))
    del state_dict["routing_fn.weight"]
    with pytest.raises(interop.StateDictError) as error:
        interop.torch_to_linen(module, state_dict)
    assert error.value.missing == ["routing_fn.weight (expected shape (2, 5))"]
    assert error.value.mismatched == []
    state_dict["weight"] = np.ones((2, 91), np.float32)
    with pytest.raises(interop.StateDictError, match=r"weight: expected \(2, 2\*C_in//G\*3\*3\), got \(2, 91\)"):
        interop.torch_to_linen(module, state_dict)


def test_dynamic_conv_ratio_is_checked() -> None:
    """The hidden width is ``int(C_in * ratio) + 1``: a state dict for another ratio is a mismatch."""
    module = make_linen("DynamicConv", {"features": 4, "kernel_size": (3, 3), "num_experts": 2, "ratio": 0.5})
    state_dict = interop.linen_to_torch(module, random_variables(module, (1, 4, 4, 8)))
    assert state_dict["attention.fc1.weight"].shape == (5, 8, 1, 1)
    other = make_linen("DynamicConv", {"features": 4, "kernel_size": (3, 3), "num_experts": 2})
    with pytest.raises(interop.StateDictError) as error:
        interop.torch_to_linen(other, state_dict)
    assert error.value.mismatched == [
        ("attention.fc1.weight", "(3, 8, 1, 1)", "(5, 8, 1, 1)"),
        ("attention.fc2.weight", "(2, 3, 1, 1)", "(2, 5, 1, 1)"),
    ]
    # C_in and the rank come from fc1 when the expert bank is missing.
    del state_dict["weight"]
    with pytest.raises(interop.StateDictError) as error:
        interop.torch_to_linen(module, state_dict)
    assert error.value.missing == ["weight (expected shape (2, 4, 8, 3, 3))"]
    assert error.value.mismatched == []


# --- strict errors ---------------------------------------------------------------------------------


def _broken(state_dict: dict[str, np.ndarray], mismatched: str, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """One missing key (``bias``), one unexpected key, one shape mismatch."""
    broken = dict(state_dict)
    del broken["bias"]
    broken["attention.fc3.weight"] = np.ones(3, np.float32)
    broken[mismatched] = np.ones(shape, np.float32)
    return broken


STRICT_CASES = [
    ("CondConv", "weight", (3, 71), "(3, 216)", "(3, 71)"),
    ("DynamicConv", "attention.fc2.weight", (3, 2), "(3, 2, 1, 1)", "(3, 2)"),
]


@pytest.mark.parametrize(("layer", "key", "shape", "expected", "got"), STRICT_CASES, ids=["cond", "dyn"])
def test_strict_error_names_every_problem_at_once(layer: str, key: str, shape: Any, expected: str, got: str) -> None:
    """linen and NNX: the same error; the NNX model is unchanged when it raises."""
    attributes = {"features": 6, "kernel_size": (3, 3), "num_experts": 3}
    module = make_linen(layer, attributes)
    state_dict = interop.linen_to_torch(module, random_variables(module, (1, 5, 5, 4)))
    model = interop.torch_to_nnx(make_nnx(layer, attributes, 4, 2), state_dict)
    before = nnx_values(model)
    for convert in (lambda sd: interop.torch_to_linen(module, sd), lambda sd: interop.torch_to_nnx(model, sd)):
        with pytest.raises(interop.StateDictError) as error:
            convert(_broken(state_dict, key, shape))
        message = str(error.value)
        assert "1 missing key, 1 unexpected key, 1 shape mismatch" in message
        assert "missing key: bias (expected shape (3, 6))" in message
        assert "unexpected key: attention.fc3.weight (shape (3,))" in message
        assert f"shape mismatch: {key}: expected {expected}, got {got}" in message
    assert_trees_equal(nnx_values(model), before)


def test_missing_everything_is_reported_with_the_shapes_known() -> None:
    module = make_linen("CondConv", {"features": 6, "kernel_size": 3, "num_experts": 4, "feature_group_count": 2})
    with pytest.raises(interop.StateDictError) as error:
        interop.torch_to_linen(module, {})
    assert error.value.missing == [
        "weight (expected shape (4, 6*C_in//G*3*3))",
        "bias (expected shape (4, 6))",
        "routing_fn.weight (expected shape (4, C_in (a multiple of 2)))",
        "routing_fn.bias (expected shape (4,))",
    ]


@pytest.mark.parametrize("layer", ["CondConv", "DynamicConv"])
def test_export_is_strict_too(layer: str) -> None:
    module = make_linen(layer, {"features": 6, "kernel_size": (3, 3), "num_experts": 3})
    params = dict(random_variables(module, (1, 5, 5, 4))["params"])
    del params["bias"]
    params["extra"] = jnp.zeros(2)
    params["kernel"] = jnp.zeros((3, 3, 3, 4, 5))
    with pytest.raises(interop.StateDictError) as error:
        interop.linen_to_torch(module, {"params": params})
    message = str(error.value)
    assert "missing key: params/bias (expected shape (3, 6))" in message
    assert "unexpected key: params/extra (shape (2,))" in message
    assert "shape mismatch: params/kernel: expected (3, 3, 3, 4, 6), got (3, 3, 3, 4, 5)" in message


def test_bad_module_attributes_are_reported() -> None:
    # At construction, before any conversion.
    with pytest.raises(ValueError, match="`num_experts` must be a positive int, got 0"):
        make_linen("CondConv", {"features": 6, "kernel_size": 3, "num_experts": 0})
    with pytest.raises(ValueError, match=r"`features` \(=5\) must be divisible by `feature_group_count` \(=2\)"):
        make_linen("DynamicConv", {"features": 5, "kernel_size": 3, "num_experts": 2, "feature_group_count": 2})


# --- dtypes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", ["CondConv", "DynamicConv"])
def test_bfloat16_params_and_float64_state_dicts(layer: str) -> None:
    """Any float dtype converts to ``param_dtype``; bfloat16 params export as float32, exactly."""
    attributes = {"features": 2, "kernel_size": (3,), "num_experts": 2}
    state_dict = interop.linen_to_torch(
        make_linen(layer, attributes), random_variables(make_linen(layer, attributes), (1, 4, 3))
    )
    module = make_linen(layer, {**attributes, "param_dtype": jnp.bfloat16})
    variables = interop.torch_to_linen(module, {key: value.astype(np.float64) for key, value in state_dict.items()})
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
    exported = interop.linen_to_torch(module, variables)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(exported[key], value.astype(jnp.bfloat16).astype(np.float32), key, strict=True)
        assert exported[key].flags.writeable
        assert exported[key].flags.c_contiguous
        assert exported[key].flags.owndata
