"""Every public entry point x every category of mistake: the exception type, and a message naming the argument.

The entry points are read from the API (``jdynconv.__all__``, ``jdynconv.linen.__all__``,
``jdynconv.nnx.__all__``), not listed here: :func:`test_every_public_entry_point_is_covered` fails when one
has no mistakes below, or lacks a category without a stated reason. Each mistake is one a user makes first:
an array of the wrong rank or shape, channels that do not match the layer's variables (NCHW data for a
channels-last layer), an integer dtype, something that is not an array (None, a string, a ragged list), a
misspelt option string, a non-positive size, and an empty batch (which must give an empty output and empty
gradients, never an error). Layer checks run on abstract values (``jax.eval_shape``): they happen at trace
time, before any computation, so no compiled program is needed to see them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jdynconv as jdc
from jdynconv import interop
from jdynconv import linen as jl
from jdynconv import nnx as jn

CATEGORIES = ("rank", "shape", "channels", "dtype", "non_array", "option", "size", "empty_batch")

B, H, W, C, F = 2, 6, 6, 4, 8
RAGGED = [[1.0, 2.0], [3.0]]


def _x(*shape: int, dtype: Any = np.float32) -> np.ndarray:
    return np.ones(shape, dtype)


@dataclasses.dataclass(frozen=True)
class Mistake:
    entry: str  # "jdynconv.per_sample_conv", "linen.CondConv", "nnx.CondConv"
    category: str
    what: str  # the mistake, as the test id
    call: Callable[[], object]
    error: type[Exception]
    argument: str  # the message starts with it in backticks; "within:" text must stand anywhere in the message

    @property
    def id(self) -> str:
        return f"{self.entry}-{self.category}-{self.what}"


MISTAKES: list[Mistake] = []
EMPTY_BATCH: dict[str, Callable[[], None]] = {}
NOT_APPLICABLE: dict[tuple[str, str], str] = {}


def mistake(entry: str, category: str, what: str, error: type[Exception], argument: str) -> Callable:
    def register(call: Callable[[], object]) -> Callable[[], object]:
        MISTAKES.append(Mistake(entry, category, what, call, error, argument))
        return call

    return register


def add(entry: str, category: str, what: str, call: Callable[[], object], error: type[Exception], argument: str):
    MISTAKES.append(Mistake(entry, category, what, call, error, argument))


# --- functions --------------------------------------------------------------------------------------------


def _functional_conv_mistakes(entry: str, fn: Callable, kernels_shape: tuple[int, ...], **extra: Any) -> None:
    """The mistakes shared by per_sample_conv and per_sample_conv_transpose (same argument names)."""
    x, k = _x(B, H, W, C), _x(*kernels_shape)
    bad_batch = _x(B + 1, *kernels_shape[1:])
    add(entry, "rank", "inputs 2-D", lambda: fn(_x(W, C), k, **extra), ValueError, "inputs")
    add(entry, "rank", "kernels missing batch", lambda: fn(x, k[0], **extra), ValueError, "kernels")
    add(entry, "shape", "kernels batch", lambda: fn(x, bad_batch, **extra), ValueError, "kernels")
    add(entry, "shape", "bias", lambda: fn(x, k, _x(3, F), **extra), ValueError, "bias")
    add(entry, "channels", "NCHW inputs", lambda: fn(_x(B, C, H, W), k, **extra), ValueError, "kernels")
    add(entry, "dtype", "int inputs", lambda: fn(_x(B, H, W, C, dtype=np.int32), k, **extra), TypeError, "inputs")
    add(entry, "dtype", "mixed kernels", lambda: fn(x, k.astype(np.float16), **extra), TypeError, "kernels")
    add(entry, "non_array", "None inputs", lambda: fn(None, k, **extra), TypeError, "inputs")
    add(entry, "non_array", "str kernels", lambda: fn(x, "kernels", **extra), TypeError, "kernels")
    add(entry, "non_array", "ragged bias", lambda: fn(x, k, RAGGED, **extra), TypeError, "bias")
    add(entry, "option", "method", lambda: fn(x, k, method="fastest", **extra), ValueError, "method")
    add(entry, "option", "data_format", lambda: fn(x, k, data_format="NHWC", **extra), ValueError, "data_format")
    add(entry, "size", "strides 0", lambda: fn(x, k, strides=0, **extra), ValueError, "strides")
    add(entry, "size", "dilation 0", lambda: fn(x, k, kernel_dilation=(1, 0), **extra), ValueError, "kernel_dilation")
    add(entry, "size", "groups 0", lambda: fn(x, k, feature_group_count=0, **extra), ValueError, "feature_group_count")

    def empty() -> None:
        def loss(inputs: jax.Array, kernels: jax.Array) -> jax.Array:
            return jnp.sum(fn(inputs, kernels, **extra))

        inputs, kernels = _x(0, H, W, C), _x(0, *kernels_shape[1:])
        out = jax.jit(lambda a, b: fn(a, b, **extra))(inputs, kernels)
        assert out.shape[0] == 0
        assert out.shape[-1] == F
        grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(inputs, kernels)
        assert grads[0].shape == inputs.shape
        assert grads[1].shape == kernels.shape

    EMPTY_BATCH[entry] = empty


_functional_conv_mistakes("jdynconv.per_sample_conv", jdc.per_sample_conv, (B, 3, 3, C, F), padding="SAME")
add(
    "jdynconv.per_sample_conv",
    "option",
    "padding",
    lambda: jdc.per_sample_conv(_x(B, H, W, C), _x(B, 3, 3, C, F), padding="FULL"),
    ValueError,
    "padding",
)
_functional_conv_mistakes("jdynconv.per_sample_conv_transpose", jdc.per_sample_conv_transpose, (B, 3, 3, F, C))
add(
    "jdynconv.per_sample_conv_transpose",
    "option",
    "form",
    lambda: jdc.per_sample_conv_transpose(_x(B, H, W, C), _x(B, 3, 3, F, C), form="fourier"),
    ValueError,
    "form",
)
add(
    "jdynconv.per_sample_conv_transpose",
    "size",
    "output_padding -1",
    lambda: jdc.per_sample_conv_transpose(_x(B, H, W, C), _x(B, 3, 3, F, C), strides=2, output_padding=-1),
    ValueError,
    "output_padding",
)


def _modulated(**overrides: Any) -> jax.Array:
    arguments = {"inputs": _x(B, H, W, C), "kernel": _x(3, 3, C, F), "styles": _x(B, C), "padding": 1}
    arguments.update(overrides)
    return jdc.modulated_conv(**arguments)


MOD = "jdynconv.modulated_conv"
add(MOD, "rank", "inputs 2-D", lambda: _modulated(inputs=_x(B, C)), ValueError, "inputs")
add(MOD, "rank", "kernel 3-D", lambda: _modulated(kernel=_x(3, C, F)), ValueError, "kernel")
add(MOD, "shape", "styles batch", lambda: _modulated(styles=_x(B + 1, C)), ValueError, "styles")
add(MOD, "shape", "noise", lambda: _modulated(noise=_x(B, 3, 3, 1)), ValueError, "noise")
add(MOD, "channels", "NCHW inputs", lambda: _modulated(inputs=_x(B, C, H, W)), ValueError, "kernel")
add(MOD, "dtype", "int inputs", lambda: _modulated(inputs=_x(B, H, W, C, dtype=np.int32)), TypeError, "inputs")
add(MOD, "dtype", "styles float16", lambda: _modulated(styles=_x(B, C, dtype=np.float16)), TypeError, "styles")
add(MOD, "non_array", "None styles", lambda: _modulated(styles=None), TypeError, "styles")
add(MOD, "non_array", "str kernel", lambda: _modulated(kernel="w"), TypeError, "kernel")
add(MOD, "non_array", "ragged filter", lambda: _modulated(up=2, resample_filter=RAGGED), TypeError, "resample_filter")
add(MOD, "option", "method (non-fused)", lambda: _modulated(fused=False, method="fastest"), ValueError, "method")
add(MOD, "option", "method (fused)", lambda: _modulated(fused=True, method="fastest"), ValueError, "method")
add(MOD, "option", "fused", lambda: _modulated(fused="yes"), ValueError, "fused")
add(MOD, "option", "flip_weight", lambda: _modulated(flip_weight="yes"), TypeError, "flip_weight")
add(MOD, "option", "data_format", lambda: _modulated(data_format="NCHW"), ValueError, "data_format")
add(MOD, "size", "up 0", lambda: _modulated(up=0), ValueError, "up")
add(MOD, "size", "down -1", lambda: _modulated(down=-1), ValueError, "down")
add(MOD, "size", "empty filter", lambda: _modulated(up=2, resample_filter=[]), ValueError, "resample_filter")
add(MOD, "size", "epsilon", lambda: _modulated(epsilon=-1.0), ValueError, "epsilon")


def _modulated_empty() -> None:
    for fused in (True, False):
        for up in (1, 2):

            def loss(inputs: jax.Array, kernel: jax.Array, styles: jax.Array, fused=fused, up=up) -> jax.Array:
                return jnp.sum(jdc.modulated_conv(inputs, kernel, styles, padding=1, up=up, fused=fused))

            arrays = (_x(0, H, W, C), _x(3, 3, C, F), _x(0, C))
            out = jax.jit(
                lambda a, b, c, fused=fused, up=up: _modulated(inputs=a, kernel=b, styles=c, up=up, fused=fused)
            )(*arrays)
            assert out.shape[0] == 0
            assert out.shape[-1] == F
            grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*arrays)
            assert [g.shape for g in grads] == [a.shape for a in arrays]
            np.testing.assert_array_equal(grads[1], 0.0)  # no sample, no kernel gradient


EMPTY_BATCH[MOD] = _modulated_empty

MO = "jdynconv.mix_outputs"
add(MO, "rank", "outputs 1-D", lambda: jdc.mix_outputs(_x(B), _x(B, 3)), ValueError, "outputs")
add(MO, "shape", "weights k", lambda: jdc.mix_outputs(_x(B, 3, 5), _x(B, 4)), ValueError, "weights")
add(
    MO,
    "dtype",
    "weights float16",
    lambda: jdc.mix_outputs(_x(B, 3, 5), _x(B, 3, dtype=np.float16)),
    TypeError,
    "weights",
)
add(MO, "non_array", "None weights", lambda: jdc.mix_outputs(_x(B, 3, 5), None), TypeError, "weights")
add(MO, "non_array", "ragged outputs", lambda: jdc.mix_outputs(RAGGED, _x(B, 3)), TypeError, "outputs")
add(MO, "option", "axis 0", lambda: jdc.mix_outputs(_x(B, 3, 5), _x(B, 3), axis=0), ValueError, "axis")
add(MO, "option", "axis str", lambda: jdc.mix_outputs(_x(B, 3, 5), _x(B, 3), axis="k"), ValueError, "axis")
NOT_APPLICABLE[(MO, "channels")] = "no channel axis: any (B, k, ...) array"
NOT_APPLICABLE[(MO, "size")] = "no size argument"


def _mix_outputs_empty() -> None:
    outputs, weights = _x(0, 3, 5), _x(0, 3)
    assert jdc.mix_outputs(outputs, weights).shape == (0, 5)
    grads = jax.grad(lambda o, w: jnp.sum(jdc.mix_outputs(o, w)), argnums=(0, 1))(outputs, weights)
    assert grads[0].shape == outputs.shape
    assert grads[1].shape == weights.shape


EMPTY_BATCH[MO] = _mix_outputs_empty

MK = "jdynconv.mix_kernels"
add(MK, "rank", "weights 1-D", lambda: jdc.mix_kernels(_x(3, 3, C, F), _x(3)), ValueError, "weights")
add(MK, "rank", "bank 0-D", lambda: jdc.mix_kernels(np.float32(1), _x(B, 3)), ValueError, "bank")
add(MK, "shape", "weights k", lambda: jdc.mix_kernels(_x(3, 3, C, F), _x(B, 4)), ValueError, "weights")
add(MK, "dtype", "int bank", lambda: jdc.mix_kernels(_x(3, 3, dtype=np.int32), _x(B, 3)), TypeError, "bank")
add(MK, "non_array", "None bank", lambda: jdc.mix_kernels(None, _x(B, 3)), TypeError, "bank")
add(MK, "non_array", "str weights", lambda: jdc.mix_kernels(_x(3, 3), "w"), TypeError, "weights")
NOT_APPLICABLE[(MK, "channels")] = "no channel axis: any (k, ...) bank"
NOT_APPLICABLE[(MK, "option")] = "no option string"
NOT_APPLICABLE[(MK, "size")] = "no size argument"


def _mix_kernels_empty() -> None:
    bank, weights = _x(3, 3, C, F), _x(0, 3)
    assert jdc.mix_kernels(bank, weights).shape == (0, 3, C, F)
    grads = jax.grad(lambda b, w: jnp.sum(jdc.mix_kernels(b, w)), argnums=(0, 1))(bank, weights)
    assert grads[0].shape == bank.shape
    assert grads[1].shape == weights.shape


EMPTY_BATCH[MK] = _mix_kernels_empty

TS = "jdynconv.temperature_schedule"
add(TS, "rank", "step vector", lambda: jdc.temperature_schedule(_x(3), anneal_steps=10), ValueError, "step")
add(TS, "dtype", "step str", lambda: jdc.temperature_schedule("10", anneal_steps=10), TypeError, "step")
add(TS, "non_array", "step None", lambda: jdc.temperature_schedule(None, anneal_steps=10), TypeError, "step")
add(TS, "size", "start 0", lambda: jdc.temperature_schedule(1, start=0.0, anneal_steps=10), ValueError, "start")
add(TS, "size", "end -1", lambda: jdc.temperature_schedule(1, end=-1.0, anneal_steps=10), ValueError, "end")
add(TS, "size", "end nan", lambda: jdc.temperature_schedule(1, end=float("nan"), anneal_steps=10), ValueError, "end")
add(TS, "size", "anneal_steps 0", lambda: jdc.temperature_schedule(1, anneal_steps=0), ValueError, "anneal_steps")
add(
    TS,
    "shape",
    "start vector",
    lambda: jdc.temperature_schedule(1, start=[30.0, 1.0], anneal_steps=10),
    ValueError,
    "start",
)
NOT_APPLICABLE[(TS, "channels")] = "a scalar schedule"
NOT_APPLICABLE[(TS, "option")] = "no option string"
NOT_APPLICABLE[(TS, "empty_batch")] = "no batch"


DC = "jdynconv.deform_conv"
DEFORM_ARRAYS = {"inputs": _x(B, H, W, C), "offsets": _x(B, H, W, 18), "kernel": _x(3, 3, C, F)}


def _deform(**overrides: Any) -> jax.Array:
    return jdc.deform_conv(**{**DEFORM_ARRAYS, "padding": 1, **overrides})


add(DC, "rank", "inputs 2-D", lambda: _deform(inputs=_x(W, C)), ValueError, "inputs")
add(DC, "rank", "kernel 3-D", lambda: _deform(kernel=_x(3, C, F)), ValueError, "kernel")
add(DC, "shape", "offsets batch", lambda: _deform(offsets=_x(B + 1, H, W, 18)), ValueError, "offsets")
add(DC, "shape", "mask taps", lambda: _deform(mask=_x(B, H, W, 10)), ValueError, "mask")
add(DC, "shape", "bias", lambda: _deform(bias=_x(F + 1)), ValueError, "bias")
add(DC, "channels", "NCHW inputs", lambda: _deform(inputs=_x(B, C, H, W)), ValueError, "kernel")
add(DC, "channels", "3 offset groups", lambda: _deform(offsets=_x(B, H, W, 54)), ValueError, "offsets")
add(DC, "channels", "0 channels", lambda: _deform(inputs=_x(B, H, W, 0), kernel=_x(3, 3, 0, F)), ValueError, "inputs")
add(DC, "dtype", "int inputs", lambda: _deform(inputs=_x(B, H, W, C, dtype=np.int32)), TypeError, "inputs")
add(DC, "dtype", "offsets float16", lambda: _deform(offsets=_x(B, H, W, 18, dtype=np.float16)), TypeError, "offsets")
add(DC, "non_array", "None offsets", lambda: _deform(offsets=None), TypeError, "offsets")
add(DC, "non_array", "str kernel", lambda: _deform(kernel="w"), TypeError, "kernel")
add(DC, "non_array", "ragged mask", lambda: _deform(mask=RAGGED), TypeError, "mask")
add(DC, "option", "data_format", lambda: _deform(data_format="NHWC"), ValueError, "data_format")
add(DC, "option", "padding", lambda: _deform(padding="FULL"), ValueError, "padding")
add(DC, "size", "strides 0", lambda: _deform(strides=0), ValueError, "strides")
add(DC, "size", "dilation 0", lambda: _deform(kernel_dilation=(1, 0)), ValueError, "kernel_dilation")
add(DC, "size", "groups 0", lambda: _deform(feature_group_count=0), ValueError, "feature_group_count")


def _deform_empty() -> None:
    arrays = (_x(0, H, W, C), _x(0, H, W, 18), _x(3, 3, C, F), _x(0, H, W, 9))

    def loss(*arrays: jax.Array) -> jax.Array:
        inputs, offsets, kernel, mask = arrays
        return jnp.sum(jdc.deform_conv(inputs, offsets, kernel, mask=mask, padding=1))

    out = jax.jit(lambda *a: jdc.deform_conv(*a[:3], mask=a[3], padding=1))(*arrays)
    assert out.shape == (0, H, W, F)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*arrays)
    assert [g.shape for g in grads] == [a.shape for a in arrays]
    np.testing.assert_array_equal(grads[2], 0.0)  # no sample, no kernel gradient


EMPTY_BATCH[DC] = _deform_empty

V3 = "jdynconv.dcnv3"
DCNV3_GROUPS = 2
DCNV3_ARRAYS = {"inputs": _x(B, H, W, C), "offsets": _x(B, H, W, 2 * 9 * 2), "mask": _x(B, H, W, 2 * 9)}


def _dcnv3(**overrides: Any) -> jax.Array:
    return jdc.dcnv3(**{**DCNV3_ARRAYS, "kernel_size": 3, "padding": 1, "groups": DCNV3_GROUPS, **overrides})


add(V3, "rank", "inputs 2-D", lambda: _dcnv3(inputs=_x(W, C)), ValueError, "inputs")
add(V3, "rank", "offsets 3-D", lambda: _dcnv3(offsets=_x(B, H, 36)), ValueError, "offsets")
add(V3, "shape", "mask taps", lambda: _dcnv3(mask=_x(B, H, W, 19)), ValueError, "mask")
add(V3, "channels", "5 channels", lambda: _dcnv3(inputs=_x(B, H, W, 5)), ValueError, "inputs")
add(V3, "channels", "NCHW inputs", lambda: _dcnv3(inputs=_x(B, C, H, W)), ValueError, "offsets")
add(V3, "channels", "0 channels", lambda: _dcnv3(inputs=_x(B, H, W, 0)), ValueError, "inputs")
add(V3, "dtype", "int inputs", lambda: _dcnv3(inputs=_x(B, H, W, C, dtype=np.int32)), TypeError, "inputs")
add(V3, "dtype", "mask float16", lambda: _dcnv3(mask=_x(B, H, W, 18, dtype=np.float16)), TypeError, "mask")
add(V3, "non_array", "None mask", lambda: _dcnv3(mask=None), TypeError, "mask")
add(V3, "non_array", "str offsets", lambda: _dcnv3(offsets="o"), TypeError, "offsets")
add(V3, "option", "remove_center str", lambda: _dcnv3(remove_center="yes"), TypeError, "remove_center")
add(V3, "option", "remove_center even", lambda: _dcnv3(remove_center=True, kernel_size=2), ValueError, "remove_center")
add(V3, "size", "kernel_size 0", lambda: _dcnv3(kernel_size=0), ValueError, "kernel_size")
add(V3, "size", "groups 0", lambda: _dcnv3(groups=0), ValueError, "groups")
add(V3, "size", "offset_scale 0", lambda: _dcnv3(offset_scale=0.0), ValueError, "offset_scale")
add(V3, "size", "padding -1", lambda: _dcnv3(padding=-1), ValueError, "padding")


def _dcnv3_empty() -> None:
    arrays = (_x(0, H, W, C), _x(0, H, W, 36), _x(0, H, W, 18))

    def loss(*arrays: jax.Array) -> jax.Array:
        return jnp.sum(jdc.dcnv3(*arrays, kernel_size=3, padding=1, groups=DCNV3_GROUPS))

    out = jax.jit(lambda *a: jdc.dcnv3(*a, kernel_size=3, padding=1, groups=DCNV3_GROUPS))(*arrays)
    assert out.shape == (0, H, W, C)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*arrays)
    assert [g.shape for g in grads] == [a.shape for a in arrays]


EMPTY_BATCH[V3] = _dcnv3_empty


# --- layers -----------------------------------------------------------------------------------------------

X = _x(B, H, W, C)
KEY = jax.random.key(0)


@dataclasses.dataclass(frozen=True)
class Layer:
    """How to build and call one layer in both APIs, from its linen attributes."""

    name: str
    attributes: dict[str, Any]  # linen attributes (NNX takes the same as keyword arguments)
    nnx_positional: Callable[[dict[str, Any]], tuple]  # NNX's positional arguments from the attributes
    call_args: Callable[[np.ndarray], tuple] = lambda x: ()  # extra positional call arguments for inputs x
    call_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    nnx_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # NNX-only constructor arguments
    mutable: tuple[str, ...] = ()
    rngs: tuple[str, ...] = ()


def _features_kernel(a: dict[str, Any]) -> tuple:
    return (C, a["features"], a["kernel_size"])


LAYERS = [
    Layer(
        "BranchMixConv",
        {"features": F, "kernel_size": (3, 3), "num_branches": 3},
        lambda a: (C, a["features"], a["kernel_size"], a["num_branches"]),
        call_kwargs={"use_running_average": False},
        nnx_kwargs={"input_shape": (H, W)},
        mutable=("batch_stats",),
    ),
    Layer(
        "PerSampleConv",
        {"features": F, "kernel_size": (3, 3)},
        _features_kernel,
        call_args=lambda x: (_x(x.shape[0], 3, 3, C, F),),
    ),
    Layer(
        "CondConv",
        {"features": F, "kernel_size": (3, 3), "num_experts": 3},
        lambda a: (C, a["features"], a["kernel_size"], a["num_experts"]),
    ),
    Layer(
        "DynamicConv",
        {"features": F, "kernel_size": (3, 3), "num_experts": 3},
        lambda a: (C, a["features"], a["kernel_size"], a["num_experts"]),
    ),
    Layer(
        "ODConv",
        {"features": F, "kernel_size": (3, 3), "num_experts": 3},
        _features_kernel,
        call_kwargs={"use_running_average": False},
        mutable=("batch_stats",),
    ),
    Layer(
        "ModulatedConv",
        {"features": F, "kernel_size": (3, 3)},
        _features_kernel,
        call_args=lambda x: (_x(x.shape[0], 5),),
        nnx_kwargs={"latent_features": 5},
    ),
    Layer("DeformConv", {"features": F, "kernel_size": (3, 3), "offset_groups": 2, "use_mask": True}, _features_kernel),
    Layer("DCNv3", {"channels": C, "kernel_size": (3, 3), "groups": 2}, lambda a: (a["channels"],)),
]
LAYER_BY_NAME = {layer.name: layer for layer in LAYERS}


def linen_apply(layer: Layer, inputs: Any, *call_args: Any, attributes: dict | None = None, **call_kwargs: Any):
    """Initialises on valid inputs (abstractly), then applies to ``inputs``: the call-time checks against the
    layer's variables are the ones under test."""
    module = getattr(jl, layer.name)(**{**layer.attributes, **(attributes or {})})
    valid = (X, *layer.call_args(X))
    variables = jax.eval_shape(lambda: module.init(KEY, *valid, **layer.call_kwargs))
    args = call_args if call_args else layer.call_args(np.asarray(inputs) if _array_like(inputs) else X)
    kwargs = {**layer.call_kwargs, **call_kwargs}
    return jax.eval_shape(lambda v: module.apply(v, inputs, *args, mutable=list(layer.mutable), **kwargs), variables)


def nnx_model(layer: Layer, attributes: dict | None = None) -> nnx.Module:
    merged = {**layer.attributes, **(attributes or {})}
    positional = layer.nnx_positional(merged)
    parameters = inspect.signature(getattr(jn, layer.name).__init__).parameters
    given = ("channels",) if layer.name == "DCNv3" else ("features", "kernel_size")  # positionally
    keywords = {name: value for name, value in merged.items() if name not in given and name in parameters}
    if layer.name == "BranchMixConv":
        keywords.pop("num_branches", None)
    elif layer.name in ("CondConv", "DynamicConv"):
        keywords.pop("num_experts", None)
    return getattr(jn, layer.name)(*positional, **keywords, **layer.nnx_kwargs, rngs=nnx.Rngs(0, noise=1))


def nnx_apply(layer: Layer, inputs: Any, *call_args: Any, attributes: dict | None = None, **call_kwargs: Any):
    model = nnx_model(layer, attributes)
    args = call_args if call_args else layer.call_args(np.asarray(inputs) if _array_like(inputs) else X)
    kwargs = {key: value for key, value in {**layer.call_kwargs, **call_kwargs}.items() if key != "use_running_average"}
    return model(inputs, *args, **kwargs)


def _array_like(value: Any) -> bool:
    return isinstance(value, np.ndarray)


def _layer_mistakes(api: str, layer: Layer) -> None:
    entry = f"{api}.{layer.name}"
    apply = linen_apply if api == "linen" else nnx_apply

    def call(inputs: Any, *args: Any, **kwargs: Any) -> Callable[[], object]:
        return lambda: apply(layer, inputs, *args, **kwargs)

    def build(**attributes: Any) -> Callable[[], object]:
        if api == "linen":
            return lambda: linen_apply(layer, X, attributes=attributes)
        return lambda: nnx_model(layer, attributes)

    add(entry, "rank", "1-D inputs", call(_x(B, W, C)), ValueError, "inputs")
    add(entry, "rank", "unbatched inputs", call(_x(H, W, C)), ValueError, "inputs")
    # linen's PerSampleConv has no variables: its kernels fix the channels, and they are what mismatches.
    channels_argument = "kernels" if (api, layer.name) == ("linen", "PerSampleConv") else "inputs"
    add(entry, "channels", "5 channels", call(_x(B, H, W, 5)), ValueError, channels_argument)
    add(entry, "channels", "NCHW inputs", call(_x(B, C, H, W)), ValueError, channels_argument)
    add(entry, "dtype", "int inputs", call(_x(B, H, W, C, dtype=np.int32)), TypeError, "inputs")
    add(entry, "non_array", "None inputs", call(None), TypeError, "inputs")
    add(entry, "non_array", "ragged inputs", call(RAGGED), TypeError, "inputs")
    add(entry, "option", "padding", build(padding="FULL"), ValueError, "padding")
    size = "channels" if layer.name == "DCNv3" else "features"
    add(entry, "size", f"{size} 0", build(**{size: 0}), ValueError, size)
    add(entry, "size", "kernel_size 0", build(kernel_size=(3, 0)), ValueError, "kernel_size")
    if layer.name not in ("ModulatedConv", "DeformConv", "DCNv3"):
        add(entry, "option", "method", build(method="fastest"), ValueError, "method")
    if layer.name != "ModulatedConv":
        add(entry, "size", "strides 0", build(strides=0), ValueError, "strides")
    if layer.name == "BranchMixConv":
        add(entry, "size", "num_branches 0", build(num_branches=0), ValueError, "num_branches")
        add(entry, "option", "gate_input", build(gate_input="max"), ValueError, "gate_input")
        add(entry, "shape", "gate_weights", call(X, gate_weights=_x(B, 4)), ValueError, "gate_weights")
        add(entry, "non_array", "str gate_weights", call(X, gate_weights="w"), TypeError, "gate_weights")
        add(
            entry,
            "dtype",
            "int gate_weights",
            call(X, gate_weights=_x(B, 3, dtype=np.int32)),
            TypeError,
            "gate_weights",
        )
        add(entry, "size", "temperature 0", call(X, temperature=0.0), ValueError, "temperature")
    if layer.name == "PerSampleConv":
        add(entry, "shape", "kernels batch", call(X, _x(B + 1, 3, 3, C, F)), ValueError, "kernels")
        add(entry, "non_array", "None kernels", call(X, None), TypeError, "kernels")
    if layer.name in ("CondConv", "DynamicConv"):
        add(entry, "size", "num_experts 0", build(num_experts=0), ValueError, "num_experts")
        add(entry, "option", "mixing", build(mixing="sum"), ValueError, "mixing")
    if layer.name == "CondConv":
        add(entry, "shape", "routing_weights", call(X, _x(B, 4)), ValueError, "routing_weights")
        add(entry, "non_array", "ragged routing_weights", call(X, RAGGED), TypeError, "routing_weights")
        add(
            entry,
            "shape",
            "no routing_weights without use_routing",
            lambda: apply(layer, X, None, attributes={"use_routing": False}),
            ValueError,
            "routing_weights",
        )
    if layer.name == "DynamicConv":
        add(entry, "size", "ratio 0", build(ratio=0.0), ValueError, "ratio")
        add(entry, "size", "temperature 0", call(X, 0.0), ValueError, "temperature")
        add(entry, "shape", "temperature vector", call(X, _x(2)), ValueError, "temperature")
        add(entry, "non_array", "str attention_weights", call(X, None, "w"), TypeError, "attention_weights")
        add(entry, "size", "temperature attribute 0", build(temperature=0.0), ValueError, "temperature")
    if layer.name == "ODConv":
        add(entry, "size", "num_experts 0", build(num_experts=0), ValueError, "num_experts")
        add(entry, "size", "reduction 0", build(reduction=0.0), ValueError, "reduction")
        add(entry, "size", "min_channels 0", build(min_channels=0), ValueError, "min_channels")
        add(entry, "option", "attention_placement", build(attention_placement="x"), ValueError, "attention_placement")
        add(entry, "size", "temperature -1", call(X, -1.0), ValueError, "temperature")
        add(entry, "shape", "temperature vector", call(X, _x(2)), ValueError, "temperature")
    if layer.name == "ModulatedConv":
        add(entry, "shape", "latents width", call(X, _x(B, 6)), ValueError, "latents")
        add(entry, "shape", "latents batch", call(X, _x(B + 1, 5)), ValueError, "latents")
        add(entry, "non_array", "None latents", call(X, None), TypeError, "latents")
        add(entry, "option", "activation", build(activation="relu"), ValueError, "activation")
        add(entry, "option", "noise_mode", call(X, noise_mode="fixed"), ValueError, "noise_mode")
        add(entry, "option", "method", build(method="fastest"), ValueError, "method")
        add(entry, "option", "fused", build(fused="yes"), ValueError, "fused")
        add(entry, "option", "flip_weight", build(flip_weight="yes"), TypeError, "flip_weight")
        add(entry, "size", "up 0", build(up=0), ValueError, "up")
        add(entry, "size", "empty filter", build(up=2, resample_filter=()), ValueError, "resample_filter")
        add(entry, "size", "lr_multiplier 0", build(lr_multiplier=0.0), ValueError, "lr_multiplier")

    if layer.name == "DeformConv":
        _deform_conv_layer_mistakes(api, entry, apply, build)
    if layer.name == "DCNv3":
        add(entry, "size", "groups 0", build(groups=0), ValueError, "groups")
        add(entry, "size", "groups 3 for 4 channels", build(groups=3), ValueError, "channels")
        add(entry, "size", "dw_kernel_size even", build(dw_kernel_size=4), ValueError, "dw_kernel_size")
        add(entry, "size", "offset_scale 0", build(offset_scale=0.0), ValueError, "offset_scale")
        add(entry, "option", "norm", build(norm="group"), ValueError, "norm")
        add(entry, "option", "activation str", build(activation="gelu"), TypeError, "activation")
        add(
            entry,
            "option",
            "center_feature_scale",
            build(center_feature_scale="yes"),
            TypeError,
            "center_feature_scale",
        )
        # InternImage's module predicts offsets at the input's size: the sampling grid must keep it.
        for change in ({"strides": 2}, {"padding": 0}):
            what = f"grid size with {change}"
            add(entry, "shape", what, lambda change=change: apply(layer, X, attributes=change), ValueError, "strides")

    def empty() -> None:
        inputs = _x(0, H, W, C)
        extra = layer.call_args(inputs)
        if api == "linen":
            module = getattr(jl, layer.name)(**layer.attributes)
            # Under jit: op by op, each operation is a program of its own (a deformable layer's sampling has many).
            variables = jax.jit(lambda: module.init(KEY, X, *layer.call_args(X), **layer.call_kwargs))()

            def loss(params: Any, inputs: jax.Array) -> jax.Array:
                out, updates = module.apply(
                    {**variables, "params": params},
                    inputs,
                    *extra,
                    mutable=list(layer.mutable),
                    rngs={"noise": KEY},
                    **layer.call_kwargs,
                )
                assert out.shape[0] == 0
                return jnp.sum(out), updates

            params = variables.get("params", {})  # PerSampleConv has none
            (_, updates), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, inputs)
            assert jax.tree.structure(grads) == jax.tree.structure(params)
            for grad in jax.tree.leaves(grads):
                np.testing.assert_array_equal(grad, 0.0)
            for name, stats in updates.items():  # an empty batch leaves the running statistics as they were
                jax.tree.map(np.testing.assert_array_equal, stats, variables[name])
        else:
            model = nnx_model(layer)
            before = nnx.state(model, nnx.BatchStat)
            kwargs = {key: v for key, v in layer.call_kwargs.items() if key != "use_running_average"}

            def loss(model: nnx.Module, inputs: jax.Array) -> jax.Array:
                out = model(inputs, *extra, **kwargs)
                assert out.shape[0] == 0
                return jnp.sum(out)

            grads = nnx.jit(nnx.grad(loss))(model, inputs)
            for grad in jax.tree.leaves(grads):
                np.testing.assert_array_equal(grad, 0.0)
            jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.BatchStat), before)

    EMPTY_BATCH[entry] = empty


def _deform_conv_layer_mistakes(api: str, entry: str, apply: Callable, build: Callable) -> None:
    """DeformConv's own: its offset groups, the offsets its attributes allow at the call, and, without
    ``predict_offsets``, the offsets and mask the call passes."""
    layer = LAYER_BY_NAME["DeformConv"]
    add(entry, "size", "offset_groups 0", build(offset_groups=0), ValueError, "offset_groups")
    add(entry, "option", "predict_offsets str", build(predict_offsets="yes"), TypeError, "predict_offsets")
    add(entry, "option", "use_mask without predict_offsets", build(predict_offsets=False), ValueError, "use_mask")
    # 4 channels in 3 offset groups: NNX knows C_in at construction, linen at the call.
    channels_argument = "in_features" if api == "nnx" else "inputs"
    add(entry, "channels", "3 offset groups", build(offset_groups=3), ValueError, channels_argument)
    offsets = _x(B, H, W, 2 * 9 * 2)
    add(entry, "shape", "offsets to a predicting layer", lambda: apply(layer, X, offsets), ValueError, "offsets")

    def passing(*call: Any) -> Callable[[], object]:
        """A layer without ``predict_offsets`` (torchvision's DeformConv2d), called with ``X`` and ``call``."""

        def run() -> object:
            if api == "linen":
                module = jl.DeformConv(F, (3, 3), offset_groups=2, predict_offsets=False)
                variables = jax.eval_shape(module.init, KEY, X, offsets)
                return jax.eval_shape(lambda v: module.apply(v, X, *call), variables)
            model = jn.DeformConv(C, F, (3, 3), offset_groups=2, predict_offsets=False, rngs=nnx.Rngs(0))
            return model(X, *call)

        return run

    add(entry, "shape", "no offsets without predict_offsets", passing(), ValueError, "offsets")
    add(entry, "shape", "offsets size", passing(_x(B, H - 1, W, 36)), ValueError, "offsets")
    add(entry, "shape", "mask taps", passing(offsets, _x(B, H, W, 20)), ValueError, "mask")
    add(entry, "dtype", "int offsets", passing(offsets.astype(np.int32)), TypeError, "offsets")
    add(entry, "non_array", "str offsets", passing("offsets"), TypeError, "offsets")
    add(entry, "non_array", "ragged mask", passing(offsets, RAGGED), TypeError, "mask")


for _api in ("linen", "nnx"):
    for _layer in LAYERS:
        _layer_mistakes(_api, _layer)


# --- per-position convolution: the function and its three layers ------------------------------------------

PP = "jdynconv.per_position_conv"
T, HEADS = 7, 2


def _per_position(**overrides: Any) -> jax.Array:
    return jdc.per_position_conv(**{"inputs": _x(B, T, C), "kernels": _x(B, T, HEADS, 3), **overrides})


add(PP, "rank", "inputs 1-D", lambda: _per_position(inputs=_x(T, C)), ValueError, "inputs")
add(PP, "rank", "kernels 3-D", lambda: _per_position(kernels=_x(B, T, 3)), ValueError, "kernels")
add(PP, "shape", "kernels batch", lambda: _per_position(kernels=_x(B + 1, T, HEADS, 3)), ValueError, "kernels")
add(PP, "shape", "kernels out_spatial", lambda: _per_position(kernels=_x(B, T - 1, HEADS, 3)), ValueError, "kernels")
add(PP, "channels", "3 groups of 4 channels", lambda: _per_position(kernels=_x(B, T, 3, 3)), ValueError, "kernels")
add(PP, "channels", "0 channels", lambda: _per_position(inputs=_x(B, T, 0)), ValueError, "inputs")
add(PP, "dtype", "int inputs", lambda: _per_position(inputs=_x(B, T, C, dtype=np.int32)), TypeError, "inputs")
add(
    PP,
    "dtype",
    "kernels float16",
    lambda: _per_position(kernels=_x(B, T, HEADS, 3, dtype=np.float16)),
    TypeError,
    "kernels",
)
add(PP, "non_array", "None kernels", lambda: _per_position(kernels=None), TypeError, "kernels")
add(PP, "non_array", "ragged inputs", lambda: _per_position(inputs=RAGGED), TypeError, "inputs")
add(PP, "option", "data_format", lambda: _per_position(data_format="NWC"), ValueError, "data_format")
add(PP, "option", "padding", lambda: _per_position(padding="FULL"), ValueError, "padding")
add(PP, "size", "strides 0", lambda: _per_position(strides=0), ValueError, "strides")
add(PP, "size", "kernel_dilation 0", lambda: _per_position(kernel_dilation=0), ValueError, "kernel_dilation")


def _per_position_empty() -> None:
    arrays = (_x(0, T, C), _x(0, T, HEADS, 3))
    out = jax.jit(jdc.per_position_conv)(*arrays)
    assert out.shape == (0, T, C)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(jdc.per_position_conv(*a)), argnums=(0, 1)))(*arrays)
    assert [g.shape for g in grads] == [a.shape for a in arrays]


EMPTY_BATCH[PP] = _per_position_empty

SEQUENCE = _x(B, T, C)
IMAGE = _x(B, H, W, 16)  # Involution: group_channels 16 by default


def _per_position_layer(api: str, name: str, **attributes: Any) -> Any:
    """The layer ``name`` with small settings; NNX takes the channels (and a kernel size per dim) first."""
    if name == "Involution":
        settings = {"kernel_size": (3, 3), "reduction_ratio": 4} | attributes
        if api == "linen":
            return jl.Involution(**settings)
        return jn.Involution(16, settings.pop("kernel_size"), **settings, rngs=nnx.Rngs(0))
    settings = {"kernel_size": 3, "num_heads": HEADS, "padding": "CAUSAL"} | attributes
    if api == "linen":
        return getattr(jl, name)(**settings)
    return getattr(jn, name)(C, settings.pop("kernel_size"), **settings, rngs=nnx.Rngs(0))


def _per_position_call(api: str, name: str, inputs: Any, *args: Any, **attributes: Any) -> Callable[[], object]:
    def run() -> object:
        layer = _per_position_layer(api, name, **attributes)
        example = IMAGE if name == "Involution" else SEQUENCE
        kwargs = {"use_running_average": True} if name == "Involution" else {"deterministic": True}
        if api == "nnx":
            return layer(inputs, *args, **kwargs)
        variables = jax.eval_shape(lambda: layer.init(KEY, example, **kwargs))
        return jax.eval_shape(lambda v: layer.apply(v, inputs, *args, **kwargs), variables)

    return run


def _per_position_layer_mistakes(api: str, name: str) -> None:
    entry = f"{api}.{name}"
    image = name == "Involution"
    call = functools.partial(_per_position_call, api, name)

    def build(**attributes: Any) -> Callable[[], object]:
        return call(IMAGE if image else SEQUENCE, **attributes)

    good = IMAGE if image else SEQUENCE
    add(entry, "rank", "unbatched inputs", call(good[0]), ValueError, "inputs")
    add(entry, "channels", "channels", call(_x(B, H, W, 24) if image else _x(B, T, 5)), ValueError, "inputs")
    add(entry, "dtype", "int inputs", call(good.astype(np.int32)), TypeError, "inputs")
    add(entry, "non_array", "None inputs", call(None), TypeError, "inputs")
    add(entry, "non_array", "ragged inputs", call(RAGGED), TypeError, "inputs")
    add(entry, "size", "kernel_size 0", build(kernel_size=(3, 0) if image else 0), ValueError, "kernel_size")
    if image:
        add(entry, "size", "group_channels 0", build(group_channels=0), ValueError, "group_channels")
        add(entry, "option", "strides str", build(strides="2"), TypeError, "strides")
        NOT_APPLICABLE[(entry, "shape")] = "one input array: its shape errors are rank and channels"
    else:
        add(entry, "option", "padding", build(padding="FULL"), ValueError, "padding")
        add(entry, "size", "num_heads 0", build(num_heads=0), ValueError, "num_heads")
        add(entry, "size", "weight_dropout 1", build(weight_dropout=1.0), ValueError, "weight_dropout")
        if name == "DynamicLightweightConv":
            add(entry, "shape", "query length", call(SEQUENCE, _x(B, T + 1, 3)), ValueError, "query")
            add(entry, "non_array", "str query", call(SEQUENCE, "q"), TypeError, "query")
        else:
            NOT_APPLICABLE[(entry, "shape")] = "one input array: its shape errors are rank and channels"

    def empty() -> None:
        layer = _per_position_layer(api, name)
        inputs = _x(0, H, W, 16) if image else _x(0, T, C)
        kwargs = {"use_running_average": False} if image else {"deterministic": True}
        if api == "linen":
            variables = jax.jit(lambda: layer.init(KEY, good, **kwargs))()

            def loss(params: Any) -> tuple[jax.Array, Any]:
                out, updates = layer.apply({**variables, "params": params}, inputs, mutable=["batch_stats"], **kwargs)
                assert out.shape[0] == 0
                return jnp.sum(out), updates

            (_, updates), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
            for name_, stats in updates.items():  # an empty batch leaves the running statistics as they were
                jax.tree.map(np.testing.assert_array_equal, stats, variables[name_])
        else:
            if image:
                layer.train()

            def nnx_loss(model: nnx.Module) -> jax.Array:
                out = model(inputs)
                assert out.shape[0] == 0
                return jnp.sum(out)

            grads = nnx.jit(nnx.grad(nnx_loss))(layer)
        for grad in jax.tree.leaves(grads):
            np.testing.assert_array_equal(grad, 0.0)

    EMPTY_BATCH[entry] = empty


for _api in ("linen", "nnx"):
    for _name in ("Involution", "LightweightConv", "DynamicLightweightConv"):
        _per_position_layer_mistakes(_api, _name)

NOT_APPLICABLE[("nnx.NoiseConst", "*")] = "a variable type (ModulatedConv's noise_const), not a layer"


# --- interop ----------------------------------------------------------------------------------------------
# Its entry points take modules and state dicts, not batches: the tensor categories become the state dict's
# (a value of the wrong rank or shape, weights for other channels, integer weights); the errors name the key.

NO_BATCH = "no batch: weights and modules, not activations"
NO_TENSOR = "takes no array"
NO_OPTION = "no option string"
NO_SIZE = "no size argument"
RULE_DATA = "a data type of the rule mechanism (built by the rule helpers, checked where a conversion uses it)"
for _name in (
    "Converter",
    "Dim",
    "LoadError",
    "Permutation",
    "ReshapedPermutation",
    "Rule",
    "StateDictError",
    "Target",
    "TorchPort",
):
    NOT_APPLICABLE[(f"interop.{_name}", "*")] = RULE_DATA
NOT_APPLICABLE[("interop.known_torch_layers", "*")] = "takes no argument"

COND = {"features": F, "kernel_size": (3, 3), "num_experts": 2}


def _cond_linen() -> Any:
    return jl.CondConv(**COND)


def _cond_nnx(in_features: int = C) -> Any:
    return jn.CondConv(in_features, F, (3, 3), 2, rngs=nnx.Rngs(0))


def _state_dict(**changes: Any) -> dict[str, np.ndarray]:
    """CondConv's PyTorch state dict (timm's names), with entries replaced."""
    state = interop.nnx_to_torch(_cond_nnx())
    state.update(changes)
    return state


def _interop_mistakes() -> None:
    weight = _state_dict()["weight"]
    wide = interop.nnx_to_torch(_cond_nnx(in_features=C + 1))
    for entry, load in (
        ("interop.torch_to_linen", lambda sd: interop.torch_to_linen(_cond_linen(), sd)),
        ("interop.torch_to_nnx", lambda sd: interop.torch_to_nnx(_cond_nnx(), sd)),
    ):
        add(
            entry,
            "rank",
            "weight 1-D",
            lambda load=load: load(_state_dict(weight=weight.ravel())),
            ValueError,
            "within:weight",
        )
        add(
            entry,
            "shape",
            "weight",
            lambda load=load: load(_state_dict(weight=weight[:1])),
            ValueError,
            "within:weight",
        )
        add(
            entry,
            "dtype",
            "int weight",
            lambda load=load: load(_state_dict(weight=weight.astype(np.int32))),
            ValueError,
            "within:weight",
        )
        add(
            entry,
            "dtype",
            "NaN weight",
            lambda load=load: load(_state_dict(weight=weight * np.nan)),
            ValueError,
            "within:weight",
        )
        add(entry, "non_array", "None", lambda load=load: load(None), TypeError, "state_dict")
        add(
            entry, "non_array", "str value", lambda load=load: load(_state_dict(weight="w")), TypeError, "within:weight"
        )
        add(
            entry,
            "option",
            "unregistered module",
            lambda entry=entry: getattr(interop, entry.split(".")[1])(
                nnx.Linear(2, 2, rngs=nnx.Rngs(0)) if "nnx" in entry else nn.Dense(2), {}
            ),
            TypeError,
            "module" if "linen" in entry else "model",
        )
        NOT_APPLICABLE[(entry, "size")] = NO_SIZE
        NOT_APPLICABLE[(entry, "empty_batch")] = NO_BATCH
    add(
        "interop.torch_to_nnx",
        "channels",
        "weights for 5 channels",
        lambda: interop.torch_to_nnx(_cond_nnx(), wide),
        ValueError,
        "within:weight",
    )
    NOT_APPLICABLE[("interop.torch_to_linen", "channels")] = "a linen module takes its shapes from the state dict"

    params = {"params": jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(_cond_nnx(), nnx.Param)))}
    lt = "interop.linen_to_torch"
    add(lt, "non_array", "None", lambda: interop.linen_to_torch(_cond_linen(), None), TypeError, "variables")
    add(
        lt,
        "shape",
        "kernel",
        lambda: interop.linen_to_torch(
            _cond_linen(), {"params": {**params["params"], "kernel": np.ones((2, 3, 3, C, F + 1), np.float32)}}
        ),
        ValueError,
        "within:params/kernel",
    )
    add(
        lt,
        "rank",
        "kernel 2-D",
        lambda: interop.linen_to_torch(
            _cond_linen(), {"params": {**params["params"], "kernel": np.ones((2, 3), np.float32)}}
        ),
        ValueError,
        "within:params/kernel",
    )
    add(
        lt,
        "dtype",
        "int kernel",
        lambda: interop.linen_to_torch(
            _cond_linen(), {"params": {**params["params"], "kernel": np.ones((2, 3, 3, C, F), np.int32)}}
        ),
        ValueError,
        "within:params/kernel",
    )
    add(lt, "option", "unregistered module", lambda: interop.linen_to_torch(nn.Dense(2), params), TypeError, "module")
    for category, reason in (
        ("channels", "the variables fix the channels"),
        ("size", NO_SIZE),
        ("empty_batch", NO_BATCH),
    ):
        NOT_APPLICABLE[(lt, category)] = reason

    nt = "interop.nnx_to_torch"
    add(nt, "non_array", "None", lambda: interop.nnx_to_torch(None), TypeError, "model")
    add(
        nt,
        "option",
        "unregistered model",
        lambda: interop.nnx_to_torch(nnx.Linear(2, 2, rngs=nnx.Rngs(0))),
        TypeError,
        "model",
    )
    for category in ("rank", "shape", "channels", "dtype", "size", "empty_batch"):
        NOT_APPLICABLE[(nt, category)] = "reads the model's own variables"

    ls = "interop.load_state_dict"
    add(ls, "non_array", "None path", lambda: interop.load_state_dict(None), TypeError, "path")
    # A LoadError: "Cannot load '<file>': `path` must end in ..."
    add(ls, "option", "suffix", lambda: interop.load_state_dict("weights.npz"), ValueError, "within:`path` must")
    for category in ("rank", "shape", "channels", "dtype", "size", "empty_batch"):
        NOT_APPLICABLE[(ls, category)] = "reads a file; its contents' errors: tests/test_interop_loading.py"

    ft = "interop.from_torch"
    add(ft, "non_array", "None module", lambda: interop.from_torch(None), TypeError, "module")
    add(ft, "option", "api", lambda: interop.from_torch(None, api="jax"), ValueError, "api")
    for category in ("rank", "shape", "channels", "dtype", "size", "empty_batch"):
        NOT_APPLICABLE[(ft, category)] = "reads a PyTorch module: parity/test_from_torch.py checks its errors"

    rg = "interop.register"
    add(rg, "non_array", "converter None", lambda: interop.register(jl.CondConv, None), TypeError, "converter")
    add(rg, "option", "module instance", lambda: interop.register(_cond_linen(), None), TypeError, "module_type")
    rt = "interop.register_torch_layer"
    add(rt, "non_array", "builder None", lambda: interop.register_torch_layer("MyConv", None), TypeError, "builder")
    add(
        rt,
        "option",
        "unknown layer name",
        lambda: interop.register_torch_layer("MyConv", "NoSuchConv"),
        ValueError,
        "builder",
    )
    add(rt, "non_array", "name None", lambda: interop.register_torch_layer(None, "CondConv2d"), TypeError, "name")

    rf = "interop.rules_for"
    add(
        rf,
        "option",
        "both variables and state_dict",
        lambda: interop.rules_for(_cond_linen(), params, state_dict=_state_dict()),
        TypeError,
        "state_dict",
    )
    add(rf, "non_array", "None module", lambda: interop.rules_for(None, params), TypeError, "module")
    tn = "interop.torch_names"
    add(tn, "non_array", "None tree", lambda: interop.torch_names(_cond_nnx(), None), TypeError, "tree")
    add(
        tn,
        "shape",
        "kernel",
        lambda: interop.torch_names(
            _cond_nnx(), {**params["params"], "kernel": np.ones((2, 3, 3, C, F + 1), np.float32)}
        ),
        ValueError,
        "within:kernel",
    )
    un = "interop.under"
    add(un, "non_array", "rules None", lambda: interop.under("layer1", "conv", None), TypeError, "rules")
    add(
        un,
        "option",
        "prefix with a trailing dot",
        lambda: interop.under("layer1.", "conv", []),
        ValueError,
        "torch_prefix",
    )
    ff = "interop.flax_from_torch"
    add(
        ff,
        "non_array",
        "None",
        lambda: interop.flax_from_torch([], None, dtype=lambda key: np.float32),
        TypeError,
        "state_dict",
    )
    add(
        ff,
        "non_array",
        "rules None",
        lambda: interop.flax_from_torch(None, {}, dtype=lambda key: np.float32),
        TypeError,
        "rules",
    )
    tf = "interop.torch_from_flax"
    add(tf, "non_array", "None", lambda: interop.torch_from_flax([], None), TypeError, "variables")
    add(tf, "non_array", "rules None", lambda: interop.torch_from_flax(None, {}), TypeError, "rules")
    cl = "interop.conv_layout"
    add(cl, "size", "0 spatial dims", lambda: interop.conv_layout(0), ValueError, "num_spatial")
    add(cl, "non_array", "str", lambda: interop.conv_layout("2"), TypeError, "num_spatial")
    target = interop.Target(("params", "kernel"))
    builders = {
        "conv_rules": lambda **kw: interop.conv_rules("conv", kernel=target, bias=None, **kw),
        "linear_rules": lambda **kw: interop.linear_rules("fc", kernel=target, bias=None, **kw),
    }
    add(
        "interop.conv_rules",
        "size",
        "features 0",
        lambda: builders["conv_rules"](features=0, in_features_per_group=C, kernel_size=(3, 3)),
        ValueError,
        "features",
    )
    add(
        "interop.conv_rules",
        "size",
        "empty kernel_size",
        lambda: builders["conv_rules"](features=F, in_features_per_group=C, kernel_size=()),
        ValueError,
        "kernel_size",
    )
    add(
        "interop.linear_rules",
        "size",
        "in_features 0",
        lambda: builders["linear_rules"](in_features=0, features=F),
        ValueError,
        "in_features",
    )
    add(
        "interop.batchnorm_rules",
        "size",
        "features -1",
        lambda: interop.batchnorm_rules("bn", scale=target, offset=target, mean=target, var=target, features=-1),
        ValueError,
        "features",
    )
    add(
        "interop.branch_mix_rules",
        "size",
        "num_branches 0",
        lambda: interop.branch_mix_rules(
            num_branches=0, features=F, in_features_per_group=C, kernel_size=(3, 3), gate_features=C, use_bias=True
        ),
        ValueError,
        "num_branches",
    )
    add(
        "interop.cond_conv_rules",
        "size",
        "num_experts 0",
        lambda: interop.cond_conv_rules(
            num_experts=0, features=F, in_features=C, in_features_per_group=C, kernel_size=(3, 3), use_bias=True
        ),
        ValueError,
        "num_experts",
    )
    add(
        "interop.dynamic_conv_rules",
        "size",
        "hidden 0",
        lambda: interop.dynamic_conv_rules(
            num_experts=2,
            features=F,
            in_features=C,
            in_features_per_group=C,
            hidden_features=0,
            kernel_size=(3, 3),
            use_bias=True,
        ),
        ValueError,
        "hidden_features",
    )
    add(
        "interop.od_conv_rules",
        "option",
        "head",
        lambda: interop.od_conv_rules(
            num_experts=2,
            features=F,
            in_features=C,
            in_features_per_group=C,
            attention_features=16,
            kernel_size=(3, 3),
            heads=("channel", "kernel"),
        ),
        ValueError,
        "heads",
    )
    add(
        "interop.modulated_conv_rules",
        "size",
        "features 0",
        lambda: interop.modulated_conv_rules(
            features=0,
            in_features=C,
            latent_features=5,
            kernel_size=(3, 3),
            channels_first=False,
            use_bias=True,
            affine=True,
            use_noise=False,
            noise_shape=None,
            resample_filter=None,
        ),
        ValueError,
        "features",
    )
    add(
        "interop.deform_conv_rules",
        "size",
        "features 0",
        lambda: interop.deform_conv_rules(features=0, in_features=C, in_features_per_group=C, kernel_size=(3, 3)),
        ValueError,
        "features",
    )
    dcnv3_sizes = {"dw_kernel_size": (3, 3), "offset_features": 36, "mask_features": 18, "groups": 2}
    add(
        "interop.dcnv3_rules",
        "size",
        "channels 0",
        lambda: interop.dcnv3_rules(channels=0, **dcnv3_sizes),
        ValueError,
        "channels",
    )
    add(
        "interop.dcnv3_rules",
        "option",
        "norm",
        lambda: interop.dcnv3_rules(channels=C, norm="LN", **dcnv3_sizes),
        ValueError,
        "norm",
    )
    # Written out per entry point: each category these take no value of, and why.
    not_applicable = {
        "rules_for": ("rank", "shape", "channels", "dtype", "size", "empty_batch"),
        "torch_names": ("rank", "channels", "dtype", "option", "size", "empty_batch"),
        "under": ("rank", "shape", "channels", "dtype", "size", "empty_batch"),
        "flax_from_torch": ("rank", "shape", "channels", "dtype", "option", "size", "empty_batch"),
        "torch_from_flax": ("rank", "shape", "channels", "dtype", "option", "size", "empty_batch"),
        "register": ("rank", "shape", "channels", "dtype", "size", "empty_batch"),
        "register_torch_layer": ("rank", "shape", "channels", "dtype", "size", "empty_batch"),
        "conv_layout": ("rank", "shape", "channels", "dtype", "option", "empty_batch"),
    }
    for name in (
        "conv_rules",
        "linear_rules",
        "batchnorm_rules",
        "branch_mix_rules",
        "cond_conv_rules",
        "dynamic_conv_rules",
        "modulated_conv_rules",
        "deform_conv_rules",
    ):
        not_applicable[name] = ("rank", "shape", "channels", "dtype", "non_array", "option", "empty_batch")
    not_applicable["od_conv_rules"] = ("rank", "shape", "channels", "dtype", "non_array", "size", "empty_batch")
    not_applicable["dcnv3_rules"] = ("rank", "shape", "channels", "dtype", "non_array", "empty_batch")
    reasons = {
        "flax_from_torch": "the converters go through it: their state-dict rows above are its",
        "torch_from_flax": "the converters go through it: their variables rows above are its",
    }
    for name, categories in not_applicable.items():
        for category in categories:
            NOT_APPLICABLE[(f"interop.{name}", category)] = reasons.get(
                name, "takes sizes, names, modules or rules: no array, batch or option of that kind"
            )


_interop_mistakes()


# --- the tests --------------------------------------------------------------------------------------------


def _public_entry_points() -> set[str]:
    entries = {f"jdynconv.{name}" for name in jdc.__all__ if callable(getattr(jdc, name))}
    entries |= {f"interop.{name}" for name in interop.__all__}
    for api, module in (("linen", jl), ("nnx", jn)):
        entries |= {f"{api}.{name}" for name in module.__all__ if inspect.isclass(getattr(module, name))}
    return entries


def test_every_public_entry_point_is_covered() -> None:
    covered: dict[str, set[str]] = {}
    for item in MISTAKES:
        covered.setdefault(item.entry, set()).add(item.category)
    for entry in EMPTY_BATCH:
        covered.setdefault(entry, set()).add("empty_batch")
    missing = {}
    for entry in sorted(_public_entry_points()):
        if (entry, "*") in NOT_APPLICABLE:
            continue
        absent = [c for c in CATEGORIES if c not in covered.get(entry, set()) and (entry, c) not in NOT_APPLICABLE]
        if absent:
            missing[entry] = absent
    assert not missing, f"public entry points without mistakes of these categories (or a reason why not): {missing}"
    assert set(covered) <= _public_entry_points(), "mistakes registered for names that are not public"


@pytest.mark.parametrize("item", MISTAKES, ids=lambda item: item.id)
def test_mistake_raises_an_error_naming_the_argument(item: Mistake) -> None:
    with pytest.raises(item.error) as info:
        item.call()
    message = str(info.value)
    if item.argument.startswith("within:"):  # a state-dict key, listed in the message with the others
        key = item.argument.removeprefix("within:")
        assert key in message, f"the message does not name {key}: {message!r}"
    else:  # the message is about the argument: it starts with its name
        name = f"`{item.argument}`"
        assert message.startswith(name), f"the message does not start with {name}: {message!r}"


@pytest.mark.parametrize("entry", sorted(EMPTY_BATCH))
def test_empty_batch_gives_empty_outputs_and_gradients(entry: str) -> None:
    EMPTY_BATCH[entry]()


ZERO_CHANNELS = [
    (
        lambda: _deform(inputs=_x(B, H, W, 0), kernel=_x(3, 3, 0, F)),
        f"`inputs` (B, *spatial, C_in) must have C_in >= 1 channels, got shape ({B}, {H}, {W}, 0).",
    ),
    (
        lambda: _deform(
            inputs=_x(B, 0, H, W), offsets=_x(B, 18, H, W), kernel=_x(F, 0, 3, 3), data_format="channels_first"
        ),
        f"`inputs` (B, C_in, *spatial) must have C_in >= 1 channels, got shape ({B}, 0, {H}, {W}).",
    ),
    (
        lambda: _dcnv3(inputs=_x(B, H, W, 0)),
        f"`inputs` (B, *spatial, C) must have C >= 1 channels, got shape ({B}, {H}, {W}, 0).",
    ),
]


@pytest.mark.parametrize(("call", "message"), ZERO_CHANNELS, ids=["deform_conv", "deform_conv-NCHW", "dcnv3"])
def test_zero_channels_is_an_error_with_the_shape(call: Callable[[], object], message: str) -> None:
    """Inputs without channels: a ValueError naming the layout and the shape (not a ZeroDivisionError deeper in)."""
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        call()
    assert str(info.value) == message
