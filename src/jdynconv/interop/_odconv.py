"""ODConv <-> the original PyTorch ``ODConv2d`` (OSVAI/ODConv ``modules/odconv.py``, commit 0901cc1c).

The original's names; its attention's 1x1 convs are Dense layers in Flax (``N`` trailing 1s for N-d)::

    weight (k, F, C_in // G, *K)                  <-> kernel (k, *K, C_in // G, F)
    attention.fc.weight (A, C_in, 1...)           <-> attention_kernel (C_in, A)
    attention.bn.{weight, bias}  (A,)             <-> scale, offset
    attention.bn.{running_mean, running_var} (A,) <-> batch_stats mean, var  (num_batches_tracked: none)
    attention.channel_fc.{weight, bias}           <-> channel_kernel (A, C_in), channel_bias (C_in,)
    attention.filter_fc.{weight, bias}            <-> filter_kernel (A, F), filter_bias (F,)      not depthwise
    attention.spatial_fc.{weight, bias}           <-> spatial_kernel (A, prod(K)), spatial_bias   not one tap
    attention.kernel_fc.{weight, bias}            <-> expert_kernel (A, k), expert_bias (k,)      k > 1
    bias (F,)                                     <-> bias (F,)   only with ``use_bias`` (the original has none)

with ``A = max(int(C_in * reduction), min_channels)``. A head the original skips (depthwise, 1x1, one expert)
is absent on both sides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from jdynconv import _odconv
from jdynconv import linen as jdc_linen
from jdynconv import nnx as jdc_nnx
from jdynconv.interop._convert import Converter, FlaxShapes, TorchShapes, register
from jdynconv.interop._from_torch import (
    TorchModule,
    TorchPort,
    batch_norm_settings,
    fitting_ratio,
    ints,
    register_torch_layer,
    require,
    state_dict_of,
    torch_padding,
)
from jdynconv.interop._kernel_mix import _bank_layout, _dense_1x1_rule
from jdynconv.interop._rules import VECTOR_LAYOUT, Dim, DimLike, Permutation, Rule, Target, batchnorm_rules, check_sizes

HEADS = (("channel", "channel_fc"), ("filter", "filter_fc"), ("spatial", "spatial_fc"), ("expert", "kernel_fc"))
"""jdynconv head -> the original's ``Attention`` submodule."""


def od_conv_rules(
    *,
    num_experts: int,
    features: int,
    in_features: DimLike,
    in_features_per_group: DimLike,
    attention_features: DimLike,
    kernel_size: Sequence[DimLike],
    heads: Sequence[str],
    use_bias: bool = False,
    torch_prefix: str = "",
) -> list[Rule]:
    """The rules of one ODConv whose PyTorch twin is the original ``ODConv2d`` (or its N-d form).

    Args:
      num_experts: the module's k.
      features: the module's F.
      in_features: C_in.
      in_features_per_group: ``C_in // G``.
      attention_features: A, the attention's width.
      kernel_size: one size per spatial dim (also the number of trailing 1s of the attention's 1x1 convs).
      heads: the attention heads the layer has, among ``"channel"``, ``"filter"``, ``"spatial"``, ``"expert"``.
      use_bias: the module's ``use_bias``.
      torch_prefix: the PyTorch module's path in a bigger model, e.g. ``"layer1.0.conv1."``.

    Returns:
      Rules for ``weight``, ``attention.fc.weight``, ``attention.bn.*`` and each head's ``weight``/``bias``
      (and ``bias`` with ``use_bias``).
    """
    check_sizes(
        num_experts=num_experts,
        features=features,
        in_features=in_features,
        in_features_per_group=in_features_per_group,
        attention_features=attention_features,
        kernel_size=kernel_size,
    )
    known = [head for head, _ in HEADS]
    if isinstance(heads, str) or any(head not in known for head in heads):
        raise ValueError(f"`heads` must be a sequence of heads among {known}, got {heads!r}.")
    num_spatial = len(kernel_size)
    unknown = any(isinstance(size, Dim) for size in kernel_size)
    taps: DimLike = Dim("prod(K)") if unknown else math.prod(int(size) for size in kernel_size)
    sizes = {"channel": in_features, "filter": features, "spatial": taps, "expert": num_experts}
    rules = [
        Rule(
            f"{torch_prefix}weight",
            (num_experts, features, in_features_per_group, *kernel_size),
            Target(("params", "kernel")),
            Permutation(_bank_layout(num_spatial)),
        ),
        _dense_1x1_rule(
            f"{torch_prefix}attention.fc.weight",
            attention_features,
            in_features,
            num_spatial,
            Target(("params", "attention_kernel")),
        ),
        *batchnorm_rules(
            f"{torch_prefix}attention.bn",
            scale=Target(("params", "scale")),
            offset=Target(("params", "offset")),
            mean=Target(("batch_stats", "mean")),
            var=Target(("batch_stats", "var")),
            features=attention_features,
        ),
    ]
    for head, torch_name in HEADS:
        if head not in heads:
            continue
        rules.append(
            _dense_1x1_rule(
                f"{torch_prefix}attention.{torch_name}.weight",
                sizes[head],
                attention_features,
                num_spatial,
                Target(("params", f"{head}_kernel")),
            )
        )
        rules.append(
            Rule(
                f"{torch_prefix}attention.{torch_name}.bias",
                (sizes[head],),
                Target(("params", f"{head}_bias")),
                VECTOR_LAYOUT,
            )
        )
    if use_bias:
        rules.append(Rule(f"{torch_prefix}bias", (features,), Target(("params", "bias")), VECTOR_LAYOUT))
    return rules


def _heads(in_features: int | None, features: int, groups: int, kernel_size: Sequence[DimLike], k: int) -> list[str]:
    """The heads the original builds; with C_in unknown, the filter head is kept (reported against the data)."""
    heads = ["channel"]
    if in_features is None or _odconv.has_filter_attention(in_features, features, groups):
        heads.append("filter")
    if any(isinstance(size, Dim) for size in kernel_size) or _odconv.has_spatial_attention(tuple(kernel_size)):
        heads.append("spatial")
    if _odconv.has_expert_attention(k):
        heads.append("expert")
    return heads


# --- linen: C_in and the rank come from the other side's shapes ------------------------------------


def _check_config(module: jdc_linen.ODConv) -> None:
    _odconv.check_config(
        module.features,
        module.num_experts,
        module.feature_group_count,
        module.reduction,
        module.min_channels,
        module.temperature,
        module.attention_placement,
        module.method,
    )


def _linen_rules(module: jdc_linen.ODConv, in_features_per_group: int | None, rank: int | None) -> list[Rule]:
    groups = module.feature_group_count
    if isinstance(module.kernel_size, int):
        kernel_size: tuple[DimLike, ...] = (
            (module.kernel_size,) * rank if rank else (Dim(f"{module.kernel_size} per spatial dim"),)
        )
    else:
        kernel_size = tuple(module.kernel_size)
    if in_features_per_group:
        in_features: DimLike = in_features_per_group * groups
        attention: DimLike = _odconv.attention_width(in_features, module.reduction, module.min_channels)
        known_in = in_features
    else:
        in_features = Dim(f"C_in (a multiple of {groups})", multiple_of=groups)
        attention = Dim(f"max(int(C_in*{module.reduction}), {module.min_channels})")
        known_in = None
    return od_conv_rules(
        num_experts=module.num_experts,
        features=module.features,
        in_features=in_features,
        in_features_per_group=in_features_per_group or Dim("C_in//G"),
        attention_features=attention,
        kernel_size=kernel_size,
        heads=_heads(known_in, module.features, groups, kernel_size, module.num_experts),
        use_bias=module.use_bias,
    )


def _linen_torch_rules(module: jdc_linen.ODConv, shapes: TorchShapes) -> list[Rule]:
    """C_in // G and the rank from ``weight (k, F, C_in // G, *K)``, else from ``attention.fc.weight``."""
    _check_config(module)
    weight = shapes.get("weight")
    if weight is not None and len(weight) >= 4:
        return _linen_rules(module, weight[2], len(weight) - 3)
    fc = shapes.get("attention.fc.weight")
    groups = module.feature_group_count
    if fc is not None and len(fc) >= 3 and fc[1] % groups == 0:
        return _linen_rules(module, fc[1] // groups, len(fc) - 2)
    return _linen_rules(module, None, None)


def _linen_flax_rules(module: jdc_linen.ODConv, shapes: FlaxShapes) -> list[Rule]:
    """C_in // G and the rank from the kernel bank ``(k, *K, C_in // G, F)``."""
    _check_config(module)
    shape = shapes.get(("params", "kernel"))
    if shape is not None and len(shape) >= 4:
        return _linen_rules(module, shape[-2], len(shape) - 3)
    return _linen_rules(module, None, None)


# --- NNX: the model knows every shape --------------------------------------------------------------


def _nnx_rules(model: jdc_nnx.ODConv, shapes: FlaxShapes) -> list[Rule]:
    config = model.config
    return od_conv_rules(
        num_experts=config.num_experts,
        features=config.features,
        in_features=model.in_features,
        in_features_per_group=model.in_features // config.feature_group_count,
        attention_features=_odconv.attention_width(model.in_features, config.reduction, config.min_channels),
        kernel_size=tuple(config.kernel_size),
        heads=[head for head, _ in HEADS if ("params", f"{head}_kernel") in shapes],
        use_bias=("params", "bias") in shapes,
    )


register(jdc_linen.ODConv, Converter(flax_rules=_linen_flax_rules, torch_rules=_linen_torch_rules))
register(jdc_nnx.ODConv, Converter(flax_rules=_nnx_rules))


# --- from_torch: OSVAI's ODConv2d -------------------------------------------------------------------------


def _attention_sizes(in_channels: int, width: int) -> dict[str, Any]:
    """``reduction`` and ``min_channels`` giving the attention width found in ``attention.fc.weight``: the
    original's defaults (0.0625, 16) when they fit; the original does not store them."""
    if _odconv.attention_width(in_channels, 0.0625, 16) == width:
        return {"reduction": 0.0625, "min_channels": 16}
    reduction = fitting_ratio(width, in_channels, 0.0625, lambda c, r: max(int(c * r), width))
    return {"reduction": reduction, "min_channels": width}


def _odconv_port(module: TorchModule) -> TorchPort:
    """OSVAI's ``ODConv2d`` (and its N-d form): weight ``(k, F, C_in // G, *K)``, the attention's width (from
    ``attention.fc``), BatchNorm (``attention.bn``) and stored temperature (``attention.temperature``)."""
    require(
        module,
        "OSVAI's ODConv2d",
        "weight",
        "stride",
        "padding",
        "dilation",
        "groups",
        "attention.fc.weight",
        "attention.bn",
        "attention.temperature",
    )
    num_experts, features, per_group, *kernel_size = (int(d) for d in module.weight.shape)
    rank = len(kernel_size)
    groups = int(module.groups)
    in_channels = per_group * groups
    dilation = ints(module.dilation, rank, "dilation")
    bias = getattr(module, "bias", None)
    attributes = {
        "features": features,
        "kernel_size": tuple(kernel_size),
        "num_experts": num_experts,
        **_attention_sizes(in_channels, int(module.attention.fc.weight.shape[0])),
        "temperature": float(module.attention.temperature),
        "strides": ints(module.stride, rank, "stride"),
        "padding": torch_padding(module.padding, kernel_size, dilation),
        "kernel_dilation": dilation,
        "feature_group_count": groups,
        "use_bias": bias is not None,
        **batch_norm_settings(module.attention.bn, "attention.bn"),
    }
    return TorchPort(jdc_linen.ODConv, jdc_nnx.ODConv, attributes, {"in_features": in_channels}, state_dict_of(module))


register_torch_layer("ODConv2d", _odconv_port)
register_torch_layer("ODConvNd", _odconv_port)
