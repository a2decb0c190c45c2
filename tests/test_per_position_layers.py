"""Involution, LightweightConv and DynamicLightweightConv (linen and NNX): what parity/ does not cover.

parity/test_lightconv.py and parity/test_involution.py hold the layers to fairseq's and d-li14's code. Here: the
linen and NNX twins agree on the same variables; step-by-step decoding equals the causal full pass; the
time-major layout is the batch-major one transposed; involution's stride pooling (the case the original leaves
undefined) against its NumPy definition; weight dropout's scale and its off switch; and the errors.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdynconv import _involution
from jdynconv import linen as jdc_linen
from jdynconv import nnx as jdc_nnx

RNG = np.random.default_rng(0)


def _x(*shape: int) -> jax.Array:
    return jnp.asarray(RNG.standard_normal(shape).astype(np.float32))


def _nnx_from_linen(model: Any, variables: dict) -> Any:
    """The NNX model with the linen layer's parameters (the same names and shapes)."""
    for path, value in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
        *owners, name = (entry.key for entry in path)
        target = model
        for owner in owners:
            target = getattr(target, owner)
        getattr(target, name)[...] = value
    return model


@pytest.mark.parametrize(
    ("spatial", "kernel_size", "strides"),
    # 1-D and 3-D here; 2-D (stride 2, odd sizes) against the original in parity/test_involution.py
    [((9,), (5,), (1,)), ((4, 5, 3), (3, 1, 3), (1, 2, 1))],
)
def test_involution_linen_and_nnx_agree(spatial: tuple, kernel_size: tuple, strides: tuple) -> None:
    x = _x(2, *spatial, 32)
    linen = jdc_linen.Involution(kernel_size, strides=strides, reduction_ratio=2, group_channels=8)
    variables = linen.init(jax.random.key(0), x, use_running_average=False)
    out, updates = jax.jit(lambda v, x: linen.apply(v, x, use_running_average=False, mutable=["batch_stats"]))(
        variables, x
    )
    assert out.shape == (2, *(-(-n // s) for n, s in zip(spatial, strides, strict=True)), 32)
    model = jdc_nnx.Involution(32, kernel_size, strides=strides, reduction_ratio=2, group_channels=8, rngs=nnx.Rngs(1))
    _nnx_from_linen(model, variables)
    model.train()
    # Same variables, same operations, two compiled programs (linen's and NNX's): XLA may fuse and so round them
    # differently, a few float32 roundings (~1e-7 relative) of O(1) values; 1e-6 leaves 10x, a wrong weight is O(1).
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(model, x)), np.asarray(out), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(model.bn.mean[...]), np.asarray(updates["batch_stats"]["bn"]["mean"]), rtol=1e-6
    )


def test_stride_pool_averages_the_pixels_each_window_covers() -> None:
    """``AvgPool(s, s, ceil_mode=True)``: the last window of a 7-wide map at stride 2 averages one pixel."""
    x = RNG.standard_normal((1, 7, 6, 3))
    pooled = np.asarray(_involution.stride_pool(jnp.asarray(x, jnp.float32), (2, 3)))
    expected = np.zeros((1, 4, 2, 3))
    for i in range(4):
        for j in range(2):
            expected[0, i, j] = x[0, 2 * i : 2 * i + 2, 3 * j : 3 * j + 3].mean(axis=(0, 1))
    # A mean of at most 6 float32 values against float64: a few roundings of 2^-24 relative; 1e-6 leaves room.
    np.testing.assert_allclose(pooled, expected, rtol=1e-6, atol=1e-6)


CONFIGS = {
    "light": dict(kernel_size=4, num_heads=2, padding="CAUSAL", weight_softmax=True, use_bias=True),
    "dynamic": dict(kernel_size=3, num_heads=4, padding="CAUSAL", weight_softmax=True, conv_bias=True),
    "dynamic_renorm_in_proj": dict(
        kernel_size=5, num_heads=2, padding="CAUSAL", weight_softmax=True, renorm_padding=True, in_proj=True
    ),
}


def _linen_layer(name: str, **extra: Any) -> Any:
    cls = jdc_linen.LightweightConv if name == "light" else jdc_linen.DynamicLightweightConv
    return cls(**CONFIGS[name], **extra)


def _decode_bound(x: np.ndarray, name: str) -> float:
    """The steps and the full pass sum the same K products in the same order, but the dynamic layers' kernels
    (and with ``in_proj`` the values) come from a Dense layer applied to one step rather than the sequence, whose
    sums of C = 8 products XLA may round in another order: each kernel weight (a softmax, <= 1) and value then
    differs by a few float32 roundings of a sum of |x| * |w| over 8 features. Bound: (K + 8) roundings of K taps
    times 8 * max|x| * max|w| (the Dense's weights are xavier-uniform, |w| <= 1 at these sizes), times 4 for the
    softmax's and the product's own roundings; an O(1) error (a wrong tap or step) is 1e3 times larger."""
    taps = CONFIGS[name]["kernel_size"]
    return 4 * (taps + 8) * 2.0**-24 * taps * 8 * float(np.abs(x).max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_linen_decoding_equals_the_causal_full_pass(name: str) -> None:
    x = _x(3, 9, 8)
    layer = _linen_layer(name)
    variables = layer.init(jax.random.key(0), x, deterministic=True)
    full = jax.jit(lambda v, x: layer.apply(v, x, deterministic=True))(variables, x)
    cache = layer.init(jax.random.key(0), x[:, :1], deterministic=True, decode=True)["cache"]
    step = jax.jit(
        lambda c, xt: layer.apply({**variables, "cache": c}, xt, deterministic=True, decode=True, mutable=["cache"])
    )
    outs = []
    for t in range(9):
        out, updates = step(cache, x[:, t : t + 1])
        cache = updates["cache"]
        outs.append(out)
    assert int(cache["cache_index"]) == 9
    np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=0, atol=_decode_bound(np.asarray(x), name))


@pytest.mark.parametrize("name", ["light", "dynamic_renorm_in_proj"])
def test_nnx_decoding_equals_the_causal_full_pass_and_linen(name: str) -> None:
    x = _x(2, 6, 8)
    layer = _linen_layer(name)
    variables = layer.init(jax.random.key(0), x, deterministic=True)
    cls = jdc_nnx.LightweightConv if name == "light" else jdc_nnx.DynamicLightweightConv
    model = cls(8, **CONFIGS[name] | {"kernel_size": CONFIGS[name]["kernel_size"]}, rngs=nnx.Rngs(5))
    _nnx_from_linen(model, variables)
    model.eval()
    full = nnx.jit(lambda m, x: m(x))(model, x)
    # As above: one layer, two compiled programs (linen's, NNX's), float32 rounding of O(1) values.
    np.testing.assert_allclose(full, layer.apply(variables, x, deterministic=True), rtol=1e-6, atol=1e-6)
    model.init_cache(2)
    step = nnx.jit(lambda m, xt: m(xt, decode=True))
    outs = np.concatenate([step(model, x[:, t : t + 1]) for t in range(6)], 1)
    np.testing.assert_allclose(outs, full, rtol=0, atol=_decode_bound(np.asarray(x), name))


def test_time_major_is_the_transpose() -> None:
    x, q = _x(2, 7, 8), _x(2, 7, 5)
    layer = jdc_linen.DynamicLightweightConv(3, num_heads=2, padding=1, weight_softmax=True)
    variables = layer.init(jax.random.key(0), x, q, deterministic=True)
    batch_major = layer.apply(variables, x, q, deterministic=True)
    time_major = jdc_linen.DynamicLightweightConv(3, num_heads=2, padding=1, weight_softmax=True, time_major=True)
    out = time_major.apply(variables, jnp.swapaxes(x, 0, 1), jnp.swapaxes(q, 0, 1), deterministic=True)
    np.testing.assert_array_equal(np.swapaxes(np.asarray(out), 0, 1), np.asarray(batch_major))


def test_weight_dropout_scales_the_kept_kernels_and_switches_off() -> None:
    """Kept softmax weights are scaled by 1 / (1 - rate), dropped ones 0, about ``rate`` of them; deterministic
    calls drop nothing; two dropout keys drop differently."""
    x = _x(4, 16, 8)
    layer = jdc_linen.LightweightConv(3, num_heads=2, weight_softmax=True, weight_dropout=0.25)
    variables = layer.init(jax.random.key(0), x, deterministic=True)

    def kernels(**kwargs: Any) -> np.ndarray:
        _, sown = layer.apply(variables, x, mutable=["intermediates"], **kwargs)
        return np.asarray(sown["intermediates"]["kernels"][0])

    plain = kernels(deterministic=True)
    dropped = kernels(deterministic=False, rngs={"dropout": jax.random.key(1)})
    other = kernels(deterministic=False, rngs={"dropout": jax.random.key(2)})
    kept = dropped != 0
    assert 0.15 < 1 - kept.mean() < 0.35
    # One float32 multiplication by 1 / (1 - rate) against NumPy's float32 division: within 2 roundings (2.4e-7).
    np.testing.assert_allclose(dropped[kept], plain[kept] / 0.75, rtol=1e-6)
    assert not np.array_equal(kept, other != 0)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: jdc_linen.LightweightConv(0), "`kernel_size`"),
        (lambda: jdc_linen.LightweightConv(3, padding=3), "`padding`"),
        (lambda: jdc_linen.LightweightConv(3, padding="FULL"), "`padding`"),
        (lambda: jdc_linen.LightweightConv(3, weight_dropout=1.0), "`weight_dropout`"),
        (lambda: jdc_linen.LightweightConv(3, weight_dropout=np.float32(-0.1)), "`weight_dropout`"),
        (lambda: jdc_linen.DynamicLightweightConv(3, renorm_padding=True), "`renorm_padding` needs `weight_softmax`"),
        (lambda: jdc_linen.Involution(3, group_channels=0), "`group_channels`"),
        (lambda: jdc_linen.Involution((3, 3), strides=(1, 1, 1)), "`strides`"),
        (lambda: jdc_nnx.Involution(24, (3, 3), rngs=nnx.Rngs(0)), "multiple of `group_channels`"),
        (lambda: jdc_nnx.DynamicLightweightConv(6, 3, num_heads=4, rngs=nnx.Rngs(0)), "divisible by `num_heads`"),
    ],
)
def test_attribute_errors(make: Any, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_call_errors() -> None:
    light = jdc_linen.LightweightConv(3, num_heads=2)
    with pytest.raises(ValueError, match="divisible by `num_heads`"):
        light.init(jax.random.key(0), _x(2, 5, 7), deterministic=True)
    with pytest.raises(ValueError, match="rank 3"):
        light.init(jax.random.key(0), _x(2, 5, 4, 4), deterministic=True)
    with pytest.raises(ValueError, match="`decode` needs causal padding"):
        light.init(jax.random.key(0), _x(2, 1, 4), deterministic=True, decode=True)
    dynamic = jdc_linen.DynamicLightweightConv(3, padding="CAUSAL")
    with pytest.raises(ValueError, match="one step at a time"):
        dynamic.init(jax.random.key(0), _x(2, 5, 4), deterministic=True, decode=True)
    with pytest.raises(ValueError, match="leading"):
        dynamic.init(jax.random.key(0), _x(2, 5, 4), _x(2, 6, 4), deterministic=True)
    with pytest.raises(ValueError, match="`query` must be None with `in_proj`"):
        jdc_linen.DynamicLightweightConv(3, in_proj=True).init(
            jax.random.key(0), _x(2, 5, 4), _x(2, 5, 4), deterministic=True
        )
    model = jdc_nnx.LightweightConv(4, 3, padding="CAUSAL", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="init_cache"):
        model(_x(2, 1, 4), decode=True)
    model.init_cache(3)
    with pytest.raises(ValueError, match="`inputs` must have the cache's batch 3"):
        model(_x(2, 1, 4), decode=True)
    model.init_cache(3, jnp.bfloat16)
    with pytest.raises(TypeError, match="`inputs` must have the cache's dtype bfloat16"):
        model(_x(3, 1, 4), decode=True)
    light_causal = jdc_linen.LightweightConv(3, padding="CAUSAL")
    variables = light_causal.init(jax.random.key(0), _x(3, 1, 4), deterministic=True, decode=True)
    with pytest.raises(ValueError, match="`inputs` must have the cache's batch 3"):
        light_causal.apply(variables, _x(2, 1, 4), deterministic=True, decode=True, mutable=["cache"])
    with pytest.raises(ValueError, match="multiple of `group_channels`"):
        jdc_linen.Involution(3).init(jax.random.key(0), _x(1, 5, 5, 24), use_running_average=False)


def test_nnx_decoding_in_bfloat16() -> None:
    """``init_cache`` takes the layer's computation dtype by default: a bfloat16 layer decodes bfloat16 steps."""
    model = jdc_nnx.DynamicLightweightConv(8, 3, num_heads=2, padding="CAUSAL", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    model.eval()
    model.init_cache(2)
    out = model(_x(2, 1, 8).astype(jnp.bfloat16), decode=True)
    assert out.dtype == jnp.bfloat16
    assert out.shape == (2, 1, 8)
