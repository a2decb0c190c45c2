"""jdynconv.interop for DeformConv and DCNv3 without PyTorch: state dicts are NumPy dicts.

DeformConv <-> torchvision's ``DeformConv2d`` (``weight``, ``bias``) and mmcv's ``DeformConv2dPack`` /
``ModulatedDeformConv2dPack`` (also ``conv_offset.{weight,bias}``, channels unpermuted); DCNv3 <-> InternImage's
``DCNv3_pytorch`` (``input_proj``, ``dw_conv.0``, ``dw_conv.1.1`` LayerNorm or ``dw_conv.1.0`` BatchNorm2d,
``offset``, ``mask``, ``output_proj``, ``center_feature_scale_proj_{weight,bias}``). The state dicts are written
here from the originals' shapes, independently of the rules; round trips are bitwise both ways, the converted
variables have the NNX layers' names and shapes (linen's are the same by the layers' contract), layouts are checked
entry by entry, and every problem comes in one strict error naming the keys. Numerical parity with the PyTorch
modules is in ``parity/test_deformable_interop.py``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx

from jdynconv import interop
from jdynconv import linen as jdc_linen
from jdynconv import nnx as jdc_nnx


def _distinct(shape: tuple[int, ...], start: float = 0.0) -> np.ndarray:
    """Every entry different, so any axis mix-up shows."""
    return (np.arange(math.prod(shape), dtype=np.float32) + start).reshape(shape)


def _state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    state_dict = {}
    for n, (key, shape) in enumerate(shapes.items()):
        if key.endswith("num_batches_tracked"):
            state_dict[key] = np.asarray(7, np.int64)  # ignored on load
        elif key.endswith("running_var"):
            state_dict[key] = _distinct(shape, 1.0)
        else:
            state_dict[key] = _distinct(shape, 1000.0 * n)
    return state_dict


def _shapes(tree: Any) -> Any:
    return jax.tree.map(np.shape, tree)


def _assert_state_dicts_equal(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(actual) == list(expected)
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):
            assert actual[key].dtype == np.int64
            assert actual[key].shape == ()
            assert int(actual[key]) == 0
        else:
            np.testing.assert_array_equal(actual[key], value, key, strict=True)


# --- DeformConv ----------------------------------------------------------------------------------------------


def _deform_torch_shapes(
    features: int,
    in_features: int,
    groups: int,
    kernel_size: tuple[int, ...],
    *,
    use_bias: bool,
    offset_channels: int | None,
) -> dict[str, tuple[int, ...]]:
    """The originals' state-dict shapes: torchvision's ``weight``, ``bias``; mmcv's Packs' ``conv_offset``."""
    shapes = {"weight": (features, in_features // groups, *kernel_size)}
    if use_bias:
        shapes["bias"] = (features,)
    if offset_channels is not None:
        shapes["conv_offset.weight"] = (offset_channels, in_features, *kernel_size)
        shapes["conv_offset.bias"] = (offset_channels,)
    return shapes


# (NNX keywords, C_in, offset channels or None (predict_offsets=False)): torchvision's layer 2-D with and without
# bias, 1-D; mmcv's DCN (2 G_off K offsets) and DCNv2 (3 G_off K), 3-D with 4 G_off K (3 coordinates and the mask).
DEFORM_CONFIGS = {
    "torchvision_2d": ({"features": 6, "kernel_size": (3, 3), "predict_offsets": False}, 4, None),
    "torchvision_1d_groups_no_bias": (
        {"features": 4, "kernel_size": (3,), "feature_group_count": 2, "use_bias": False, "predict_offsets": False},
        6,
        None,
    ),
    "mmcv_dcn": ({"features": 6, "kernel_size": (3, 3), "use_bias": False, "offset_groups": 2}, 4, 2 * 2 * 9),
    "mmcv_dcnv2_groups": (
        {"features": 6, "kernel_size": (3, 2), "feature_group_count": 2, "offset_groups": 2, "use_mask": True},
        8,
        3 * 2 * 6,
    ),
    "dcnv2_3d": ({"features": 2, "kernel_size": (2, 1, 3), "use_mask": True}, 3, 4 * 6),
}


def _deform_case(name: str) -> tuple[Any, Any, dict[str, np.ndarray]]:
    """The linen layer, its abstract NNX twin and a state dict of the original's shapes."""
    attributes, in_features, offset_channels = DEFORM_CONFIGS[name]
    linen_layer = jdc_linen.DeformConv(**attributes)
    model = nnx.eval_shape(lambda: jdc_nnx.DeformConv(in_features, **attributes, rngs=nnx.Rngs(0)))
    shapes = _deform_torch_shapes(
        attributes["features"],
        in_features,
        attributes.get("feature_group_count", 1),
        attributes["kernel_size"],
        use_bias=attributes.get("use_bias", True),
        offset_channels=offset_channels,
    )
    return linen_layer, model, _state_dict(shapes)


@pytest.mark.parametrize("name", list(DEFORM_CONFIGS))
def test_deform_conv_round_trips_are_bitwise(name: str) -> None:
    """torch -> linen -> torch and torch -> NNX -> torch; the linen variables have the NNX layer's names and shapes."""
    layer, model, state_dict = _deform_case(name)
    variables = interop.torch_to_linen(layer, state_dict)
    assert _shapes(variables) == {"params": _shapes(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}
    _assert_state_dicts_equal(interop.linen_to_torch(layer, variables), state_dict)
    assert interop.torch_to_nnx(model, state_dict) is model
    _assert_state_dicts_equal(interop.nnx_to_torch(model), state_dict)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, nnx.Param)), variables["params"])


def test_deform_conv_layout() -> None:
    """``weight[o, i, *k]`` is ``kernel[*k, i, o]``; ``conv_offset.weight[c, i, *k]`` is ``conv_offset/kernel[*k,
    i, c]``: mmcv's channel order kept (offsets in deform_conv's order, then the mask logits)."""
    layer, _, state_dict = _deform_case("mmcv_dcnv2_groups")
    params = interop.torch_to_linen(layer, state_dict)["params"]
    for torch_key, flax_kernel in (
        ("weight", params["kernel"]),
        ("conv_offset.weight", params["conv_offset"]["kernel"]),
    ):
        weight, kernel = state_dict[torch_key], np.asarray(flax_kernel)
        for o, i, kh, kw in np.ndindex(*weight.shape):
            assert kernel[kh, kw, i, o] == weight[o, i, kh, kw]
    np.testing.assert_array_equal(params["bias"], state_dict["bias"])
    np.testing.assert_array_equal(params["conv_offset"]["bias"], state_dict["conv_offset.bias"])


def test_deform_conv_rules_with_a_prefix() -> None:
    rules = interop.deform_conv_rules(
        features=6,
        in_features=4,
        in_features_per_group=4,
        kernel_size=(3, 3),
        use_bias=False,
        offset_groups=2,
        use_mask=True,
        torch_prefix="layer1.0.conv2.",
    )
    assert [(rule.torch_key, rule.torch_shape) for rule in rules] == [
        ("layer1.0.conv2.weight", (6, 4, 3, 3)),
        ("layer1.0.conv2.conv_offset.weight", (54, 4, 3, 3)),
        ("layer1.0.conv2.conv_offset.bias", (54,)),
    ]
    assert [rule.torch_key for rule in interop.deform_conv_rules(
        features=6, in_features=4, in_features_per_group=4, kernel_size=(3, 3), predict_offsets=False
    )] == ["weight", "bias"]  # fmt: skip


def test_a_dcn_state_dict_does_not_load_into_dcnv2() -> None:
    """mmcv's DeformConv2dPack (2 G_off K offset channels, no bias) into a use_mask layer with a bias: every problem
    named with both shapes, in one error."""
    _, _, dcn = _deform_case("mmcv_dcn")
    layer = jdc_linen.DeformConv(6, (3, 3), offset_groups=2, use_mask=True)
    with pytest.raises(interop.StateDictError) as raised:
        interop.torch_to_linen(layer, dcn)
    message = str(raised.value)
    assert "missing key: bias (expected shape (6,))" in message
    assert "shape mismatch: conv_offset.weight: expected (54, 4, 3, 3), got (36, 4, 3, 3)" in message
    assert "shape mismatch: conv_offset.bias: expected (54,), got (36,)" in message
    model = nnx.eval_shape(lambda: jdc_nnx.DeformConv(4, 6, (3, 3), offset_groups=2, use_mask=True, rngs=nnx.Rngs(0)))
    with pytest.raises(interop.StateDictError, match=r"conv_offset\.weight: expected \(54, 4, 3, 3\)"):
        interop.torch_to_nnx(model, dcn)


def test_offsets_passed_means_no_conv_offset_and_the_reverse() -> None:
    _, _, pack = _deform_case("mmcv_dcn")
    layer = jdc_linen.DeformConv(6, (3, 3), use_bias=False, predict_offsets=False)
    with pytest.raises(interop.StateDictError) as raised:
        interop.torch_to_linen(layer, pack)
    assert raised.value.unexpected == ["conv_offset.weight (shape (36, 4, 3, 3))", "conv_offset.bias (shape (36,))"]
    _, _, plain = _deform_case("torchvision_2d")
    layer = jdc_linen.DeformConv(6, (3, 3))
    with pytest.raises(interop.StateDictError) as raised:
        interop.torch_to_linen(layer, plain)
    assert raised.value.missing == [
        "conv_offset.weight (expected shape (18, 4, 3, 3))",
        "conv_offset.bias (expected shape (18,))",
    ]


def test_deform_conv_export_is_strict() -> None:
    layer, _, state_dict = _deform_case("mmcv_dcnv2_groups")
    variables = interop.torch_to_linen(layer, state_dict)
    del variables["params"]["conv_offset"]
    with pytest.raises(interop.StateDictError, match=r"missing key: params/conv_offset/kernel"):
        interop.linen_to_torch(layer, variables)


# --- DCNv3 -----------------------------------------------------------------------------------------------------


def _dcnv3_torch_shapes(
    channels: int,
    groups: int,
    kernel_size: int,
    dw_kernel_size: int,
    *,
    rank: int = 2,
    norm: str = "layer",
    center_feature_scale: bool = False,
    remove_center: bool = False,
) -> dict[str, tuple[int, ...]]:
    """``DCNv3_pytorch``'s state-dict shapes, in its order (its own parameters first, then the submodules')."""
    taps = kernel_size**rank - int(remove_center)
    shapes: dict[str, tuple[int, ...]] = {}
    if center_feature_scale:
        shapes |= {"center_feature_scale_proj_weight": (groups, channels), "center_feature_scale_proj_bias": (groups,)}
    shapes |= {"dw_conv.0.weight": (channels, 1, *(dw_kernel_size,) * rank), "dw_conv.0.bias": (channels,)}
    if norm == "layer":
        shapes |= {"dw_conv.1.1.weight": (channels,), "dw_conv.1.1.bias": (channels,)}
    else:
        norm_keys = ("weight", "bias", "running_mean", "running_var")
        shapes |= {f"dw_conv.1.0.{key}": (channels,) for key in norm_keys}
        shapes["dw_conv.1.0.num_batches_tracked"] = ()
    for name, features in (
        ("offset", groups * taps * rank),
        ("mask", groups * taps),
        ("input_proj", channels),
        ("output_proj", channels),
    ):
        shapes |= {f"{name}.weight": (features, channels), f"{name}.bias": (features,)}
    return shapes


# (NNX keywords, DCNv3_pytorch's settings for the shapes): LayerNorm, BatchNorm, centre feature scale with the
# centre tap removed, a 5x5 depthwise kernel; 1-D.
DCNV3_CONFIGS = {
    "layer_norm": ({"channels": 8, "groups": 2}, {}),
    "batch_norm_center_feature_scale_remove_center": (
        {"channels": 8, "groups": 4, "norm": "batch", "center_feature_scale": True, "remove_center": True},
        {"norm": "batch", "center_feature_scale": True, "remove_center": True},
    ),
    "dw_kernel_5_kernel_5": (
        {"channels": 4, "groups": 1, "kernel_size": (5, 5), "dw_kernel_size": 5, "padding": 2},
        {"kernel_size": 5, "dw_kernel_size": 5},
    ),
    "1d": ({"channels": 4, "groups": 2, "kernel_size": (3,)}, {"rank": 1}),
}


def _dcnv3_case(name: str) -> tuple[Any, Any, dict[str, np.ndarray]]:
    attributes, settings = DCNV3_CONFIGS[name]
    linen_layer = jdc_linen.DCNv3(**attributes)
    model = nnx.eval_shape(lambda: jdc_nnx.DCNv3(**attributes, rngs=nnx.Rngs(0)))
    kernel = settings.get("kernel_size", 3)
    shapes = _dcnv3_torch_shapes(
        attributes["channels"],
        attributes["groups"],
        kernel,
        settings.get("dw_kernel_size", kernel),
        **{k: v for k, v in settings.items() if k not in ("kernel_size", "dw_kernel_size")},
    )
    return linen_layer, model, _state_dict(shapes)


@pytest.mark.parametrize("name", list(DCNV3_CONFIGS))
def test_dcnv3_round_trips_are_bitwise(name: str) -> None:
    """torch -> linen -> torch and torch -> NNX -> torch (``num_batches_tracked`` ignored, exported as int64 0); the
    linen variables have the NNX layer's names and shapes."""
    layer, model, state_dict = _dcnv3_case(name)
    variables = interop.torch_to_linen(layer, state_dict)
    expected = {"params": _shapes(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}
    if DCNV3_CONFIGS[name][0].get("norm") == "batch":
        expected["batch_stats"] = _shapes(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    assert _shapes(variables) == expected
    _assert_state_dicts_equal(interop.linen_to_torch(layer, variables), state_dict)
    interop.torch_to_nnx(model, state_dict)
    _assert_state_dicts_equal(interop.nnx_to_torch(model), state_dict)


def test_dcnv3_layout() -> None:
    """Linear weights ``(out, in)`` are Dense kernels ``(in, out)``: ``center_feature_scale_proj_weight[g, c]`` is
    ``center_feature_scale_proj/kernel[c, g]``; ``dw_conv.0.weight[c, 0, *k]`` is ``dw_conv/kernel[*k, 0, c]``;
    BatchNorm's weight, bias and running statistics are ``scale``, ``bias``, ``mean``, ``var``."""
    layer, _, state_dict = _dcnv3_case("batch_norm_center_feature_scale_remove_center")
    variables = interop.torch_to_linen(layer, state_dict)
    params, stats = variables["params"], variables["batch_stats"]
    np.testing.assert_array_equal(
        params["center_feature_scale_proj"]["kernel"], state_dict["center_feature_scale_proj_weight"].T
    )
    np.testing.assert_array_equal(
        params["center_feature_scale_proj"]["bias"], state_dict["center_feature_scale_proj_bias"]
    )
    for name in ("offset", "mask", "input_proj", "output_proj"):
        np.testing.assert_array_equal(params[name]["kernel"], state_dict[f"{name}.weight"].T)
        np.testing.assert_array_equal(params[name]["bias"], state_dict[f"{name}.bias"])
    weight, kernel = state_dict["dw_conv.0.weight"], np.asarray(params["dw_conv"]["kernel"])
    for c, _, kh, kw in np.ndindex(*weight.shape):
        assert kernel[kh, kw, 0, c] == weight[c, 0, kh, kw]
    for torch_name, flax_name, value in (
        ("weight", "scale", params["dw_norm"]["scale"]),
        ("bias", "bias", params["dw_norm"]["bias"]),
        ("running_mean", "mean", stats["dw_norm"]["mean"]),
        ("running_var", "var", stats["dw_norm"]["var"]),
    ):
        np.testing.assert_array_equal(value, state_dict[f"dw_conv.1.0.{torch_name}"], flax_name)


def test_a_layer_norm_state_dict_does_not_load_into_batch_norm() -> None:
    _, _, state_dict = _dcnv3_case("layer_norm")
    layer = jdc_linen.DCNv3(8, groups=2, norm="batch")
    with pytest.raises(interop.StateDictError) as raised:
        interop.torch_to_linen(layer, state_dict)
    error = raised.value
    assert error.missing == [
        "dw_conv.1.0.weight (expected shape (8,))",
        "dw_conv.1.0.bias (expected shape (8,))",
        "dw_conv.1.0.running_mean (expected shape (8,))",
        "dw_conv.1.0.running_var (expected shape (8,))",
    ]
    assert error.unexpected == ["dw_conv.1.1.weight (shape (8,))", "dw_conv.1.1.bias (shape (8,))"]


def test_dcnv3_settings_must_match_the_state_dict() -> None:
    """Groups, taps and the centre feature scale are in the shapes: a state dict of other settings is named key by
    key."""
    _, _, state_dict = _dcnv3_case("batch_norm_center_feature_scale_remove_center")
    layer = jdc_linen.DCNv3(8, groups=2, norm="batch")  # 2 groups, 9 taps, no centre feature scale
    with pytest.raises(interop.StateDictError) as raised:
        interop.torch_to_linen(layer, state_dict)
    error = raised.value
    assert error.unexpected == [
        "center_feature_scale_proj_weight (shape (4, 8))",
        "center_feature_scale_proj_bias (shape (4,))",
    ]
    assert [key for key, _, _ in error.mismatched] == ["offset.weight", "offset.bias", "mask.weight", "mask.bias"]
    assert ("offset.weight", "(36, 8)", "(64, 8)") in error.mismatched


def test_dcnv3_rules_refuse_an_unknown_norm() -> None:
    with pytest.raises(ValueError, match="`norm` must be one of"):
        interop.dcnv3_rules(
            channels=8, dw_kernel_size=(3, 3), offset_features=36, mask_features=18, groups=2, norm="group"
        )
    rules = interop.dcnv3_rules(
        channels=8, dw_kernel_size=(3, 3), offset_features=36, mask_features=18, groups=2, torch_prefix="dcn."
    )
    assert all(rule.torch_key.startswith("dcn.") for rule in rules)
