"""Involution <-> d-li14's ``involution``; LightweightConv / DynamicLightweightConv <-> fairseq's
``LightweightConv1dTBC`` / ``DynamicConv1dTBC``.

**Involution** (d-li14/involution's naive PyTorch module; its ``conv1``/``conv2`` are mmcv ``ConvModule``\\ s, whose
conv is ``.conv`` and BatchNorm ``.bn``)::

    conv1.conv.weight (C // r, C, 1, ..., 1)      <-> conv1/kernel (1, ..., 1, C, C // r)
    conv1.bn.{weight, bias} (C // r,)             <-> bn/scale, bn/bias
    conv1.bn.running_{mean, var} (C // r,)        <-> batch_stats bn/mean, bn/var   (num_batches_tracked: none)
    conv2.conv.weight (G * K, C // r, 1, ..., 1)  <-> conv2/kernel (1, ..., 1, C // r, G * K)
    conv2.conv.bias (G * K,)                      <-> conv2/bias

**LightweightConv** (``fairseq/modules/lightweight_convolution.py``)::

    weight (H, 1, K)                              <-> kernel (H, K)
    bias (C,)                                     <-> bias (C,)                      with ``use_bias``

**DynamicLightweightConv** (``fairseq/modules/dynamic_convolution.py``)::

    weight_linear.weight (H * K, Q)               <-> weight_linear/kernel (Q, H * K)
    weight_linear.bias (H * K,)                   <-> weight_linear/bias             with ``use_bias``
    weight_linear.{weight, bias} (C + H * K, ...) <-> weight_linear/{kernel, bias}   with ``in_proj``
    conv_bias (C,)                                <-> conv_bias (C,)                 with ``conv_bias``
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

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
)
from jdynconv.interop._kernel_mix import ReshapedPermutation
from jdynconv.interop._rules import (
    VECTOR_LAYOUT,
    DimLike,
    Rule,
    Target,
    batchnorm_rules,
    check_sizes,
    conv_rules,
    linear_rules,
)
from jdynconv.linen.deformable import BATCH_NORM_EPSILON, BATCH_NORM_MOMENTUM


def _params(*path: str) -> Target:
    return Target(("params", *path))


def involution_rules(
    *, channels: DimLike, reduced: DimLike, kernel_features: DimLike, num_spatial: int = 2, torch_prefix: str = ""
) -> list[Rule]:
    """The rules of one Involution whose PyTorch twin is d-li14's ``involution``.

    Args:
      channels: C.
      reduced: ``C // reduction_ratio``, ``conv1``'s output channels.
      kernel_features: ``G * prod(kernel_size)``, ``conv2``'s output channels.
      num_spatial: spatial dims (2 for the original).
      torch_prefix: the module's path in a bigger model, e.g. ``"layer1.0.conv2."``.
    """
    check_sizes(channels=channels, reduced=reduced, kernel_features=kernel_features)
    ones = (1,) * num_spatial
    return [
        *conv_rules(
            f"{torch_prefix}conv1.conv",
            kernel=_params("conv1", "kernel"),
            bias=None,
            features=reduced,
            in_features_per_group=channels,
            kernel_size=ones,
        ),
        *batchnorm_rules(
            f"{torch_prefix}conv1.bn",
            scale=_params("bn", "scale"),
            offset=_params("bn", "bias"),
            mean=Target(("batch_stats", "bn", "mean")),
            var=Target(("batch_stats", "bn", "var")),
            features=reduced,
        ),
        *conv_rules(
            f"{torch_prefix}conv2.conv",
            kernel=_params("conv2", "kernel"),
            bias=_params("conv2", "bias"),
            features=kernel_features,
            in_features_per_group=reduced,
            kernel_size=ones,
        ),
    ]


def lightweight_conv_rules(
    *, num_heads: DimLike, kernel_size: DimLike, channels: DimLike, use_bias: bool, torch_prefix: str = ""
) -> list[Rule]:
    """The rules of one LightweightConv whose PyTorch twin is fairseq's ``LightweightConv1dTBC``."""
    check_sizes(num_heads=num_heads, taps=kernel_size, channels=channels)
    layout = ReshapedPermutation((0, 1), view=(num_heads, kernel_size), torch_shape=(num_heads, 1, kernel_size))
    rules = [Rule(f"{torch_prefix}weight", (num_heads, 1, kernel_size), _params("kernel"), layout)]
    if use_bias:
        rules.append(Rule(f"{torch_prefix}bias", (channels,), _params("bias"), VECTOR_LAYOUT))
    return rules


def dynamic_lightweight_conv_rules(
    *,
    in_features: DimLike,
    features: DimLike,
    use_bias: bool,
    channels: DimLike,
    conv_bias: bool,
    torch_prefix: str = "",
) -> list[Rule]:
    """The rules of one DynamicLightweightConv whose PyTorch twin is fairseq's ``DynamicConv1dTBC``.

    Args:
      in_features: ``weight_linear``'s input features: Q (C with ``in_proj``).
      features: its outputs: ``H * K`` (``C + H * K`` with ``in_proj``).
      use_bias: whether ``weight_linear`` has a bias (always with ``in_proj``).
      channels: C.
      conv_bias: whether there is a ``conv_bias``.
      torch_prefix: the module's path in a bigger model.
    """
    bias = _params("weight_linear", "bias") if use_bias else None
    rules = linear_rules(
        f"{torch_prefix}weight_linear",
        kernel=_params("weight_linear", "kernel"),
        bias=bias,
        in_features=in_features,
        features=features,
    )
    if conv_bias:
        check_sizes(channels=channels)
        rules.append(Rule(f"{torch_prefix}conv_bias", (channels,), _params("conv_bias"), VECTOR_LAYOUT))
    return rules


# --- Involution ----------------------------------------------------------------------------------------------


def _linen_involution_rules(module: jdc_linen.Involution, shape: Sequence[int] | None, leading: int) -> list[Rule]:
    """Sizes from ``conv1``'s and ``conv2``'s kernels as given (the layer infers C from its input)."""
    if shape is None:
        raise ValueError("the Involution's sizes come from conv1's kernel, which is missing")
    num_spatial = len(shape) - 2
    kernel_size = module.kernel_size
    kernel_t = (kernel_size,) * num_spatial if is_int(kernel_size) else tuple(kernel_size)
    channels = shape[1] if leading == 0 else shape[-2]
    return involution_rules(
        channels=channels,
        reduced=channels // module.reduction_ratio,
        kernel_features=channels // module.group_channels * math.prod(kernel_t),
        num_spatial=num_spatial,
    )


def _linen_involution_torch_rules(module: jdc_linen.Involution, shapes: TorchShapes) -> list[Rule]:
    return _linen_involution_rules(module, shapes.get("conv1.conv.weight"), 0)


def _linen_involution_flax_rules(module: jdc_linen.Involution, shapes: FlaxShapes) -> list[Rule]:
    return _linen_involution_rules(module, shapes.get(("params", "conv1", "kernel")), 1)


def _nnx_involution_rules(model: jdc_nnx.Involution, shapes: FlaxShapes) -> list[Rule]:
    return involution_rules(
        channels=model.channels,
        reduced=model.channels // model.reduction_ratio,
        kernel_features=model.channels // model.group_channels * math.prod(model.kernel_size),
        num_spatial=len(model.kernel_size),
    )


# --- the fairseq layers: sizes from the module's attributes and the shapes at hand ----------------------------


def _linen_lightweight_rules(module: jdc_linen.LightweightConv, channels: int | None) -> list[Rule]:
    return lightweight_conv_rules(
        num_heads=module.num_heads,
        kernel_size=module.kernel_size,
        channels=channels if channels is not None else module.num_heads,
        use_bias=module.use_bias,
    )


def _linen_dynamic_rules(
    module: jdc_linen.DynamicLightweightConv, shape: Sequence[int] | None, bias: Sequence[int] | None, torch: bool
) -> list[Rule]:
    """``shape``: ``weight_linear``'s weight (PyTorch) or kernel (Flax), for Q; ``bias``: ``conv_bias``'s, for C
    (Q itself with ``in_proj``, or when there is no ``conv_bias`` to size)."""
    taps = module.num_heads * module.kernel_size
    in_features = (shape[1] if torch else shape[0]) if shape is not None else taps
    channels = bias[0] if bias is not None and not module.in_proj else in_features
    return dynamic_lightweight_conv_rules(
        in_features=in_features,
        features=channels + taps if module.in_proj else taps,
        use_bias=module.use_bias or module.in_proj,
        channels=channels,
        conv_bias=module.conv_bias,
    )


def _nnx_lightweight_rules(model: jdc_nnx.LightweightConv, shapes: FlaxShapes) -> list[Rule]:
    return lightweight_conv_rules(
        num_heads=model.num_heads,
        kernel_size=model.kernel_size,
        channels=model.channels,
        use_bias=model.bias is not None,
    )


def _nnx_dynamic_rules(model: jdc_nnx.DynamicLightweightConv, shapes: FlaxShapes) -> list[Rule]:
    linear = model.weight_linear
    return dynamic_lightweight_conv_rules(
        in_features=linear.in_features,
        features=linear.out_features,
        use_bias=linear.bias is not None,
        channels=model.channels,
        conv_bias=model.conv_bias is not None,
    )


def _first(shapes: Any, *keys: Any) -> Any:
    return next((shapes[key] for key in keys if key in shapes), None)


register(
    jdc_linen.Involution,
    Converter(flax_rules=_linen_involution_flax_rules, torch_rules=_linen_involution_torch_rules),
)
register(jdc_nnx.Involution, Converter(flax_rules=_nnx_involution_rules))
register(
    jdc_linen.LightweightConv,
    Converter(
        flax_rules=lambda m, s: _linen_lightweight_rules(m, (_first(s, ("params", "bias")) or (None,))[0]),
        torch_rules=lambda m, s: _linen_lightweight_rules(m, (_first(s, "bias") or (None,))[0]),
    ),
)
register(jdc_nnx.LightweightConv, Converter(flax_rules=_nnx_lightweight_rules))
register(
    jdc_linen.DynamicLightweightConv,
    Converter(
        flax_rules=lambda m, s: _linen_dynamic_rules(
            m, _first(s, ("params", "weight_linear", "kernel")), _first(s, ("params", "conv_bias")), False
        ),
        torch_rules=lambda m, s: _linen_dynamic_rules(
            m, _first(s, "weight_linear.weight"), _first(s, "conv_bias"), True
        ),
    ),
)
register(jdc_nnx.DynamicLightweightConv, Converter(flax_rules=_nnx_dynamic_rules))


# --- from_torch ----------------------------------------------------------------------------------------------


def _involution_port(module: TorchModule) -> TorchPort:
    """d-li14's ``involution``: kernel size, stride, group channels from its attributes, the reduction ratio from
    ``conv1``'s width; its BatchNorm must have ``nn.BatchNorm2d``'s defaults (jdynconv's Involution fixes them)."""
    require(
        module,
        "d-li14's involution",
        "kernel_size",
        "stride",
        "channels",
        "group_channels",
        "conv1.conv.weight",
        "conv1.bn",
        "conv2.conv.weight",
    )
    channels = int(module.channels)
    reduced = int(module.conv1.conv.weight.shape[0])
    rank = module.conv1.conv.weight.dim() - 2
    settings = batch_norm_settings(module.conv1.bn, "conv1.bn")
    if not (
        math.isclose(settings["momentum"], BATCH_NORM_MOMENTUM, rel_tol=1e-9)
        and math.isclose(settings["epsilon"], BATCH_NORM_EPSILON, rel_tol=1e-9)
    ):
        raise ValueError(
            f"conv1.bn has momentum {1 - settings['momentum']!r}, eps {settings['epsilon']!r}; jdynconv's Involution "
            "fixes nn.BatchNorm2d's defaults (0.1, 1e-5), as mmcv's ConvModule builds it."
        )
    activation = getattr(module.conv1, "activate", None)
    if activation is not None and class_name(activation) != "ReLU":
        raise ValueError(f"conv1's activation is {class_name(module.conv1.activate)}; involution's is ReLU.")
    # The ratio is not stored; the original's 4 if it gives conv1's width, else the first integer that does.
    ratios = [r for r in (4, *range(1, channels + 1)) if channels // r == reduced]
    if not ratios:
        raise ValueError(f"conv1 has {reduced} output channels, C // r for no integer r with C = {channels}.")
    ratio = ratios[0]
    attributes = {
        "kernel_size": ints(module.kernel_size, rank, "kernel_size"),
        "strides": ints(module.stride, rank, "stride"),
        "reduction_ratio": int(ratio),
        "group_channels": int(module.group_channels),
    }
    return TorchPort(
        jdc_linen.Involution, jdc_nnx.Involution, attributes, {"channels": channels}, state_dict_of(module)
    )


def _weight_dropout(module: TorchModule) -> float:
    dropout = getattr(module, "weight_dropout_module", None)
    if dropout is not None and hasattr(dropout, "p"):
        return float(dropout.p)
    return float(getattr(module, "weight_dropout", 0.0))


def _sequence_attributes(module: TorchModule, layer: str) -> dict[str, Any]:
    require(module, layer, "input_size", "kernel_size", "padding_l", "num_heads", "weight_softmax")
    if module.padding_l is None:
        raise ValueError(f"{layer} has padding_l=None, which fairseq's forward cannot run; set it first.")
    return {
        "kernel_size": int(module.kernel_size),
        "num_heads": int(module.num_heads),
        "padding": int(module.padding_l),
        "weight_softmax": bool(module.weight_softmax),
        "weight_dropout": _weight_dropout(module),
        "time_major": True,
    }


def _lightweight_port(module: TorchModule) -> TorchPort:
    """fairseq's ``LightweightConv1dTBC``; the layer takes fairseq's ``(T, B, C)`` (``time_major=True``)."""
    attributes = _sequence_attributes(module, "fairseq's LightweightConv1dTBC")
    attributes["use_bias"] = getattr(module, "bias", None) is not None
    return TorchPort(
        jdc_linen.LightweightConv,
        jdc_nnx.LightweightConv,
        attributes,
        {"channels": int(module.input_size)},
        state_dict_of(module),
        layout="time_major",
    )


def _dynamic_port(module: TorchModule) -> TorchPort:
    """fairseq's ``DynamicConv1dTBC``; the layer takes fairseq's ``(T, B, C)`` (``time_major=True``)."""
    layer = "fairseq's DynamicConv1dTBC"
    attributes = _sequence_attributes(module, layer)
    require(module, layer, "renorm_padding", "query_size", "weight_linear")
    channels = int(module.input_size)
    taps = int(module.num_heads) * int(module.kernel_size)
    in_proj = int(module.weight_linear.weight.shape[0]) == channels + taps
    attributes |= {
        "renorm_padding": bool(module.renorm_padding),
        "use_bias": getattr(module.weight_linear, "bias", None) is not None and not in_proj,
        "conv_bias": getattr(module, "conv_bias", None) is not None,
        "in_proj": in_proj,
    }
    if attributes["renorm_padding"] and not attributes["weight_softmax"]:
        raise ValueError(
            f"{layer} has renorm_padding without weight_softmax: fairseq's band path then drops no weights and its "
            "unfold path refuses it; jdynconv's DynamicLightweightConv refuses it."
        )
    nnx_attributes = {"channels": channels, "query_size": None if in_proj else int(module.query_size)}
    return TorchPort(
        jdc_linen.DynamicLightweightConv,
        jdc_nnx.DynamicLightweightConv,
        attributes,
        nnx_attributes,
        state_dict_of(module),
        layout="time_major",
    )


register_torch_layer("involution", _involution_port)
register_torch_layer("LightweightConv1dTBC", _lightweight_port)
register_torch_layer("DynamicConv1dTBC", _dynamic_port)
