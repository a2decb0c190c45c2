"""DeformConv and DCNv3 (linen and NNX): variables and initialisation, linen == NNX given the same variables,
offsets passed or predicted, training (jit, grad, an optax step), batch statistics, and the layers' own errors.

The functional cores (``jdynconv.deform_conv``, ``jdynconv.dcnv3``) are tested against their references in
``tests/test_deform_conv.py`` and the parity suite; here the layers around them.

Compile time is this file's time, so each test builds as few programs as it can:

* every call runs under ``jit`` (op by op, the sampling's many small programs take seconds to compile) and
  every reference without a sampling is NumPy (the plain convolutions included);
* the variables are NumPy draws into the shapes that linen's ``init`` gives abstractly (``jax.eval_shape`` on
  an empty batch: traced, not compiled, and without the sampling), and the initialisers run for real in the
  training tests only;
* linen, its NNX twin (built inside the program from the same variables) and any reference written with the
  same operations are **one program** per configuration: XLA's common-subexpression elimination compiles the
  computation they share once, so the NNX twin costs a trace, not a compile (they still agree only if they
  compute the same values; a twin that differed would be compiled and compared in full). One program serves
  every call of the same shapes (zero and random offsets);
* training runs ``init`` and both optax steps in one program (the steps in a ``lax.scan``: one copy of the
  gradient) for linen; NNX keeps the user's ``nnx.jit`` / ``nnx.Optimizer`` flow;
* the smallest case that still exercises an option: offsets passed to the call are checked on the DeformConv
  configurations' own sampling (no program of their own), the empty batch rides in the batch-norm program,
  and the DeformConv training is 1-D (each test says what its case still shows).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
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


def _shapes(tree: Any) -> Any:
    return jax.tree.map(jnp.shape, tree)


def _variables(layer: Any, x: np.ndarray, *args: Any, seed: int = 1, **kwargs: Any) -> dict:
    """Noise (scale 0.3; running variances in [0.5, ...)) in the shapes of ``layer.init``'s variables.

    The shapes come from an abstract ``init`` on an empty batch (``x[:0]``, the other arguments too): the same
    variables, traced without the sampling.
    """
    empty = (x[:0], *(None if a is None else a[:0] for a in args))
    abstract = jax.eval_shape(lambda: layer.init(jax.random.key(0), *empty, **kwargs))
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


def _nnx_twin(make: Callable[[], nnx.Module]) -> Callable[[dict], nnx.Module]:
    """``twin(variables)``: the NNX model ``make`` builds, holding linen's ``variables`` (arrays or tracers), where
    every path of ``params`` (and ``batch_stats``) is an NNX variable of the same name and shape, and every NNX
    variable is one of them. Inside a jitted function it is traced with the linen layer, into the same program.
    The model is built abstractly once (``nnx.eval_shape``); each twin is a merge, not a new trace."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    abstract = dict(nnx.to_flat_state(state))
    shapes = _shapes(nnx.to_pure_dict(state))

    def twin(variables: dict) -> nnx.Module:
        flat = {path: value for collection in variables.values() for path, value in flatten_dict(collection).items()}
        assert _shapes(unflatten_dict(flat)) == shapes
        return nnx.merge(
            graphdef, nnx.from_flat_state([(path, abstract[path].replace(flat[path])) for path in abstract])
        )

    return twin


def _nnx_call(model: nnx.Module, *args: Any) -> jax.Array:
    return model(*args)


def _linen_and_nnx(layer: nn.Module, make: Callable[[], nnx.Module]) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """One jitted program: ``(linen, nnx)`` outputs of ``layer`` and its NNX twin on the same variables and
    arguments (the computation they share compiled once)."""
    twin = _nnx_twin(make)

    @jax.jit
    def both(variables: dict, *args: Any) -> tuple[jax.Array, jax.Array]:
        return layer.apply(variables, *args), twin(variables)(*args)

    return both


def _same(actual: Any, expected: Any, name: str = "nnx vs linen") -> None:
    """linen and NNX run the same operations (where XLA does not merge them, it may order a sum differently)."""
    assert_close(actual, expected, 1e-6, name)


def _plus_bias(x: Any, bias: Any) -> np.ndarray:
    """``x + bias`` over the last axis, in NumPy (no program to compile)."""
    return np.asarray(x) + np.asarray(bias)


def _conv(x: Any, kernel: Any, strides, padding, dilation, groups: int = 1) -> np.ndarray:
    """An N-d convolution in NumPy (float64; no program to compile): channels-last ``x``, kernel ``(*K, C_in //
    groups, F)``, explicit ``(low, high)`` padding, as ``jax.lax.conv_general_dilated``."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    x = np.pad(x, [(0, 0), *padding, (0, 0)])
    *taps, group_in, features = kernel.shape
    out_spatial = [
        (n - d * (k - 1) - 1) // s + 1 for n, k, s, d in zip(x.shape[1:-1], taps, strides, dilation, strict=True)
    ]
    out = np.zeros((x.shape[0], *out_spatial, groups, features // groups))
    for tap in np.ndindex(*taps):
        window = tuple(
            slice(t * d, t * d + (o - 1) * s + 1, s)
            for t, d, o, s in zip(tap, dilation, out_spatial, strides, strict=True)
        )
        values = x[(slice(None), *window)].reshape(x.shape[0], *out_spatial, groups, group_in)
        out += np.einsum("...gc,cgf->...gf", values, kernel[tap].reshape(group_in, groups, features // groups))
    return out.reshape(*out.shape[:-2], features).astype(np.float32)


def _lax_conv(x: jax.Array, kernel: jax.Array, strides, padding, dilation) -> jax.Array:
    """``jax.lax``'s convolution as ``flax``'s Conv calls it (inside the programs, where it shares the layers')."""
    spatial = "DHW"[3 - (x.ndim - 2) :]
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        strides,
        padding,
        rhs_dilation=dilation,
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
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
def test_deform_conv_plain_at_zero_offsets_passed_or_predicted_nnx_equals_linen(attributes, spatial, in_features):
    """With ``predict_offsets`` (mmcv's ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack``) and without
    (torchvision's ``DeformConv2d``: ``forward(input, offset, mask=None)``), linen and NNX: zero offsets are a
    plain conv; the offsets and mask the layer predicts (``conv_offset``'s channels split as mmcv's) are the
    ones the call would pass and the ones :func:`jdynconv.deform_conv` takes, the mask used as given.

    One program per configuration, called with zero and with random ``conv_offset``: both layers, their NNX
    twins and the functional reference share one sampling (each written with the same operations). The three
    configurations: 1-D causal with dilation and no mask (DCNv1; the passing layer without a mask), 2-D with
    strides, explicit asymmetric padding, groups, offset groups and a mask, 3-D ``"SAME"`` with an even kernel,
    a mask and no bias. (torchvision's stride-2 ``padding=1``: ``parity/test_deformable_interop.py``.)"""
    x = _normal((B, *spatial, in_features))
    layer = jl.DeformConv(**attributes)
    variables = _variables(layer, x)
    rank, groups = len(spatial), attributes.get("feature_group_count", 1)
    taps, offset_groups = math.prod(attributes["kernel_size"]), attributes.get("offset_groups", 1)
    use_mask = attributes.get("use_mask", False)
    count = offset_groups * taps * rank  # offset channels (the mask's follow)
    channels = count + offset_groups * taps * use_mask
    expected_shapes = {
        "kernel": (*attributes["kernel_size"], in_features // groups, attributes["features"]),
        "conv_offset": {"kernel": (*attributes["kernel_size"], in_features, channels), "bias": (channels,)},
    }
    if attributes.get("use_bias", True):
        expected_shapes["bias"] = (attributes["features"],)
    assert _shapes(variables) == {"params": expected_shapes}
    geometry = _geometry(attributes, spatial)

    # conv_offset at its initial zeros: zero offsets (and a mask of sigmoid(0) = 1/2), a plain conv.
    initial = _zeroed(variables, "conv_offset")
    params = initial["params"]
    plain = _conv(x, params["kernel"], geometry["strides"], geometry["padding"], geometry["dilation"], groups)
    plain = plain * np.float32(0.5 if use_mask else 1.0)
    plain = _plus_bias(plain, params["bias"]) if "bias" in params else plain
    out_spatial = plain.shape[1:-1]

    passing_attributes = {k: v for k, v in attributes.items() if k != "use_mask"} | {"predict_offsets": False}
    passing = jl.DeformConv(**passing_attributes)
    offsets_shape = np.zeros((0, *out_spatial, count), np.float32)
    passing_shapes = jax.eval_shape(lambda: passing.init(jax.random.key(0), x[:0], offsets_shape))
    assert _shapes(passing_shapes) == {"params": {k: v for k, v in expected_shapes.items() if k != "conv_offset"}}
    twin = _nnx_twin(_nnx_deform(attributes, in_features))
    passing_twin = _nnx_twin(_nnx_deform(passing_attributes, in_features))

    def predicted(params: dict, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """``conv_offset`` (at the layer's precision) split as mmcv's: offsets, then mask logits (sigmoid)."""
        conv_offset = params["conv_offset"]
        out = _lax_conv(x, conv_offset["kernel"], **geometry)
        out = out + conv_offset["bias"].reshape((1,) * (out.ndim - 1) + (-1,))
        return out[..., :count], (jax.nn.sigmoid(out[..., count:]) if use_mask else None)

    @jax.jit
    def run(variables: dict, x: jax.Array) -> dict[str, jax.Array]:
        params = variables["params"]
        offsets, mask = predicted(params, x)
        passing_variables = {"params": {k: v for k, v in params.items() if k != "conv_offset"}}
        reference = jdc.deform_conv(
            x,
            offsets,
            params["kernel"],
            params.get("bias"),
            mask=mask,
            strides=geometry["strides"],
            padding=geometry["padding"],
            kernel_dilation=geometry["dilation"],
            feature_group_count=groups,
        )
        return {
            "linen": layer.apply(variables, x),
            "nnx": twin(variables)(x),
            "passed": passing.apply(passing_variables, x, offsets, mask),
            "passed, nnx": passing_twin(passing_variables)(x, offsets, mask),
            "deform_conv": reference,
        }

    for name, out in run(initial, x).items():
        assert_close(out, plain, F32_RTOL, f"zero offsets, {name}")
    outs = run(variables, x)
    assert_close(outs["linen"], outs["deform_conv"], F32_RTOL, "mmcv's split")
    _same(outs["nnx"], outs["linen"])
    _same(outs["passed"], outs["linen"], "offsets passed vs predicted")
    _same(outs["passed, nnx"], outs["passed"], "offsets passed, nnx vs linen")


def test_deform_conv_offsets_must_match_predict_offsets() -> None:
    x = _normal((B, 5, 5, 2))
    offsets = jax.ShapeDtypeStruct((B, 5, 5, 18), jnp.float32)
    predicting = jl.DeformConv(features=2, kernel_size=3)
    # Every error comes before the sampling: only init's shapes are traced (on an empty batch, without it).
    variables = jax.eval_shape(lambda x: predicting.init(jax.random.key(0), x), x[:0])
    with pytest.raises(ValueError, match=r"^`offsets` must not be passed"):
        jax.eval_shape(predicting.apply, variables, x, offsets)
    with pytest.raises(ValueError, match=r"^`mask` must not be passed"):
        jax.eval_shape(predicting.apply, variables, x, None, jax.ShapeDtypeStruct((B, 5, 5, 9), jnp.float32))
    with pytest.raises(ValueError, match=r"^`offsets` \(B, \*out_spatial"):
        jax.eval_shape(
            lambda x: jl.DeformConv(features=2, kernel_size=3, predict_offsets=False).init(jax.random.key(0), x), x
        )
    with pytest.raises(ValueError, match=r"^`use_mask` applies to predicted offsets only"):
        jl.DeformConv(features=2, kernel_size=3, use_mask=True, predict_offsets=False)
    with pytest.raises(ValueError, match=r"^`use_mask` applies to predicted offsets only"):
        jn.DeformConv(2, 2, (3, 3), use_mask=True, predict_offsets=False, rngs=nnx.Rngs(0))
    model = nnx.eval_shape(lambda: jn.DeformConv(2, 2, (3, 3), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"^`offsets` must not be passed"):
        nnx.eval_shape(_nnx_call, model, x, offsets)


def test_deform_conv_initialises_and_trains() -> None:
    """linen under ``jax.jit``: ``init`` zero-initialises ``conv_offset`` (mmcv's ``init_offset``); two optax steps
    lower the loss, and ``conv_offset`` gets a gradient through the sampling positions and the mask. One
    program: ``init``, then the two steps as a ``lax.scan`` (one copy of the gradient). 1-D: the smallest
    gradient program through predicted offsets and a mask (every rank's derivatives are
    ``tests/test_deform_conv.py``'s and the parity suite's)."""
    x = _normal((B, 6, 3))
    target = _normal((B, 6, 3), seed=4)
    layer = jl.DeformConv(features=3, kernel_size=3, use_mask=True)
    tx = optax.sgd(0.1)

    def step(carry: tuple[Any, Any], _: None) -> tuple[tuple[Any, Any], tuple[jax.Array, Any]]:
        params, state = carry
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((layer.apply({"params": p}, x) - target) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), (loss, grads)

    @jax.jit
    def train(key: jax.Array) -> tuple[Any, jax.Array, Any]:
        # Initialised on an empty batch: the same variables, without the sampling.
        params = layer.init(key, x[:0])["params"]
        _, (losses, grads) = jax.lax.scan(step, (params, tx.init(params)), length=2)
        return params, losses, jax.tree.map(lambda g: g[0], grads)

    params, losses, grads = train(jax.random.key(0))
    losses = np.asarray(losses)
    for value in params["conv_offset"].values():
        np.testing.assert_array_equal(value, 0.0)
    assert float(np.std(np.asarray(params["kernel"]))) > 0
    assert float(np.abs(grads["conv_offset"]["kernel"]).max()) > 0
    assert float(losses[1]) < float(losses[0])


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
    run = _linen_and_nnx(layer, _nnx_dcnv3(attributes, rank))
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
        for api, out in zip(("linen", "nnx"), run(initial, x), strict=True):
            assert_close(out, expected, F32_RTOL, f"regular grid, {api}")
    linen_out, nnx_out = run(variables, x)
    _same(nnx_out, linen_out)


def test_dcnv3_batch_norm() -> None:
    """``norm="batch"``, 3-D: in training linen and NNX (switched by ``model.train()``) give the same outputs and
    move the running statistics by PyTorch's momentum 0.1 (Flax's 0.9) towards the batch's, the variance towards
    the unbiased one (``n / (n - 1)`` times the biased, as ``nn.BatchNorm2d``); an empty batch leaves them alone.
    (Evaluation mode, and a training step, against InternImage's: ``parity/test_deformable_interop.py``.)"""
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
    twin = _nnx_twin(_nnx_dcnv3({**attributes, "use_running_average": True}, 3))

    @jax.jit
    def train(variables: dict, x: jax.Array) -> list[tuple[jax.Array, dict, jax.Array, dict]]:
        """On the batch and on an empty one (one program): linen's and NNX's outputs and running statistics."""
        results = []
        for batch in (x, x[:0]):
            out, updates = layer.apply(variables, batch, use_running_average=False, mutable=["batch_stats"])
            model = twin(variables)
            model.train()
            nnx_out = model(batch)
            results.append((out, updates["batch_stats"], nnx_out, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))))
        return results

    (out, stats, nnx_out, nnx_stats), empty = train(variables, x)
    _same(nnx_out, out)
    stats = stats["dw_norm"]
    _same(nnx_stats["dw_norm"]["mean"], stats["mean"], "running mean")
    _same(nnx_stats["dw_norm"]["var"], stats["var"], "running var")
    conv = variables["params"]["dw_conv"]
    before = variables["batch_stats"]["dw_norm"]
    depthwise = _conv(x, conv["kernel"], (1,) * 3, [(1, 1), (0, 0), (0, 0)], (1,) * 3, groups=4)
    depthwise = _plus_bias(depthwise, conv["bias"])
    count = depthwise.size // depthwise.shape[-1]
    batch_mean, batch_var = depthwise.mean(axis=(0, 1, 2, 3)), depthwise.var(axis=(0, 1, 2, 3))
    assert_close(stats["mean"], 0.9 * before["mean"] + 0.1 * batch_mean, 1e-5, "running mean")
    assert_close(stats["var"], 0.9 * before["var"] + 0.1 * batch_var * count / (count - 1), 1e-5, "running var")

    out, stats, nnx_out, nnx_stats = empty
    assert out.shape == nnx_out.shape == (0, 3, 3, 4, 4)
    for running in (stats, nnx_stats):
        jax.tree.map(np.testing.assert_array_equal, running, variables["batch_stats"])


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
