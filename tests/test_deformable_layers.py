"""DeformConv and DCNv3 (linen and NNX): variables and initialisation, linen == NNX given the same variables,
offsets passed or predicted, training (jit, grad, an optax step), batch statistics, and the layers' own errors.

The functional cores (``jdynconv.deform_conv``, ``jdynconv.dcnv3``) are tested against their references in
``tests/test_deform_conv.py`` and the parity suite; here the layers around them.

Compile time is this file's time, so each test builds few programs: every call runs under ``jit`` (op by op,
the sampling's many small programs take seconds to compile), the variables are NumPy draws into the shapes that
linen's ``init`` and the NNX constructor give abstractly (``jax.eval_shape``, ``nnx.eval_shape``: traced, not
compiled), and one jitted function serves every call of the same shapes. The initialisers run for real in the
training tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

import jdynconv as jdc
from jdynconv import _checks
from jdynconv import linen as jl
from jdynconv import nnx as jn
from tests.helpers import F32_RTOL, assert_close

B = 2


# Test data stays in NumPy: jitted functions take it as it is, while op by op (jnp.asarray included) every
# operation on a new shape is a program to compile.


def _normal(shape: tuple[int, ...], seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _shapes(tree: Any) -> Any:
    return jax.tree.map(jnp.shape, tree)


def _variables(layer: Any, *args: Any, seed: int = 1, **kwargs: Any) -> dict:
    """Noise (scale 0.3; running variances in [0.5, ...)) in the shapes of ``layer.init``'s variables."""
    abstract = jax.eval_shape(lambda: layer.init(jax.random.key(0), *args, **kwargs))
    rng = np.random.default_rng(seed)
    variables = jax.tree.map(lambda a: (rng.standard_normal(a.shape) * 0.3).astype(a.dtype), abstract)
    if "batch_stats" in variables:
        variables["batch_stats"] = jax.tree.map(lambda a: np.abs(a) + np.float32(0.5), variables["batch_stats"])
    return variables


def _zeroed(variables: dict, *names: str) -> dict:
    """``variables`` with the parameters of the submodules ``names`` set to zero (their initialisers')."""
    params = {
        name: jax.tree.map(np.zeros_like, value) if name in names else value
        for name, value in variables["params"].items()
    }
    return {**variables, "params": params}


def _nnx_twin(make: Callable[[], nnx.Module], variables: dict) -> nnx.Module:
    """The NNX model ``make`` builds, holding linen's ``variables``: every path of ``params`` (and
    ``batch_stats``) is an NNX variable of the same name and shape, and every NNX variable is one of them."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    flat = {path: value for collection in variables.values() for path, value in flatten_dict(collection).items()}
    assert _shapes(nnx.to_pure_dict(state)) == _shapes(unflatten_dict(flat))
    nnx.replace_by_pure_dict(state, unflatten_dict(flat))
    return nnx.merge(graphdef, state)


def _nnx_call(model: nnx.Module, *args: Any) -> jax.Array:
    return model(*args)


# One jitted NNX call for every test: its cache is keyed by the model's structure and the shapes.
_run = nnx.jit(_nnx_call)


def _same(actual: Any, expected: Any, name: str = "nnx vs linen") -> None:
    """linen and NNX run the same operations; compiled apart, XLA may still order a sum differently."""
    assert_close(actual, expected, 1e-6, name)


def _plus_bias(x: Any, bias: Any) -> np.ndarray:
    """``x + bias`` over the last axis, in NumPy (no program to compile)."""
    return np.asarray(x) + np.asarray(bias)


def _conv(x: jax.Array, kernel: jax.Array, strides, padding, dilation, groups: int = 1) -> jax.Array:
    rank = x.ndim - 2
    spatial = "DHW"[3 - rank :]
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        strides,
        padding,
        rhs_dilation=dilation,
        feature_group_count=groups,
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
        precision="highest",
    )


# --- DeformConv -----------------------------------------------------------------------------------------------

DEFORM_CONFIGS = [
    # (linen attributes, spatial shape, C_in)
    ({"features": 3, "kernel_size": (3,), "padding": "CAUSAL", "kernel_dilation": 2}, (9,), 2),
    (
        {
            "features": 4,
            "kernel_size": (3, 2),
            "strides": 2,
            "padding": ((1, 0), (0, 1)),
            "feature_group_count": 2,
            "offset_groups": 2,
            "use_mask": True,
        },
        (6, 5),
        4,
    ),
    ({"features": 2, "kernel_size": (2, 2, 2), "use_bias": False, "use_mask": True}, (3, 4, 3), 2),
]


def _nnx_deform(attributes: dict[str, Any], in_features: int) -> Callable[[], jn.DeformConv]:
    keywords = {k: v for k, v in attributes.items() if k not in ("features", "kernel_size")}
    features, kernel_size = attributes["features"], attributes["kernel_size"]
    return lambda: jn.DeformConv(in_features, features, kernel_size, **keywords, rngs=nnx.Rngs(0))


def _geometry(attributes: dict[str, Any], spatial: tuple[int, ...]) -> dict[str, Any]:
    """``jax.lax``'s strides, explicit padding and dilation of a DeformConv's attributes."""
    rank = len(spatial)
    strides = _checks.canonicalize_ints(attributes.get("strides", 1), rank, "strides")
    dilation = _checks.canonicalize_ints(attributes.get("kernel_dilation", 1), rank, "kernel_dilation")
    pads = _checks.canonicalize_padding(
        attributes.get("padding", "SAME"),
        spatial_shape=spatial,
        kernel_size=attributes["kernel_size"],
        strides=strides,
        kernel_dilation=dilation,
        input_dilation=(1,) * rank,
    )
    return {"strides": strides, "padding": list(pads), "dilation": dilation}


@pytest.mark.parametrize(("attributes", "spatial", "in_features"), DEFORM_CONFIGS)
def test_deform_conv_starts_as_a_plain_conv_and_nnx_equals_linen(attributes, spatial, in_features) -> None:
    x = _normal((B, *spatial, in_features))
    layer = jl.DeformConv(**attributes)
    variables = _variables(layer, x)
    rank, groups = len(spatial), attributes.get("feature_group_count", 1)
    taps, offset_groups = math.prod(attributes["kernel_size"]), attributes.get("offset_groups", 1)
    use_mask = attributes.get("use_mask", False)
    channels = offset_groups * taps * (rank + use_mask)
    expected_shapes = {
        "kernel": (*attributes["kernel_size"], in_features // groups, attributes["features"]),
        "conv_offset": {"kernel": (*attributes["kernel_size"], in_features, channels), "bias": (channels,)},
    }
    if attributes.get("use_bias", True):
        expected_shapes["bias"] = (attributes["features"],)
    assert _shapes(variables) == {"params": expected_shapes}

    # conv_offset at its initial zeros: zero offsets (and a mask of sigmoid(0) = 1/2), a plain conv.
    apply = jax.jit(layer.apply)
    initial = _zeroed(variables, "conv_offset")
    params = initial["params"]
    geometry = _geometry(attributes, spatial)
    expected = _conv(x, params["kernel"], geometry["strides"], geometry["padding"], geometry["dilation"], groups)
    expected = expected * (0.5 if use_mask else 1.0)
    expected = _plus_bias(expected, params["bias"]) if "bias" in params else expected
    assert_close(apply(initial, x), expected, F32_RTOL, "zero offsets")
    assert_close(_run(_nnx_twin(_nnx_deform(attributes, in_features), initial), x), expected, F32_RTOL, "nnx")

    out = apply(variables, x)
    _same(_run(_nnx_twin(_nnx_deform(attributes, in_features), variables), x), out)
    if use_mask and offset_groups > 1:  # mmcv's ModulatedDeformConv2dPack: offsets, then mask logits

        @jax.jit
        def mmcv(params: dict, x: jax.Array) -> jax.Array:
            conv_offset = params["conv_offset"]
            offset_out = _conv(x, conv_offset["kernel"], **geometry) + conv_offset["bias"].reshape(1, 1, 1, -1)
            count = offset_groups * taps * rank
            return jdc.deform_conv(
                x,
                offset_out[..., :count],
                params["kernel"],
                params["bias"],
                mask=jax.nn.sigmoid(offset_out[..., count:]),
                strides=geometry["strides"],
                padding=geometry["padding"],
                kernel_dilation=geometry["dilation"],
                feature_group_count=groups,
                precision="highest",
            )

        assert_close(out, mmcv(variables["params"], x), F32_RTOL, "mmcv's split")


def test_offsets_passed_to_the_call() -> None:
    """``predict_offsets=False`` is torchvision's ``DeformConv2d``: ``forward(input, offset, mask=None)``."""
    x = _normal((B, 6, 6, 2))
    offsets = _normal((B, 3, 3, 2 * 4 * 2), seed=2)
    mask = _sigmoid(_normal((B, 3, 3, 2 * 4), seed=3))
    attributes = {"features": 4, "kernel_size": (2, 2), "strides": 2, "padding": 0, "offset_groups": 2}
    layer = jl.DeformConv(**attributes, predict_offsets=False)
    variables = _variables(layer, x, offsets)
    assert set(variables["params"]) == {"kernel", "bias"}
    model = _nnx_twin(_nnx_deform({**attributes, "predict_offsets": False}, 2), variables)
    assert model.conv_offset is None
    params = variables["params"]
    torchvision = jax.jit(
        lambda x, offsets, mask: jdc.deform_conv(x, offsets, params["kernel"], params["bias"], mask=mask, strides=2)
    )
    assert_close(jax.jit(layer.apply)(variables, x, offsets, mask), torchvision(x, offsets, mask), F32_RTOL, "mask")
    plain = _plus_bias(_conv(x, params["kernel"], (2, 2), "VALID", (1, 1)), params["bias"])
    assert_close(_run(model, x, np.zeros_like(offsets)), plain, F32_RTOL, "zero offsets, no mask, nnx")


def test_deform_conv_offsets_must_match_predict_offsets() -> None:
    x = _normal((B, 5, 5, 2))
    offsets = jax.ShapeDtypeStruct((B, 5, 5, 18), jnp.float32)
    predicting = jl.DeformConv(features=2, kernel_size=3)
    variables = jax.eval_shape(predicting.init, jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"^`offsets` must not be passed"):
        jax.eval_shape(predicting.apply, variables, x, offsets)
    with pytest.raises(ValueError, match=r"^`mask` must not be passed"):
        jax.eval_shape(predicting.apply, variables, x, None, jax.ShapeDtypeStruct((B, 5, 5, 9), jnp.float32))
    with pytest.raises(ValueError, match=r"^`offsets` \(B, \*out_spatial"):
        jax.eval_shape(jl.DeformConv(features=2, kernel_size=3, predict_offsets=False).init, jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"^`use_mask` applies to predicted offsets only"):
        jl.DeformConv(features=2, kernel_size=3, use_mask=True, predict_offsets=False)
    with pytest.raises(ValueError, match=r"^`use_mask` applies to predicted offsets only"):
        jn.DeformConv(2, 2, (3, 3), use_mask=True, predict_offsets=False, rngs=nnx.Rngs(0))
    model = nnx.eval_shape(lambda: jn.DeformConv(2, 2, (3, 3), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"^`offsets` must not be passed"):
        nnx.eval_shape(_nnx_call, model, x, offsets)


def test_deform_conv_initialises_and_trains() -> None:
    """linen under ``jax.jit``: ``init`` zero-initialises ``conv_offset`` (mmcv's ``init_offset``); two optax steps
    lower the loss, and ``conv_offset`` gets a gradient through the sampling positions and the mask."""
    x = _normal((B, 5, 5, 3))
    target = _normal((B, 5, 5, 3), seed=4)
    layer = jl.DeformConv(features=3, kernel_size=3, use_mask=True)
    # Initialised on an empty batch: the same variables, and a small program (no sampling).
    params = jax.jit(layer.init)(jax.random.key(0), x[:0])["params"]
    for value in params["conv_offset"].values():
        np.testing.assert_array_equal(value, 0.0)
    assert float(np.std(np.asarray(params["kernel"]))) > 0
    tx = optax.sgd(0.1)

    @jax.jit
    def step(params: Any, state: Any) -> tuple[Any, Any, jax.Array, Any]:
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((layer.apply({"params": p}, x) - target) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss, grads

    params, state, first, grads = step(params, tx.init(params))
    assert float(np.abs(grads["conv_offset"]["kernel"]).max()) > 0
    _, _, second, _ = step(params, state)
    assert float(second) < float(first)


# --- DCNv3 ----------------------------------------------------------------------------------------------------


def _nnx_dcnv3(attributes: dict[str, Any], rank: int) -> Callable[[], jn.DCNv3]:
    keywords = {k: v for k, v in attributes.items() if k != "channels"}
    kernel_size = keywords.pop("kernel_size", 3)
    keywords["kernel_size"] = (kernel_size,) * rank if isinstance(kernel_size, int) else kernel_size
    return lambda: jn.DCNv3(attributes["channels"], **keywords, rngs=nnx.Rngs(0))


def _regular_grid_block(params: dict, x: jax.Array, kernel_size: int, dilation: int, remove_center: bool) -> jax.Array:
    """DCNv3 with zero offsets and equal tap weights: the mean of ``input_proj(x)`` over the (dilated) window, zeros
    outside; a depthwise conv of ones / T."""
    channels, rank = x.shape[-1], x.ndim - 2
    proj = _plus_bias(np.asarray(x) @ np.asarray(params["input_proj"]["kernel"]), params["input_proj"]["bias"])
    ones = np.ones((kernel_size,) * rank + (1, channels), np.float32)
    if remove_center:
        ones[(kernel_size // 2,) * rank] = 0
    taps = kernel_size**rank - int(remove_center)
    pad = dilation * (kernel_size - 1) // 2
    mean = _conv(proj, ones / taps, (1,) * rank, [(pad, pad)] * rank, (dilation,) * rank, channels)
    return _plus_bias(np.asarray(mean) @ np.asarray(params["output_proj"]["kernel"]), params["output_proj"]["bias"])


def _check_dcnv3_variables(attributes: dict[str, Any], rank: int, variables: dict) -> None:
    """The variables' names and shapes."""
    channels, groups = attributes["channels"], attributes["groups"]
    kernel_size = _checks.canonicalize_ints(attributes.get("kernel_size", 3), rank, "kernel_size")
    taps = math.prod(kernel_size) - int(attributes.get("remove_center", False))
    dw = _checks.canonicalize_ints(attributes.get("dw_kernel_size", kernel_size), rank, "dw_kernel_size")
    shapes = _shapes(variables["params"])
    assert shapes["input_proj"] == shapes["output_proj"] == {"kernel": (channels, channels), "bias": (channels,)}
    assert shapes["dw_conv"] == {"kernel": (*dw, 1, channels), "bias": (channels,)}
    assert shapes["dw_norm"] == {"scale": (channels,), "bias": (channels,)}
    assert shapes["offset"] == {"kernel": (channels, groups * taps * rank), "bias": (groups * taps * rank,)}
    assert shapes["mask"] == {"kernel": (channels, groups * taps), "bias": (groups * taps,)}
    if attributes.get("center_feature_scale"):
        assert shapes["center_feature_scale_proj"] == {"kernel": (channels, groups), "bias": (groups,)}
    else:
        assert "center_feature_scale_proj" not in shapes
    stats = {"dw_norm": {"mean": (channels,), "var": (channels,)}} if attributes.get("norm") == "batch" else None
    assert _shapes(variables.get("batch_stats")) == stats


DCNV3_CONFIGS = [
    # (linen attributes, spatial shape); a 3-D one with batch norm is test_dcnv3_batch_norm's.
    ({"channels": 4, "groups": 1, "kernel_size": 3, "padding": 2, "kernel_dilation": 2, "remove_center": True}, (6,)),
    (
        {"channels": 6, "groups": 3, "dw_kernel_size": 5, "center_feature_scale": True, "offset_scale": 0.5},
        (4, 5),
    ),
]


@pytest.mark.parametrize(("attributes", "spatial"), DCNV3_CONFIGS)
def test_dcnv3_starts_on_the_regular_grid_and_nnx_equals_linen(attributes, spatial) -> None:
    rank = len(spatial)
    x = _normal((B, *spatial, attributes["channels"]))
    layer = jl.DCNv3(**attributes)
    variables = _variables(layer, x)
    _check_dcnv3_variables(attributes, rank, variables)
    apply = jax.jit(layer.apply)
    if attributes.get("offset_scale", 1.0) == 1.0 and not attributes.get("center_feature_scale"):
        # offset and mask at their initial zeros: the regular grid, each tap weighted 1 / T
        initial = _zeroed(variables, "offset", "mask")
        expected = _regular_grid_block(
            initial["params"],
            x,
            attributes.get("kernel_size", 3),
            attributes.get("kernel_dilation", 1),
            attributes.get("remove_center", False),
        )
        assert_close(apply(initial, x), expected, F32_RTOL, "regular grid")
    _same(_run(_nnx_twin(_nnx_dcnv3(attributes, rank), variables), x), apply(variables, x))


def test_dcnv3_batch_norm() -> None:
    """``norm="batch"``, 3-D: in training linen and NNX give the same outputs and move the running statistics by
    Flax's momentum 0.9 (PyTorch's 0.1) towards the batch's; an empty batch leaves them alone. (Evaluation mode,
    against InternImage's: ``parity/test_deformable_interop.py``.)"""
    # A (3, 1, 1) kernel: 3-D, and a small program.
    attributes = {
        "channels": 4,
        "groups": 2,
        "kernel_size": (3, 1, 1),
        "padding": (1, 0, 0),
        "norm": "batch",
        "center_feature_scale": True,
    }
    x = _normal((B, 3, 3, 4, 4), scale=2.0)
    layer = jl.DCNv3(**attributes)
    variables = _variables(layer, x, use_running_average=True)
    _check_dcnv3_variables(attributes, 3, variables)
    model = _nnx_twin(_nnx_dcnv3(attributes, 3), variables)

    model.train()
    train = jax.jit(lambda v, x: layer.apply(v, x, use_running_average=False, mutable=["batch_stats"]))
    out, updates = train(variables, x)
    _same(_run(model, x), out)
    stats = updates["batch_stats"]["dw_norm"]
    _same(model.dw_norm.mean[...], stats["mean"], "running mean")
    _same(model.dw_norm.var[...], stats["var"], "running var")
    conv = variables["params"]["dw_conv"]
    before = jax.tree.map(np.asarray, variables["batch_stats"]["dw_norm"])
    depthwise = _conv(x, conv["kernel"], (1,) * 3, [(1, 1), (0, 0), (0, 0)], (1,) * 3, groups=4)
    depthwise = _plus_bias(depthwise, conv["bias"])
    batch_mean, batch_var = depthwise.mean(axis=(0, 1, 2, 3)), depthwise.var(axis=(0, 1, 2, 3))
    assert_close(stats["mean"], 0.9 * before["mean"] + 0.1 * batch_mean, 1e-5, "running mean")
    assert_close(stats["var"], 0.9 * before["var"] + 0.1 * batch_var, 1e-5, "running var")

    def running() -> dict[str, jax.Array]:
        return {"mean": model.dw_norm.mean[...], "var": model.dw_norm.var[...]}

    trained = running()
    assert _run(model, x[:0]).shape == (0, 3, 3, 4, 4)
    jax.tree.map(np.testing.assert_array_equal, running(), trained)


def test_dcnv3_initialises_and_trains() -> None:
    """NNX, built under ``nnx.jit``: the offset, mask and centre-feature-scale projections start at zero
    (InternImage's ``_reset_parameters``); two optax steps with ``nnx.Optimizer`` lower the loss, and those
    projections get a gradient (through the sampling positions and the softmax)."""
    x = _normal((B, 6, 4))  # 1-D: a small program
    target = _normal((B, 6, 4), seed=4)
    model = nnx.jit(lambda: jn.DCNv3(4, kernel_size=(3,), groups=2, center_feature_scale=True, rngs=nnx.Rngs(0)))()
    zero_initialised = ("offset", "mask", "center_feature_scale_proj")
    for name in zero_initialised:
        for value in nnx.to_pure_dict(nnx.state(getattr(model, name))).values():
            np.testing.assert_array_equal(value, 0.0)
    assert float(np.std(np.asarray(model.input_proj.kernel[...]))) > 0
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model: jn.DCNv3, optimizer: nnx.Optimizer) -> tuple[jax.Array, Any]:
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
        optimizer.update(model, grads)
        return loss, grads

    first, grads = step(model, optimizer)
    for name in zero_initialised:
        assert float(np.abs(getattr(grads, name).kernel[...]).max()) > 0, name
    second, _ = step(model, optimizer)
    assert float(second) < float(first)


@pytest.mark.parametrize(
    ("attributes", "spatial"),
    [
        ({"strides": 2}, (6, 6)),  # InternImage: a broadcasting RuntimeError
        ({"padding": 0}, (6, 6)),
        ({"kernel_dilation": 2}, (6, 6)),
        ({"padding": 0}, (3, 6)),  # a grid of size 1 in the first dim: InternImage broadcasts silently
    ],
)
def test_dcnv3_refuses_a_sampling_grid_of_another_size(attributes, spatial) -> None:
    x = jax.ShapeDtypeStruct((1, *spatial, 4), jnp.float32)
    with pytest.raises(ValueError, match=r"^`strides` .* `padding` .* `kernel_dilation` .* keep the spatial size"):
        jax.eval_shape(jl.DCNv3(4, groups=2, **attributes).init, jax.random.key(0), x)
    model = nnx.eval_shape(_nnx_dcnv3({"channels": 4, "groups": 2, **attributes}, 2))
    with pytest.raises(ValueError, match=r"^`strides` .* must keep the spatial size .* grid of \("):
        nnx.eval_shape(_nnx_call, model, x)
