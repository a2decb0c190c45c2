"""DeformConv <-> torchvision's ``DeformConv2d`` and mmcv's Packs; DCNv3 <-> InternImage's ``DCNv3_pytorch``.

**DeformConv**: torchvision's ``DeformConv2d`` (``torchvision/ops/deform_conv.py``: offsets, and a mask, passed per
call: ``predict_offsets=False``) and mmcv's ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack``
(``mmcv/ops/deform_conv.py``, ``modulated_deform_conv.py``: the offsets, and the mask, predicted by ``conv_offset``,
an ``nn.Conv2d`` with the layer's kernel size, stride, padding and dilation; ``predict_offsets=True``)::

    weight (F, C_in // G, *K)                <-> kernel (*K, C_in // G, F)
    bias (F,)                                <-> bias (F,)                                      with ``use_bias``
    conv_offset.weight (O, C_in, *K)         <-> conv_offset/kernel (*K, C_in, O)          with ``predict_offsets``
    conv_offset.bias (O,)                    <-> conv_offset/bias (O,)                     with ``predict_offsets``

with ``O = offset_groups * prod(K) * (N + use_mask)`` for N spatial dims. The channels of ``conv_offset`` are
mmcv's, unpermuted: the first ``offset_groups * prod(K) * N`` are the offsets in ``deform_conv``'s (and
torchvision's) order (group, tap, coordinate), the last ``offset_groups * prod(K)`` the mask logits (mmcv's
``chunk(3)``/``cat`` of the first two chunks, and ``sigmoid`` of the third). mmcv's ``DeformConv2dPack`` has no
bias (mmcv asserts ``bias=False``).

**DCNv3**: InternImage's ``DCNv3_pytorch`` (and the CUDA ``DCNv3``, same parameters;
``classification/ops_dcnv3/modules/dcnv3.py``)::

    center_feature_scale_proj_weight (G, C)  <-> center_feature_scale_proj/kernel (C, G)   ``center_feature_scale``
    center_feature_scale_proj_bias (G,)      <-> center_feature_scale_proj/bias (G,)       ``center_feature_scale``
    dw_conv.0.weight (C, 1, *dK)             <-> dw_conv/kernel (*dK, 1, C)
    dw_conv.0.bias (C,)                      <-> dw_conv/bias (C,)
    dw_conv.1.1.{weight, bias} (C,)          <-> dw_norm/scale, dw_norm/bias               norm="layer" (LayerNorm)
    dw_conv.1.0.{weight, bias} (C,)          <-> dw_norm/scale, dw_norm/bias               norm="batch" (BatchNorm2d)
    dw_conv.1.0.running_{mean, var} (C,)     <-> batch_stats dw_norm/mean, var   (num_batches_tracked: none)
    offset.{weight, bias}                    <-> offset/kernel (C, G * T * N), offset/bias
    mask.{weight, bias}                      <-> mask/kernel (C, G * T), mask/bias
    input_proj.{weight, bias}                <-> input_proj/kernel (C, C), input_proj/bias
    output_proj.{weight, bias}               <-> output_proj/kernel (C, C), output_proj/bias

with ``T = prod(kernel_size) - remove_center`` taps; ``offset`` and ``mask`` keep InternImage's channel order
(``jdynconv.dcnv3`` takes it as is).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax

from jdynconv import linen as jdc_linen
from jdynconv import nnx as jdc_nnx
from jdynconv._checks import is_int
from jdynconv.interop._convert import Converter, FlaxShapes, TorchShapes, register
from jdynconv.interop._from_torch import (
    TorchModule,
    TorchPort,
    batch_norm_settings,
    class_name,
    ints,
    register_torch_layer,
    require,
    state_dict_of,
    torch_padding,
)
from jdynconv.interop._rules import (
    LINEAR_LAYOUT,
    VECTOR_LAYOUT,
    Dim,
    DimLike,
    Rule,
    Target,
    batchnorm_rules,
    check_sizes,
    conv_layout,
    conv_rules,
    linear_rules,
)
from jdynconv.linen import deformable
from jdynconv.nnx import deformable as jdc_nnx_deformable

NORMS = ("layer", "batch")


def _params(*path: str) -> Target:
    return Target(("params", *path))


def _taps(kernel_size: Sequence[DimLike]) -> DimLike:
    if any(isinstance(size, Dim) for size in kernel_size):
        return Dim("prod(K)")
    return math.prod(int(size) for size in kernel_size)


def deform_conv_rules(
    *,
    features: DimLike,
    in_features: DimLike,
    in_features_per_group: DimLike,
    kernel_size: Sequence[DimLike],
    use_bias: bool = True,
    predict_offsets: bool = True,
    offset_groups: int = 1,
    use_mask: bool = False,
    torch_prefix: str = "",
) -> list[Rule]:
    """The rules of one DeformConv whose PyTorch twin is torchvision's ``DeformConv2d`` (``predict_offsets=False``)
    or mmcv's ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack`` (``predict_offsets=True``, ``use_mask``).

    Args:
      features: F, the output channels.
      in_features: C_in (``conv_offset``'s input channels).
      in_features_per_group: ``C_in // G``.
      kernel_size: one size per spatial dim.
      use_bias: the layer's ``use_bias`` (False for mmcv's ``DeformConv2dPack``).
      predict_offsets: whether the layer has ``conv_offset``.
      offset_groups: G_off, the deformable groups (``conv_offset``'s output channels; ignored without it).
      use_mask: whether ``conv_offset`` also predicts the mask logits.
      torch_prefix: the PyTorch module's path in a bigger model, e.g. ``"layer1.0.conv2."``.

    Returns:
      Rules for ``weight``, ``bias`` (with ``use_bias``) and ``conv_offset.{weight, bias}`` (with
      ``predict_offsets``), in that order, as the PyTorch modules' state dicts.
    """
    check_sizes(
        features=features,
        in_features=in_features,
        in_features_per_group=in_features_per_group,
        kernel_size=kernel_size,
        offset_groups=offset_groups,
    )
    num_spatial = len(kernel_size)
    rules = [
        Rule(
            f"{torch_prefix}weight",
            (features, in_features_per_group, *kernel_size),
            _params("kernel"),
            conv_layout(num_spatial),
        )
    ]
    if use_bias:
        rules.append(Rule(f"{torch_prefix}bias", (features,), _params("bias"), VECTOR_LAYOUT))
    if predict_offsets:
        taps = _taps(kernel_size)
        per_tap = num_spatial + int(bool(use_mask))
        channels: DimLike = (
            Dim(f"{offset_groups}*prod(K)*{per_tap}", multiple_of=offset_groups * per_tap)
            if isinstance(taps, Dim)
            else offset_groups * taps * per_tap
        )
        rules += conv_rules(
            f"{torch_prefix}conv_offset",
            kernel=_params("conv_offset", "kernel"),
            bias=_params("conv_offset", "bias"),
            features=channels,
            in_features_per_group=in_features,
            kernel_size=kernel_size,
        )
    return rules


def dcnv3_rules(
    *,
    channels: DimLike,
    dw_kernel_size: Sequence[DimLike],
    offset_features: DimLike,
    mask_features: DimLike,
    groups: DimLike,
    norm: str = "layer",
    center_feature_scale: bool = False,
    torch_prefix: str = "",
) -> list[Rule]:
    """The rules of one DCNv3 whose PyTorch twin is InternImage's ``DCNv3_pytorch`` (or ``DCNv3``).

    Args:
      channels: C.
      dw_kernel_size: the depth-wise conv's kernel, one size per spatial dim.
      offset_features: ``offset``'s outputs, ``groups * T * N``.
      mask_features: ``mask``'s outputs, ``groups * T``.
      groups: the channel groups (``center_feature_scale_proj``'s outputs).
      norm: ``"layer"`` (``dw_conv.1.1``, a LayerNorm) or ``"batch"`` (``dw_conv.1.0``, a BatchNorm2d).
      center_feature_scale: whether the layer has ``center_feature_scale_proj``.
      torch_prefix: the PyTorch module's path in a bigger model, e.g. ``"levels.0.blocks.1.dcn."``.

    Returns:
      Rules for every key of the original's state dict, in its order.
    """
    check_sizes(
        channels=channels,
        kernel_size=dw_kernel_size,
        offset_features=offset_features,
        mask_features=mask_features,
        groups=groups,
    )
    if norm not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS}, got {norm!r}.")
    p = torch_prefix
    rules = []
    if center_feature_scale:
        rules += [
            Rule(
                f"{p}center_feature_scale_proj_weight",
                (groups, channels),
                _params("center_feature_scale_proj", "kernel"),
                LINEAR_LAYOUT,
            ),
            Rule(
                f"{p}center_feature_scale_proj_bias",
                (groups,),
                _params("center_feature_scale_proj", "bias"),
                VECTOR_LAYOUT,
            ),
        ]
    rules += conv_rules(
        f"{p}dw_conv.0",
        kernel=_params("dw_conv", "kernel"),
        bias=_params("dw_conv", "bias"),
        features=channels,
        in_features_per_group=1,
        kernel_size=dw_kernel_size,
    )
    if norm == "layer":
        rules += [
            Rule(f"{p}dw_conv.1.1.weight", (channels,), _params("dw_norm", "scale"), VECTOR_LAYOUT),
            Rule(f"{p}dw_conv.1.1.bias", (channels,), _params("dw_norm", "bias"), VECTOR_LAYOUT),
        ]
    else:
        rules += batchnorm_rules(
            f"{p}dw_conv.1.0",
            scale=_params("dw_norm", "scale"),
            offset=_params("dw_norm", "bias"),
            mean=Target(("batch_stats", "dw_norm", "mean")),
            var=Target(("batch_stats", "dw_norm", "var")),
            features=channels,
        )
    for name, features in (
        ("offset", offset_features),
        ("mask", mask_features),
        ("input_proj", channels),
        ("output_proj", channels),
    ):
        rules += linear_rules(
            f"{p}{name}",
            kernel=_params(name, "kernel"),
            bias=_params(name, "bias"),
            in_features=channels,
            features=features,
        )
    return rules


# --- linen DeformConv: C_in and the rank come from the other side's shapes ---------------------------------


def _kernel_size(kernel_size: int | Sequence[int], rank: int | None) -> tuple[DimLike, ...]:
    if not is_int(kernel_size):
        return tuple(kernel_size)
    if rank:
        return (kernel_size,) * rank
    return (Dim(f"{kernel_size} per spatial dim"),)


def _linen_deform_rules(module: jdc_linen.DeformConv, per_group: int | None, rank: int | None) -> list[Rule]:
    groups = module.feature_group_count
    if per_group:
        in_features: DimLike = per_group * groups
        in_per_group: DimLike = per_group
    else:
        in_features, in_per_group = Dim(f"C_in (a multiple of {groups})", multiple_of=groups), Dim("C_in//G")
    return deform_conv_rules(
        features=module.features,
        in_features=in_features,
        in_features_per_group=in_per_group,
        kernel_size=_kernel_size(module.kernel_size, rank),
        use_bias=module.use_bias,
        predict_offsets=module.predict_offsets,
        offset_groups=module.offset_groups,
        use_mask=module.use_mask,
    )


def _linen_deform_torch_rules(module: jdc_linen.DeformConv, shapes: TorchShapes) -> list[Rule]:
    """C_in // G and the rank from ``weight (F, C_in // G, *K)``, else from ``conv_offset.weight (O, C_in, *K)``."""
    weight = shapes.get("weight")
    if weight is not None and 3 <= len(weight) <= 5:
        return _linen_deform_rules(module, weight[1], len(weight) - 2)
    offset = shapes.get("conv_offset.weight")
    groups = module.feature_group_count
    if module.predict_offsets and offset is not None and 3 <= len(offset) <= 5 and offset[1] % groups == 0:
        return _linen_deform_rules(module, offset[1] // groups, len(offset) - 2)
    return _linen_deform_rules(module, None, None)


def _linen_deform_flax_rules(module: jdc_linen.DeformConv, shapes: FlaxShapes) -> list[Rule]:
    """C_in // G and the rank from ``kernel (*K, C_in // G, F)``."""
    kernel = shapes.get(("params", "kernel"))
    if kernel is not None and 3 <= len(kernel) <= 5:
        return _linen_deform_rules(module, kernel[-2], len(kernel) - 2)
    return _linen_deform_rules(module, None, None)


# --- NNX DeformConv: the model knows every shape ------------------------------------------------------------


def _nnx_deform_rules(model: jdc_nnx.DeformConv, shapes: FlaxShapes) -> list[Rule]:
    return deform_conv_rules(
        features=model.features,
        in_features=model.in_features,
        in_features_per_group=model.in_features // model.feature_group_count,
        kernel_size=tuple(model.kernel_size),
        use_bias=model.bias is not None,
        predict_offsets=model.predict_offsets,
        offset_groups=model.offset_groups,
        use_mask=model.use_mask,
    )


# --- linen DCNv3: the rank comes from the other side's shapes -----------------------------------------------


def _dcnv3_rules(module: jdc_linen.DCNv3, rank: int) -> list[Rule]:
    """From the module's attributes; ``rank`` (from the shapes at hand) where its sizes are ints."""
    kernel_size = module.kernel_size
    kernel_t = (kernel_size,) * rank if is_int(kernel_size) else tuple(kernel_size)
    dw_kernel_size = module.dw_kernel_size if module.dw_kernel_size is not None else kernel_t
    dw_t = (dw_kernel_size,) * len(kernel_t) if is_int(dw_kernel_size) else tuple(dw_kernel_size)
    taps = math.prod(kernel_t) - int(bool(module.remove_center))
    return dcnv3_rules(
        channels=module.channels,
        dw_kernel_size=dw_t,
        offset_features=module.groups * taps * len(kernel_t),
        mask_features=module.groups * taps,
        groups=module.groups,
        norm=module.norm,
        center_feature_scale=module.center_feature_scale,
    )


def _rank(shape: Sequence[int] | None, leading: int, default: int = 2) -> int:
    """The number of spatial dims of a conv kernel ``shape`` with ``leading`` non-spatial dims (2 if unknown)."""
    if shape is not None and 1 <= len(shape) - leading <= 3:
        return len(shape) - leading
    return default


def _linen_dcnv3_torch_rules(module: jdc_linen.DCNv3, shapes: TorchShapes) -> list[Rule]:
    """The rank from ``dw_conv.0.weight (C, 1, *dK)`` (2, InternImage's, if absent)."""
    return _dcnv3_rules(module, _rank(shapes.get("dw_conv.0.weight"), 2))


def _linen_dcnv3_flax_rules(module: jdc_linen.DCNv3, shapes: FlaxShapes) -> list[Rule]:
    """The rank from ``dw_conv/kernel (*dK, 1, C)``."""
    return _dcnv3_rules(module, _rank(shapes.get(("params", "dw_conv", "kernel")), 2))


def _nnx_dcnv3_rules(model: jdc_nnx.DCNv3, shapes: FlaxShapes) -> list[Rule]:
    geometry = model.geometry
    return dcnv3_rules(
        channels=model.channels,
        dw_kernel_size=tuple(geometry.dw_kernel_size),
        offset_features=model.groups * geometry.taps * len(geometry.kernel_size),
        mask_features=model.groups * geometry.taps,
        groups=model.groups,
        norm="batch" if isinstance(model.dw_norm, jdc_nnx_deformable.TorchBatchNorm) else "layer",
        center_feature_scale=model.center_feature_scale_proj is not None,
    )


register(jdc_linen.DeformConv, Converter(flax_rules=_linen_deform_flax_rules, torch_rules=_linen_deform_torch_rules))
register(jdc_nnx.DeformConv, Converter(flax_rules=_nnx_deform_rules))
register(jdc_linen.DCNv3, Converter(flax_rules=_linen_dcnv3_flax_rules, torch_rules=_linen_dcnv3_torch_rules))
register(jdc_nnx.DCNv3, Converter(flax_rules=_nnx_dcnv3_rules))


# --- from_torch ----------------------------------------------------------------------------------------------


def _deform_attributes(module: TorchModule) -> tuple[dict[str, Any], int]:
    """The conv settings every deformable conv of torchvision and mmcv stores, and C_in."""
    features, per_group, *kernel_size = (int(d) for d in module.weight.shape)
    rank = len(kernel_size)
    groups = int(module.groups)
    dilation = ints(module.dilation, rank, "dilation")
    bias = getattr(module, "bias", None)
    attributes = {
        "features": features,
        "kernel_size": tuple(kernel_size),
        "strides": ints(module.stride, rank, "stride"),
        "padding": torch_padding(module.padding, kernel_size, dilation),
        "kernel_dilation": dilation,
        "feature_group_count": groups,
        "use_bias": bias is not None,
    }
    return attributes, per_group * groups


def _deform_conv_port(module: TorchModule) -> TorchPort:
    """torchvision's ``DeformConv2d`` (and mmcv's of that name, and mmcv's ``ModulatedDeformConv2d``): offsets, and a
    mask, are call arguments, ``module(x, offsets, mask=None)`` (``predict_offsets=False``). mmcv's store their
    ``deform_groups``, which becomes ``offset_groups``; torchvision reads the offset groups off the offsets."""
    require(module, "torchvision's DeformConv2d", "weight", "stride", "padding", "dilation", "groups")
    attributes, in_channels = _deform_attributes(module)
    attributes["predict_offsets"] = False
    if hasattr(module, "deform_groups"):  # mmcv's
        attributes["offset_groups"] = int(module.deform_groups)
    return TorchPort(
        jdc_linen.DeformConv, jdc_nnx.DeformConv, attributes, {"in_features": in_channels}, state_dict_of(module)
    )


def _pack_port(module: TorchModule) -> TorchPort:
    """mmcv's ``DeformConv2dPack`` (DCNv1) and ``ModulatedDeformConv2dPack`` (DCNv2): ``conv_offset`` predicts the
    offsets (and the mask), ``predict_offsets=True``; ``use_mask`` from ``conv_offset``'s output channels."""
    name = class_name(module)
    require(
        module,
        f"mmcv's {name}",
        "weight",
        "stride",
        "padding",
        "dilation",
        "groups",
        "deform_groups",
        "conv_offset.weight",
        "conv_offset.stride",
        "conv_offset.padding",
        "conv_offset.dilation",
    )
    attributes, in_channels = _deform_attributes(module)
    rank = len(attributes["kernel_size"])
    offset_groups = int(module.deform_groups)
    taps = math.prod(attributes["kernel_size"])
    channels = int(module.conv_offset.weight.shape[0])
    if channels not in (offset_groups * taps * rank, offset_groups * taps * (rank + 1)):
        raise ValueError(
            f"conv_offset has {channels} output channels; {name} with deform_groups={offset_groups} and "
            f"{taps} taps has {offset_groups * taps * rank} (offsets) or {offset_groups * taps * (rank + 1)} "
            "(offsets and mask)."
        )
    offset_conv = module.conv_offset
    same = (
        ints(offset_conv.stride, rank, "conv_offset.stride") == attributes["strides"]
        and ints(offset_conv.dilation, rank, "conv_offset.dilation") == attributes["kernel_dilation"]
        and torch_padding(offset_conv.padding, attributes["kernel_size"], attributes["kernel_dilation"])
        == attributes["padding"]
        and int(getattr(offset_conv, "groups", 1)) == 1
        and getattr(offset_conv, "bias", None) is not None
    )
    if not same:
        raise ValueError(
            f"{name}'s conv_offset must have the layer's stride, padding and dilation, groups=1 and a bias, as mmcv "
            "builds it."
        )
    attributes |= {
        "predict_offsets": True,
        "offset_groups": offset_groups,
        "use_mask": channels == offset_groups * taps * (rank + 1),
    }
    return TorchPort(
        jdc_linen.DeformConv, jdc_nnx.DeformConv, attributes, {"in_features": in_channels}, state_dict_of(module)
    )


_ACTIVATIONS = {"GELU": jdc_linen.exact_gelu, "ReLU": jax.nn.relu, "SiLU": jax.nn.silu}


def _activation(module: TorchModule) -> Any:
    """``build_act_layer``'s module (``dw_conv.2``) -> the layer's ``activation``: ``nn.GELU()`` is the exact
    (erf) GELU, ``nn.GELU(approximate="tanh")`` :func:`jax.nn.gelu`'s default."""
    act = module.dw_conv[2]
    name = class_name(act)
    if name not in _ACTIVATIONS:
        raise ValueError(f"dw_conv.2 is a {name}; DCNv3's act_layer is one of {sorted(_ACTIVATIONS)}.")
    if name == "GELU" and getattr(act, "approximate", "none") == "tanh":
        return jax.nn.gelu
    return _ACTIVATIONS[name]


def _norm(module: TorchModule) -> dict[str, Any]:
    """``build_norm_layer``'s ``Sequential`` (``dw_conv.1``) -> ``norm``; its epsilon (and BatchNorm momentum) must
    be the ones jdynconv's DCNv3 has, InternImage's: LayerNorm ``eps=1e-6``, ``nn.BatchNorm2d``'s defaults."""
    children = list(module.dw_conv[1])
    names = [class_name(child) for child in children]
    if "LayerNorm" in names:
        where = f"dw_conv.1.{names.index('LayerNorm')}"
        norm = children[names.index("LayerNorm")]
        require(norm, "LayerNorm", "eps")
        settings = {"epsilon": float(norm.eps)}
        expected = {"epsilon": deformable.LAYER_NORM_EPSILON}
        if not getattr(norm, "elementwise_affine", True) or getattr(norm, "bias", None) is None:
            raise ValueError(f"{where}'s LayerNorm must have elementwise_affine=True and a bias, as InternImage's.")
        chosen = "layer"
    elif "BatchNorm2d" in names:
        where = f"dw_conv.1.{names.index('BatchNorm2d')}"
        settings = batch_norm_settings(children[names.index("BatchNorm2d")], where)
        expected = {"epsilon": deformable.BATCH_NORM_EPSILON, "momentum": deformable.BATCH_NORM_MOMENTUM}
        chosen = "batch"
    else:
        raise ValueError(f"dw_conv.1 holds {names}; DCNv3's norm_layer is LayerNorm ('LN') or BatchNorm2d ('BN').")
    differ = [
        f"{name} {settings[name]!r} (jdynconv's DCNv3 has {value!r})"
        for name, value in expected.items()
        if not math.isclose(settings[name], value, rel_tol=1e-9)
    ]
    if differ:
        raise ValueError(f"{where} has {', '.join(differ)}; jdynconv's DCNv3 fixes them to InternImage's values.")
    return {"norm": chosen}


def _dcnv3_port(module: TorchModule) -> TorchPort:
    """InternImage's ``DCNv3_pytorch`` / ``DCNv3``: every setting from its attributes; ``act_layer`` and
    ``norm_layer`` (not stored) from the types of ``dw_conv``'s children."""
    require(
        module,
        f"InternImage's {class_name(module)}",
        "channels",
        "kernel_size",
        "dw_kernel_size",
        "stride",
        "pad",
        "dilation",
        "group",
        "offset_scale",
        "center_feature_scale",
        "remove_center",
        "dw_conv",
    )
    attributes = {
        "channels": int(module.channels),
        "kernel_size": (int(module.kernel_size),) * 2,
        "dw_kernel_size": (int(module.dw_kernel_size),) * 2,
        "strides": int(module.stride),
        "padding": int(module.pad),
        "kernel_dilation": int(module.dilation),
        "groups": int(module.group),
        "offset_scale": float(module.offset_scale),
        "activation": _activation(module),
        **_norm(module),
        "center_feature_scale": bool(module.center_feature_scale),
        "remove_center": bool(module.remove_center),
    }
    return TorchPort(jdc_linen.DCNv3, jdc_nnx.DCNv3, attributes, {}, state_dict_of(module))


register_torch_layer("DeformConv2d", _deform_conv_port)
register_torch_layer("ModulatedDeformConv2d", _deform_conv_port)
register_torch_layer("DeformConv2dPack", _pack_port)
register_torch_layer("ModulatedDeformConv2dPack", _pack_port)
register_torch_layer("DCNv3_pytorch", _dcnv3_port)
register_torch_layer("DCNv3", _dcnv3_port)
