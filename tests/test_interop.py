"""jdynconv.interop without PyTorch: state dicts are NumPy dicts built by hand.

Round trips (linen -> torch -> linen, NNX -> torch -> NNX) are bitwise; each layer rule is checked
against an index-by-index expectation of the PyTorch layout; the strict error names every problem; any
float dtype converts to the module's; ``.safetensors`` files load through ``safetensors.numpy``. The
numerical parity with PyTorch itself is in ``parity/test_branch_mix.py``.
"""

from __future__ import annotations

import functools
import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdynconv import interop
from jdynconv import linen as jdc_linen
from jdynconv import nnx as jdc_nnx

KEY = jax.random.key(0)

# (name, linen attributes, input shape (B, *spatial, C_in)): ranks 1 to 3, groups, no bias, the mean
# gate, rectangular kernels.
CONFIGS = [
    ("2d_seed", {"features": 4, "kernel_size": 3, "num_branches": 3, "padding": 1}, (2, 5, 6, 3)),
    ("1d_groups", {"features": 6, "kernel_size": (3,), "num_branches": 2, "feature_group_count": 2}, (2, 7, 4)),
    ("3d_no_bias", {"features": 2, "kernel_size": (2, 1, 3), "num_branches": 4, "use_bias": False}, (1, 3, 4, 5, 2)),
    ("2d_mean_gate", {"features": 3, "kernel_size": (1, 2), "num_branches": 1, "gate_input": "mean"}, (2, 4, 4, 5)),
]
CONFIG_IDS = [name for name, _, _ in CONFIGS]


def make_linen(attributes: dict[str, Any]) -> jdc_linen.BranchMixConv:
    return jdc_linen.BranchMixConv(**attributes)


def make_nnx(attributes: dict[str, Any], input_shape: tuple[int, ...]) -> jdc_nnx.BranchMixConv:
    """The NNX twin, built abstractly (``nnx.eval_shape``): no initialiser runs, nothing compiles."""
    attributes = dict(attributes)
    args = (input_shape[-1], attributes.pop("features"), attributes.pop("kernel_size"), attributes.pop("num_branches"))
    return nnx.eval_shape(
        lambda: jdc_nnx.BranchMixConv(*args, input_shape=input_shape[1:-1], rngs=nnx.Rngs(0), **attributes)
    )


def random_variables(module: jdc_linen.BranchMixConv, input_shape: tuple[int, ...], seed: int = 0) -> dict[str, Any]:
    """Variables with ``module.init``'s tree and shapes (from ``jax.eval_shape``) and random values."""
    rng = np.random.default_rng(seed)
    init = functools.partial(module.init, use_running_average=True)
    shapes = jax.eval_shape(init, KEY, jax.ShapeDtypeStruct(input_shape, jnp.float32))
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(s.dtype)), shapes)


def assert_trees_equal(actual: Any, expected: Any) -> None:
    """Same tree, and every leaf bitwise equal with the same shape and dtype."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), strict=True)


def assert_state_dicts_equal(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], key, strict=True)


def nnx_values(model: nnx.Module) -> dict[str, Any]:
    return nnx.to_pure_dict(nnx.state(model))


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "attributes", "input_shape"), CONFIGS, ids=CONFIG_IDS)
def test_linen_round_trip_is_bitwise(name: str, attributes: dict[str, Any], input_shape: tuple[int, ...]) -> None:
    module = make_linen(attributes)
    variables = random_variables(module, input_shape)
    state_dict = interop.linen_to_torch(module, variables)
    assert_trees_equal(interop.torch_to_linen(module, state_dict), variables)
    # And the other way: the state dict is what comes back out.
    assert_state_dicts_equal(interop.linen_to_torch(module, interop.torch_to_linen(module, state_dict)), state_dict)


@pytest.mark.parametrize(("name", "attributes", "input_shape"), CONFIGS, ids=CONFIG_IDS)
def test_nnx_round_trip_is_bitwise(name: str, attributes: dict[str, Any], input_shape: tuple[int, ...]) -> None:
    """NNX -> torch -> NNX, and linen and NNX agree on every PyTorch key and value."""
    module = make_linen(attributes)
    state_dict = interop.linen_to_torch(module, random_variables(module, input_shape))
    model = make_nnx(attributes, input_shape)
    assert interop.torch_to_nnx(model, state_dict) is model
    assert_state_dicts_equal(interop.nnx_to_torch(model), state_dict)
    again = interop.torch_to_nnx(make_nnx(attributes, input_shape), interop.nnx_to_torch(model))
    assert_trees_equal(nnx_values(again), nnx_values(model))
    assert ("bias" in nnx_values(model)) == attributes.get("use_bias", True)


def test_nnx_round_trip_from_a_real_init() -> None:
    """A concretely initialised NNX model (not abstract) exports and reloads its own values."""
    model = jdc_nnx.BranchMixConv(2, 3, (3,), 2, input_shape=(4,), rngs=nnx.Rngs(1))
    before = nnx_values(model)
    state_dict = interop.nnx_to_torch(model)
    np.testing.assert_array_equal(state_dict["convs.1.0.weight"], np.transpose(before["kernel"][1], (2, 1, 0)))
    other = interop.torch_to_nnx(jdc_nnx.BranchMixConv(2, 3, (3,), 2, input_shape=(4,), rngs=nnx.Rngs(2)), state_dict)
    assert_trees_equal(nnx_values(other), before)


# --- layouts: each rule against an index-by-index expectation -------------------------------------


def _distinct(shape: tuple[int, ...]) -> np.ndarray:
    """Every entry different, so any axis mix-up shows."""
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


@pytest.mark.parametrize("kernel_size", [(3,), (2, 3), (2, 3, 4)], ids=["1d", "2d", "3d"])
def test_conv_rule_layout(kernel_size: tuple[int, ...]) -> None:
    """PyTorch ``weight[o, i, *k]`` is Flax ``kernel[*k, i, o]``; the bias is unchanged."""
    out_features, in_per_group = 5, 2
    weight = _distinct((out_features, in_per_group, *kernel_size))
    bias = _distinct((out_features,)) + 0.5
    rules = interop.conv_rules(
        "conv",
        kernel=interop.Target(("params", "Conv_0", "kernel")),
        bias=interop.Target(("params", "Conv_0", "bias")),
        features=out_features,
        in_features_per_group=in_per_group,
        kernel_size=kernel_size,
    )
    variables = interop.flax_from_torch(rules, {"conv.weight": weight, "conv.bias": bias}, dtype=lambda _: np.float32)
    kernel = np.asarray(variables["params"]["Conv_0"]["kernel"])
    assert kernel.shape == (*kernel_size, in_per_group, out_features)
    for o, i, *k in itertools.product(*(range(n) for n in weight.shape)):
        assert kernel[(*k, i, o)] == weight[(o, i, *k)]
    np.testing.assert_array_equal(variables["params"]["Conv_0"]["bias"], bias)
    assert_state_dicts_equal(interop.torch_from_flax(rules, variables), {"conv.weight": weight, "conv.bias": bias})


def test_linear_rule_layout() -> None:
    """PyTorch ``weight[out, in]`` is Flax ``kernel[in, out]``."""
    weight, bias = _distinct((3, 7)), _distinct((3,))
    rules = interop.linear_rules(
        "fc",
        kernel=interop.Target(("params", "kernel")),
        bias=interop.Target(("params", "bias")),
        in_features=7,
        features=3,
    )
    variables = interop.flax_from_torch(rules, {"fc.weight": weight, "fc.bias": bias}, dtype=lambda _: np.float32)
    kernel = np.asarray(variables["params"]["kernel"])
    for out, inp in itertools.product(range(3), range(7)):
        assert kernel[inp, out] == weight[out, inp]
    assert_state_dicts_equal(interop.torch_from_flax(rules, variables), {"fc.weight": weight, "fc.bias": bias})


def test_batchnorm_rule_names() -> None:
    """weight, bias, running_mean, running_var -> scale, offset, mean, var; num_batches_tracked dropped
    on load (optional), exported as an int64 0-dim 0."""
    rules = interop.batchnorm_rules(
        "bn",
        scale=interop.Target(("params", "scale")),
        offset=interop.Target(("params", "bias")),
        mean=interop.Target(("batch_stats", "mean")),
        var=interop.Target(("batch_stats", "var")),
        features=4,
    )
    tensors = {name: _distinct((4,)) + i for i, name in enumerate(("weight", "bias", "running_mean", "running_var"))}
    state_dict = {f"bn.{name}": value for name, value in tensors.items()}
    for extra in ({}, {"bn.num_batches_tracked": np.array(7, np.int64)}):
        variables = interop.flax_from_torch(rules, state_dict | extra, dtype=lambda _: np.float32)
        assert_trees_equal(
            variables,
            {
                "params": {"scale": tensors["weight"], "bias": tensors["bias"]},
                "batch_stats": {"mean": tensors["running_mean"], "var": tensors["running_var"]},
            },
        )
    exported = interop.torch_from_flax(rules, variables)
    np.testing.assert_array_equal(exported.pop("bn.num_batches_tracked"), np.array(0, np.int64), strict=True)
    assert_state_dicts_equal(exported, state_dict)


def test_branch_mix_layout() -> None:
    """BranchMixConv's variables are the seed model's tensors: transposed, and stacked branch-major."""
    module = make_linen({"features": 4, "kernel_size": (2, 3), "num_branches": 3})
    k, in_channels, spatial = 3, 2, (3, 5)
    rng = np.random.default_rng(1)
    state_dict = {"mlp.1.weight": rng.standard_normal((k, in_channels * 15)), "mlp.1.bias": rng.standard_normal(k)}
    for n in range(k):
        state_dict[f"convs.{n}.0.weight"] = rng.standard_normal((4, in_channels, 2, 3))
        for name in ("0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
            state_dict[f"convs.{n}.{name}"] = rng.standard_normal(4)
        state_dict[f"convs.{n}.1.num_batches_tracked"] = np.array(n, np.int64)
    state_dict = {key: value.astype(np.float32) for key, value in state_dict.items()}
    variables = interop.torch_to_linen(module, state_dict)
    expected_shapes = jax.eval_shape(
        functools.partial(module.init, use_running_average=True),
        KEY,
        jax.ShapeDtypeStruct((1, *spatial, in_channels), jnp.float32),
    )
    assert jax.tree.map(lambda a: (a.shape, a.dtype), variables) == jax.tree.map(
        lambda s: (s.shape, s.dtype), expected_shapes
    )
    params, stats = variables["params"], variables["batch_stats"]
    np.testing.assert_array_equal(params["gate_kernel"], state_dict["mlp.1.weight"].T)
    np.testing.assert_array_equal(params["gate_bias"], state_dict["mlp.1.bias"])
    for n in range(k):
        np.testing.assert_array_equal(params["kernel"][n], state_dict[f"convs.{n}.0.weight"].transpose(2, 3, 1, 0))
        for flax_name, torch_name in (("bias", "0.bias"), ("scale", "1.weight"), ("offset", "1.bias")):
            np.testing.assert_array_equal(params[flax_name][n], state_dict[f"convs.{n}.{torch_name}"])
        np.testing.assert_array_equal(stats["mean"][n], state_dict[f"convs.{n}.1.running_mean"])
        np.testing.assert_array_equal(stats["var"][n], state_dict[f"convs.{n}.1.running_var"])


def test_rules_reused_for_a_users_flax_model() -> None:
    """A user's linen model (Conv -> BatchNorm -> Dense) registered with the layer rules."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            x = nn.BatchNorm(use_running_average=True)(nn.Conv(6, (3, 3))(x))
            return nn.Dense(2)(x.reshape(x.shape[0], -1))

    def rules(in_channels: int | interop.Dim, dense_in: int | interop.Dim) -> list[interop.Rule]:
        def target(*path: str) -> interop.Target:
            return interop.Target(path)

        return [
            *interop.conv_rules(
                "conv",
                kernel=target("params", "Conv_0", "kernel"),
                bias=target("params", "Conv_0", "bias"),
                features=6,
                in_features_per_group=in_channels,
                kernel_size=(3, 3),
            ),
            *interop.batchnorm_rules(
                "bn",
                scale=target("params", "BatchNorm_0", "scale"),
                offset=target("params", "BatchNorm_0", "bias"),
                mean=target("batch_stats", "BatchNorm_0", "mean"),
                var=target("batch_stats", "BatchNorm_0", "var"),
                features=6,
            ),
            *interop.linear_rules(
                "fc",
                kernel=target("params", "Dense_0", "kernel"),
                bias=target("params", "Dense_0", "bias"),
                in_features=dense_in,
                features=2,
            ),
        ]

    interop.register(
        Net,
        interop.Converter(
            flax_rules=lambda _, shapes: rules(
                shapes[("params", "Conv_0", "kernel")][2], shapes[("params", "Dense_0", "kernel")][0]
            ),
            torch_rules=lambda _, shapes: rules(shapes["conv.weight"][1], shapes["fc.weight"][1]),
        ),
    )
    shapes = jax.eval_shape(Net().init, KEY, jax.ShapeDtypeStruct((1, 4, 4, 3), jnp.float32))
    rng = np.random.default_rng(2)
    variables = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(s.dtype)), shapes)
    state_dict = interop.linen_to_torch(Net(), variables)
    assert {key: value.shape for key, value in state_dict.items()} == {
        "conv.weight": (6, 3, 3, 3),
        "conv.bias": (6,),
        "bn.weight": (6,),
        "bn.bias": (6,),
        "bn.running_mean": (6,),
        "bn.running_var": (6,),
        "bn.num_batches_tracked": (),
        "fc.weight": (2, 96),
        "fc.bias": (2,),
    }
    assert_trees_equal(interop.torch_to_linen(Net(), state_dict), variables)


# --- strict errors ---------------------------------------------------------------------------------


def _seed_state_dict() -> tuple[jdc_linen.BranchMixConv, dict[str, np.ndarray]]:
    module = make_linen(CONFIGS[0][1])
    return module, interop.linen_to_torch(module, random_variables(module, CONFIGS[0][2]))


def _broken(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One missing key, one unexpected key, one shape mismatch."""
    broken = dict(state_dict)
    del broken["convs.1.0.bias"]
    broken["convs.0.2.weight"] = np.ones(3, np.float32)
    broken["convs.2.0.weight"] = np.ones((4, 3, 5, 5), np.float32)
    return broken


def _assert_names_everything(error: pytest.ExceptionInfo[interop.StateDictError], expected_weight: str) -> None:
    message = str(error.value)
    assert "1 missing key, 1 unexpected key, 1 shape mismatch" in message
    assert "missing key: convs.1.0.bias (expected shape (4,))" in message
    assert "unexpected key: convs.0.2.weight (shape (3,))" in message
    assert f"shape mismatch: convs.2.0.weight: expected {expected_weight}, got (4, 3, 5, 5)" in message
    assert error.value.missing == ["convs.1.0.bias (expected shape (4,))"]
    assert error.value.mismatched == [("convs.2.0.weight", expected_weight, "(4, 3, 5, 5)")]


def test_strict_error_names_every_problem_at_once() -> None:
    module, state_dict = _seed_state_dict()
    with pytest.raises(interop.StateDictError) as error:
        interop.torch_to_linen(module, _broken(state_dict))
    _assert_names_everything(error, "(4, 3, 3, 3)")
    assert isinstance(error.value, ValueError)


def test_strict_error_nnx_leaves_the_model_unchanged() -> None:
    _, state_dict = _seed_state_dict()
    model = interop.torch_to_nnx(make_nnx(CONFIGS[0][1], CONFIGS[0][2]), state_dict)
    before = nnx_values(model)
    with pytest.raises(interop.StateDictError) as error:
        interop.torch_to_nnx(model, _broken(state_dict))
    _assert_names_everything(error, "(4, 3, 3, 3)")
    assert_trees_equal(nnx_values(model), before)


def test_shapes_are_checked_against_the_module_attributes() -> None:
    """A state dict for 4 features, kernel 3 and 75 gate inputs, into modules that want otherwise."""
    _, state_dict = _seed_state_dict()
    wider = make_linen({"features": 5, "kernel_size": 3, "num_branches": 3})
    with pytest.raises(ValueError, match=r"convs\.2\.1\.running_var: expected \(5,\), got \(4,\)") as error:
        interop.torch_to_linen(wider, state_dict)
    assert len(error.value.mismatched) == 3 * 6  # every branch's conv weight, bias and 4 BatchNorm tensors
    with pytest.raises(ValueError, match=r"convs\.0\.0\.weight: expected \(4, 3, 5, 5\), got \(4, 3, 3, 3\)"):
        interop.torch_to_linen(make_linen({"features": 4, "kernel_size": 5, "num_branches": 3}), state_dict)
    with pytest.raises(ValueError, match=r"missing key: convs\.3\.0\.weight"):
        interop.torch_to_linen(make_linen({"features": 4, "kernel_size": 3, "num_branches": 4}), state_dict)
    with pytest.raises(ValueError, match=r"unexpected key: convs\.0\.0\.bias \(shape \(4,\)\)"):
        interop.torch_to_linen(
            make_linen({"features": 4, "kernel_size": 3, "num_branches": 3, "use_bias": False}), state_dict
        )
    with pytest.raises(ValueError, match=r"mlp\.1\.weight: expected \(3, 3\), got \(3, 90\)"):
        interop.torch_to_linen(make_linen({**CONFIGS[0][1], "gate_input": "mean"}), state_dict)
    # The flatten gate's input size is C_in * prod(spatial): any positive multiple of C_in (= 3).
    state_dict["mlp.1.weight"] = np.ones((3, 91), np.float32)
    with pytest.raises(ValueError, match=r"mlp\.1\.weight: expected \(3, 3\*prod\(spatial\)\), got \(3, 91\)"):
        interop.torch_to_linen(make_linen(CONFIGS[0][1]), state_dict)
    # An NNX model checks against its own variables: 5 x 6 inputs, so exactly 90 gate inputs.
    with pytest.raises(ValueError, match=r"mlp\.1\.weight: expected \(3, 90\), got \(3, 91\)"):
        interop.torch_to_nnx(make_nnx(CONFIGS[0][1], CONFIGS[0][2]), state_dict)


def test_bad_module_attributes_are_reported() -> None:
    _, state_dict = _seed_state_dict()
    with pytest.raises(ValueError, match="`num_branches` must be a positive int, got 0"):
        interop.torch_to_linen(make_linen({"features": 4, "kernel_size": 3, "num_branches": 0}), state_dict)


def test_num_batches_tracked_is_shape_checked_and_values_must_be_float() -> None:
    module, state_dict = _seed_state_dict()
    state_dict["convs.0.1.num_batches_tracked"] = np.zeros(1, np.int64)
    state_dict["convs.1.0.weight"] = state_dict["convs.1.0.weight"].astype(np.int32)
    with pytest.raises(interop.StateDictError) as error:
        interop.torch_to_linen(module, state_dict)
    assert "convs.0.1.num_batches_tracked: expected (), got (1,)" in str(error.value)
    assert "not floating point: convs.1.0.weight: dtype int32" in str(error.value)


def test_export_is_strict_too() -> None:
    module = make_linen(CONFIGS[0][1])
    variables = random_variables(module, CONFIGS[0][2])
    params = dict(variables["params"])
    del params["gate_bias"]
    params["extra"] = jnp.zeros(2)
    params["scale"] = jnp.zeros((3, 5))
    with pytest.raises(interop.StateDictError) as error:
        interop.linen_to_torch(module, {"params": params, "batch_stats": variables["batch_stats"]})
    message = str(error.value)
    assert "missing key: params/gate_bias (expected shape (3,))" in message
    assert "unexpected key: params/extra (shape (2,))" in message
    assert "shape mismatch: params/scale: expected (3, 4), got (3, 5)" in message


def test_unregistered_and_wrong_api_modules() -> None:
    _, state_dict = _seed_state_dict()
    with pytest.raises(TypeError, match=r"registered flax\.linen module .* got flax\.linen\.linear\.Dense"):
        interop.torch_to_linen(nn.Dense(3), state_dict)
    nnx_model = make_nnx(CONFIGS[0][1], CONFIGS[0][2])
    with pytest.raises(TypeError, match=r"a flax\.nnx module: use torch_to_nnx / nnx_to_torch"):
        interop.linen_to_torch(nnx_model, {})
    with pytest.raises(TypeError, match=r"a flax\.linen module: use torch_to_linen / linen_to_torch"):
        interop.torch_to_nnx(make_linen(CONFIGS[0][1]), state_dict)
    with pytest.raises(TypeError, match=r"`module_type` must be a flax\.linen or flax\.nnx Module subclass"):
        interop.register(dict, interop.Converter(flax_rules=lambda module, shapes: []))


# --- dtypes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [np.float16, jnp.bfloat16, np.float32, np.float64], ids=["float16", "bfloat16", "float32", "float64"]
)
def test_any_float_dtype_converts_to_the_param_dtype(dtype: Any) -> None:
    module, state_dict = _seed_state_dict()
    # Values representable in every dtype, so the expected float32 is exact; float64 also rounds.
    rng = np.random.default_rng(3)
    state_dict = {
        key: (value if value.dtype == np.int64 else rng.integers(-8, 8, value.shape) / 4).astype(dtype)
        for key, value in state_dict.items()
    }
    if dtype == np.float64:
        state_dict["mlp.1.bias"] = np.array([0.1, 1 / 3, np.pi])
    variables = interop.torch_to_linen(module, state_dict)
    np.testing.assert_array_equal(
        variables["params"]["gate_bias"], state_dict["mlp.1.bias"].astype(np.float32), strict=True
    )
    np.testing.assert_array_equal(
        variables["params"]["kernel"][2],
        state_dict["convs.2.0.weight"].astype(np.float32).transpose(2, 3, 1, 0),
        strict=True,
    )
    model = interop.torch_to_nnx(make_nnx(CONFIGS[0][1], CONFIGS[0][2]), state_dict)
    assert_trees_equal(nnx_values(model), {**variables["params"], **variables["batch_stats"]})


def test_bfloat16_params_load_and_export_exactly() -> None:
    """``param_dtype=bfloat16``: params bfloat16, statistics float32; exported as float32 (torch has no
    NumPy bfloat16), holding the bfloat16 values exactly."""
    module = make_linen({**CONFIGS[0][1], "param_dtype": jnp.bfloat16})
    _, state_dict = _seed_state_dict()
    variables = interop.torch_to_linen(module, state_dict)
    assert variables["params"]["kernel"].dtype == jnp.bfloat16
    assert variables["batch_stats"]["var"].dtype == jnp.float32
    exported = interop.linen_to_torch(module, variables)
    weight = exported["convs.0.0.weight"]
    assert weight.dtype == np.float32
    np.testing.assert_array_equal(weight, state_dict["convs.0.0.weight"].astype(jnp.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(exported["convs.0.1.running_var"], state_dict["convs.0.1.running_var"])


def test_exported_arrays_are_writable_copies() -> None:
    """``torch.from_numpy`` warns on read-only arrays (views of JAX buffers); exports own their memory."""
    module = make_linen(CONFIGS[0][1])
    for value in interop.linen_to_torch(module, random_variables(module, CONFIGS[0][2])).values():
        assert value.flags.writeable
        assert value.flags.c_contiguous
        assert value.flags.owndata


# --- files -----------------------------------------------------------------------------------------


def test_load_safetensors(tmp_path: Path) -> None:
    # safetensors comes with the `torch` extra; skipped (and reported by -ra) where only `test` is installed.
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    _, state_dict = _seed_state_dict()
    state_dict["mlp.1.weight"] = state_dict["mlp.1.weight"].astype(np.float16)
    state_dict["mlp.1.bias"] = state_dict["mlp.1.bias"].astype(jnp.bfloat16)
    path = tmp_path / "seed.safetensors"
    safetensors_numpy.save_file(state_dict, str(path))
    loaded = interop.load_state_dict(path)
    assert loaded.keys() == state_dict.keys()
    assert loaded["mlp.1.bias"].dtype == np.float32  # bfloat16 -> float32, exactly
    np.testing.assert_array_equal(loaded["mlp.1.bias"], state_dict["mlp.1.bias"].astype(np.float32))
    for key in state_dict.keys() - {"mlp.1.bias"}:
        np.testing.assert_array_equal(loaded[key], state_dict[key], key, strict=True)
    assert loaded["convs.0.1.num_batches_tracked"].dtype == np.int64
    module = make_linen(CONFIGS[0][1])
    assert_trees_equal(
        interop.torch_to_linen(module, interop.load_state_dict(str(path))), interop.torch_to_linen(module, loaded)
    )


def test_load_state_dict_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"`path` must end in \.pt, \.pth or \.safetensors, got '.*weights\.bin'"):
        interop.load_state_dict(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match=r"`path` '.*missing\.safetensors' is not a file"):
        interop.load_state_dict(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        interop.load_state_dict(tmp_path / "missing.pt")
    (tmp_path / "folder.pth").mkdir()
    with pytest.raises(FileNotFoundError, match=r"folder\.pth"):
        interop.load_state_dict(tmp_path / "folder.pth")


def test_missing_optional_dependencies_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model.pt").write_bytes(b"")
    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ImportError, match=r"\.pt files needs `torch`.*pip install 'jdynconv\[torch\]'"):
        interop.load_state_dict(tmp_path / "model.pt")
    with pytest.raises(ImportError, match=r"\.safetensors files needs `safetensors`"):
        interop.load_state_dict(tmp_path / "model.safetensors")


def test_import_does_not_need_torch() -> None:
    """``import jdynconv.interop`` and NumPy conversions work with torch and safetensors unimportable."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['safetensors'] = None\n"
        "import numpy as np\n"
        "from jdynconv import interop, linen\n"
        "module = linen.BranchMixConv(features=1, kernel_size=(1,), num_branches=1, gate_input='mean')\n"
        "names = ('0.bias', '1.weight', '1.bias', '1.running_mean', '1.running_var')\n"
        "sd = {'mlp.1.weight': np.ones((1, 1)), 'mlp.1.bias': np.ones(1), 'convs.0.0.weight': np.ones((1, 1, 1))}\n"
        "sd |= {f'convs.0.{name}': np.ones(1) for name in names}\n"
        "assert interop.torch_to_linen(module, sd)['params']['kernel'].shape == (1, 1, 1, 1)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1], timeout=120)
