"""CondConv <-> timm's ``CondConv2d``, DynamicConv <-> the Dynamic Convolution PyTorch layout.

**CondConv**: timm's ``CondConv2d`` (``timm/layers/cond_conv2d.py``) stores its k experts flattened,
``weight (k, C_out * C_in // G * prod(K))`` from ``(C_out, C_in // G, *K)`` per expert, and ``bias
(k, C_out)``; the routing ``nn.Linear(C_in, k)`` is ``routing_fn`` (as in timm's ``CondConvResidual``)::

    weight (k, F * C_in // G * prod(K))  <-> kernel (k, *K, C_in // G, F)   (unflatten, then OIHW -> HWIO)
    bias (k, F)                          <-> bias (k, F)
    routing_fn.weight (k, C_in)          <-> routing_kernel (C_in, k)
    routing_fn.bias (k,)                 <-> routing_bias (k,)

The flattened weight does not record the number of spatial dims: a linen ``CondConv`` with a tuple
``kernel_size`` has it; with an int ``kernel_size`` K it is the rank r with ``K ** r`` taps per expert
(C_in from ``routing_fn.weight``), and 2 (``CondConv2d``'s) when that is ambiguous (K = 1, or no
``routing_fn.weight``). Pass a tuple ``kernel_size`` for 1x1 CondConvs in 1-D or 3-D.

**DynamicConv**: the layout of the widely used Dynamic Convolution code (kaijieshi7/
Dynamic-convolution-Pytorch, ``Dynamic_conv{1,2,3}d``), whose attention branch is two 1x1 convs::

    attention.fc1.weight (hidden, C_in, 1[, 1[, 1]])  <-> attention_hidden_kernel (C_in, hidden)
    attention.fc2.weight (k, hidden, 1[, 1[, 1]])     <-> attention_kernel (hidden, k)
    attention.fc2.bias (k,)                           <-> attention_bias (k,)
    weight (k, F, C_in // G, *K)                      <-> kernel (k, *K, C_in // G, F)
    bias (k, F)                                       <-> bias (k, F)

with ``hidden = int(C_in * ratio) + 1``. (That code uses ``hidden = k`` when C_in is 3: pick ``ratio``
so that ``int(3 * ratio) + 1 == k`` to load such a layer.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jdynconv import _kernel_mix
from jdynconv import linen as jdc_linen
from jdynconv import nnx as jdc_nnx
from jdynconv.interop._convert import Converter, FlaxShapes, TorchShapes, register
from jdynconv.interop._from_torch import (
    TorchModule,
    TorchPort,
    fitting_ratio,
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
    Permutation,
    Rule,
    ShapeSpec,
    Target,
    check_sizes,
    format_shape,
    linear_rules,
)

BANK_LAYOUT = Permutation((0, 1))
"""A bias bank ``(k, F)``: the same in both frameworks."""


def _concrete(spec: ShapeSpec, size: int) -> tuple[int, ...]:
    """``spec`` as ints for a reshape of ``size`` elements: its one unknown (:class:`Dim`) becomes -1."""
    unknown = [d for d in spec if isinstance(d, Dim)]
    if len(unknown) > 1:
        raise ValueError(f"Cannot reshape {size} values to {format_shape(spec)}: more than one unknown size.")
    return tuple(-1 if isinstance(d, Dim) else int(d) for d in spec)


@dataclasses.dataclass(frozen=True)
class ReshapedPermutation(Permutation):
    """A layout through a reshape: PyTorch ``torch_shape`` viewed as ``view`` (same values, C order), whose
    axes map to Flax's by ``axes``: ``flax = np.transpose(torch.reshape(view), axes)``.

    For timm's flattened expert bank (``view`` = ``(k, F, C_in // G, *K)``) and for 1x1 convs that are
    dense layers in Flax (``torch_shape`` = ``(out, in, 1, 1)``, ``view`` = ``(out, in)``).
    """

    view: ShapeSpec = ()
    torch_shape: ShapeSpec = ()

    def to_flax(self, array: np.ndarray) -> np.ndarray:
        return super().to_flax(array.reshape(_concrete(self.view, array.size)))

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        return super().to_torch(array).reshape(_concrete(self.torch_shape, array.size))

    def flax_shape(self, torch_shape: Sequence[DimLike]) -> ShapeSpec:
        del torch_shape  # the rule's, which is ``self.torch_shape``: the Flax shape follows from the view
        return super().flax_shape(self.view)


def _product(dims: Sequence[DimLike]) -> DimLike:
    """The product of sizes; a :class:`Dim` (a multiple of the known factors, e.g. ``8*C_in//G*3*3``) if
    any is unknown."""
    known = math.prod(int(d) for d in dims if not isinstance(d, Dim))
    if any(isinstance(d, Dim) for d in dims):
        return Dim("*".join(repr(d) if isinstance(d, Dim) else str(d) for d in dims), multiple_of=known)
    return known


def _bank_layout(num_spatial: int) -> tuple[int, ...]:
    """``(k, F, I, *K)`` -> ``(k, *K, I, F)``."""
    return (0, *range(3, 3 + num_spatial), 2, 1)


def _dense_1x1_rule(torch_key: str, features: DimLike, in_features: DimLike, num_spatial: int, target: Target) -> Rule:
    """A bias-free part of a 1x1 ``nn.Conv{N}d`` used as a dense layer: ``(out, in, 1...)`` <-> ``(in, out)``."""
    torch_shape = (features, in_features, *(1,) * num_spatial)
    layout = ReshapedPermutation(LINEAR_LAYOUT.axes, view=(features, in_features), torch_shape=torch_shape)
    return Rule(torch_key, torch_shape, target, layout)


def cond_conv_rules(
    *,
    num_experts: int,
    features: int,
    in_features: DimLike,
    in_features_per_group: DimLike,
    kernel_size: Sequence[DimLike],
    use_bias: bool,
    torch_prefix: str = "",
    routing_prefix: str | None = None,
    use_routing: bool = True,
) -> list[Rule]:
    """The rules of one CondConv whose PyTorch twin is timm's ``CondConv2d`` plus ``routing_fn``.

    Args:
      num_experts: the module's k.
      features: the module's F.
      in_features: C_in (the routing Linear's inputs).
      in_features_per_group: ``C_in // G``.
      kernel_size: one size per spatial dim.
      use_bias: the module's ``use_bias``.
      torch_prefix: the PyTorch module's path in a bigger model, e.g. ``"block1."``.
      routing_prefix: the routing ``nn.Linear``'s path, ``f"{torch_prefix}routing_fn"`` by default (in
        timm's ``CondConvResidual`` one ``routing_fn`` next to the ``CondConv2d`` layers routes them all).
      use_routing: the module's ``use_routing``; without it there is no ``routing_fn`` (timm's ``CondConv2d``
        alone).

    Returns:
      Rules for ``weight (k, F * C_in // G * prod(K))``, ``bias (k, F)``, and with ``use_routing``
      ``routing_fn.weight (k, C_in)`` and ``routing_fn.bias (k,)``.
    """
    check_sizes(
        num_experts=num_experts,
        features=features,
        in_features=in_features,
        in_features_per_group=in_features_per_group,
        kernel_size=kernel_size,
    )
    view = (num_experts, features, in_features_per_group, *kernel_size)
    torch_shape = (num_experts, _product(view[1:]))
    layout = ReshapedPermutation(_bank_layout(len(kernel_size)), view=view, torch_shape=torch_shape)
    rules = [Rule(f"{torch_prefix}weight", torch_shape, Target(("params", "kernel")), layout)]
    if use_bias:
        rules.append(Rule(f"{torch_prefix}bias", (num_experts, features), Target(("params", "bias")), BANK_LAYOUT))
    if not use_routing:
        return rules
    routing = f"{torch_prefix}routing_fn" if routing_prefix is None else routing_prefix
    return rules + linear_rules(
        routing,
        kernel=Target(("params", "routing_kernel")),
        bias=Target(("params", "routing_bias")),
        in_features=in_features,
        features=num_experts,
    )


def dynamic_conv_rules(
    *,
    num_experts: int,
    features: int,
    in_features: DimLike,
    in_features_per_group: DimLike,
    hidden_features: DimLike,
    kernel_size: Sequence[DimLike],
    use_bias: bool,
    torch_prefix: str = "",
) -> list[Rule]:
    """The rules of one DynamicConv whose PyTorch twin has the Dynamic Convolution layout.

    Args:
      num_experts: the module's k.
      features: the module's F.
      in_features: C_in.
      in_features_per_group: ``C_in // G``.
      hidden_features: the attention's hidden width, ``int(C_in * ratio) + 1``.
      kernel_size: one size per spatial dim (also the number of trailing 1s of the attention's 1x1 convs).
      use_bias: the module's ``use_bias``.
      torch_prefix: the PyTorch module's path in a bigger model, e.g. ``"block1."``.

    Returns:
      Rules for ``attention.fc1.weight (hidden, C_in, 1...)``, ``attention.fc2.weight (k, hidden, 1...)``,
      ``attention.fc2.bias (k,)``, ``weight (k, F, C_in // G, *K)`` and ``bias (k, F)``.
    """
    check_sizes(
        num_experts=num_experts,
        features=features,
        in_features=in_features,
        in_features_per_group=in_features_per_group,
        hidden_features=hidden_features,
        kernel_size=kernel_size,
    )
    num_spatial = len(kernel_size)
    rules = [
        _dense_1x1_rule(
            f"{torch_prefix}attention.fc1.weight",
            hidden_features,
            in_features,
            num_spatial,
            Target(("params", "attention_hidden_kernel")),
        ),
        _dense_1x1_rule(
            f"{torch_prefix}attention.fc2.weight",
            num_experts,
            hidden_features,
            num_spatial,
            Target(("params", "attention_kernel")),
        ),
        Rule(f"{torch_prefix}attention.fc2.bias", (num_experts,), Target(("params", "attention_bias")), VECTOR_LAYOUT),
        Rule(
            f"{torch_prefix}weight",
            (num_experts, features, in_features_per_group, *kernel_size),
            Target(("params", "kernel")),
            Permutation(_bank_layout(num_spatial)),
        ),
    ]
    if use_bias:
        rules.append(Rule(f"{torch_prefix}bias", (num_experts, features), Target(("params", "bias")), BANK_LAYOUT))
    return rules


# --- linen: shapes the module does not know come from the other side ------------------------------

LinenKernelMix = jdc_linen.CondConv | jdc_linen.DynamicConv


def _check_config(module: LinenKernelMix) -> None:
    _kernel_mix.check_layer(module.features, module.num_experts, module.feature_group_count)


def _kernel_size(module: LinenKernelMix, rank: int | None) -> tuple[DimLike, ...]:
    if not isinstance(module.kernel_size, int):
        return tuple(module.kernel_size)
    if rank:
        return (module.kernel_size,) * rank
    return (Dim(f"{module.kernel_size} per spatial dim"),)


def _in_features(module: LinenKernelMix, in_features_per_group: int | None) -> tuple[DimLike, DimLike]:
    """``(C_in, C_in // G)``, from ``C_in // G`` when known."""
    if in_features_per_group:
        return in_features_per_group * module.feature_group_count, in_features_per_group
    groups = module.feature_group_count
    return Dim(f"C_in (a multiple of {groups})", multiple_of=groups), Dim("C_in//G")


def _linen_cond_conv_rules(
    module: jdc_linen.CondConv, in_features_per_group: int | None, rank: int | None
) -> list[Rule]:
    in_features, per_group = _in_features(module, in_features_per_group)
    return cond_conv_rules(
        num_experts=module.num_experts,
        features=module.features,
        in_features=in_features,
        in_features_per_group=per_group,
        kernel_size=_kernel_size(module, rank),
        use_bias=module.use_bias,
        use_routing=module.use_routing,
    )


def _cond_conv_torch_rules(module: jdc_linen.CondConv, shapes: TorchShapes) -> list[Rule]:
    """C_in from ``routing_fn.weight (k, C_in)``; the rank from the module or the flattened ``weight``.

    Without ``routing_fn.weight`` (reported missing), C_in // G comes from ``weight`` alone.
    """
    _check_config(module)
    groups, features = module.feature_group_count, module.features
    routing = shapes.get("routing_fn.weight")
    weight = shapes.get("weight")
    per_expert = weight[1] if weight is not None and len(weight) == 2 else None
    per_group = routing[1] // groups if routing is not None and len(routing) == 2 and routing[1] % groups == 0 else None
    if isinstance(module.kernel_size, int):
        rank = 2  # CondConv2d's; also when the number of taps fits several ranks (K = 1)
        fits = per_expert and per_group and per_expert % (features * per_group) == 0
        taps = per_expert // (features * per_group) if fits else None
        if module.kernel_size > 1 and taps is not None:
            rank = next((r for r in (1, 2, 3) if module.kernel_size**r == taps), rank)
        taps = module.kernel_size**rank
    else:
        rank, taps = len(module.kernel_size), math.prod(module.kernel_size)
    if per_group is None and per_expert and taps and per_expert % (features * taps) == 0:
        per_group = per_expert // (features * taps)
    return _linen_cond_conv_rules(module, per_group, rank)


def _cond_conv_flax_rules(module: jdc_linen.CondConv, shapes: FlaxShapes) -> list[Rule]:
    """C_in // G and the rank from the kernel bank ``(k, *K, C_in // G, F)``."""
    _check_config(module)
    shape = shapes.get(("params", "kernel"))
    if shape is not None and len(shape) >= 4:
        return _linen_cond_conv_rules(module, shape[-2], len(shape) - 3)
    return _linen_cond_conv_rules(module, None, None)


def _linen_dynamic_conv_rules(
    module: jdc_linen.DynamicConv, in_features_per_group: int | None, rank: int | None
) -> list[Rule]:
    in_features, per_group = _in_features(module, in_features_per_group)
    hidden: DimLike = (
        _kernel_mix.hidden_width(in_features, module.ratio)
        if isinstance(in_features, int)
        else Dim(f"int(C_in*{module.ratio})+1")
    )
    return dynamic_conv_rules(
        num_experts=module.num_experts,
        features=module.features,
        in_features=in_features,
        in_features_per_group=per_group,
        hidden_features=hidden,
        kernel_size=_kernel_size(module, rank),
        use_bias=module.use_bias,
    )


def _dynamic_conv_torch_rules(module: jdc_linen.DynamicConv, shapes: TorchShapes) -> list[Rule]:
    """C_in // G and the rank from ``weight (k, F, C_in // G, *K)``, else from ``attention.fc1.weight``."""
    _check_config(module)
    weight = shapes.get("weight")
    if weight is not None and len(weight) >= 4:
        return _linen_dynamic_conv_rules(module, weight[2], len(weight) - 3)
    fc1 = shapes.get("attention.fc1.weight")
    groups = module.feature_group_count
    if fc1 is not None and len(fc1) >= 3 and fc1[1] % groups == 0:
        return _linen_dynamic_conv_rules(module, fc1[1] // groups, len(fc1) - 2)
    return _linen_dynamic_conv_rules(module, None, None)


def _dynamic_conv_flax_rules(module: jdc_linen.DynamicConv, shapes: FlaxShapes) -> list[Rule]:
    """C_in // G and the rank from the kernel bank; the hidden width from the module's ``ratio``."""
    _check_config(module)
    shape = shapes.get(("params", "kernel"))
    if shape is not None and len(shape) >= 4:
        return _linen_dynamic_conv_rules(module, shape[-2], len(shape) - 3)
    return _linen_dynamic_conv_rules(module, None, None)


# --- NNX: the model knows every shape --------------------------------------------------------------


def _nnx_cond_conv_rules(model: jdc_nnx.CondConv, shapes: FlaxShapes) -> list[Rule]:
    config = model.config
    return cond_conv_rules(
        num_experts=config.num_experts,
        features=config.features,
        in_features=model.in_features,
        in_features_per_group=model.in_features // config.feature_group_count,
        kernel_size=tuple(config.kernel_size),
        use_bias=("params", "bias") in shapes,
        use_routing=model.use_routing,
    )


def _nnx_dynamic_conv_rules(model: jdc_nnx.DynamicConv, shapes: FlaxShapes) -> list[Rule]:
    config = model.config
    return dynamic_conv_rules(
        num_experts=config.num_experts,
        features=config.features,
        in_features=model.in_features,
        in_features_per_group=model.in_features // config.feature_group_count,
        hidden_features=shapes[("params", "attention_hidden_kernel")][1],
        kernel_size=tuple(config.kernel_size),
        use_bias=("params", "bias") in shapes,
    )


register(jdc_linen.CondConv, Converter(flax_rules=_cond_conv_flax_rules, torch_rules=_cond_conv_torch_rules))
register(jdc_nnx.CondConv, Converter(flax_rules=_nnx_cond_conv_rules))
register(jdc_linen.DynamicConv, Converter(flax_rules=_dynamic_conv_flax_rules, torch_rules=_dynamic_conv_torch_rules))
register(jdc_nnx.DynamicConv, Converter(flax_rules=_nnx_dynamic_conv_rules))


# --- from_torch: timm's CondConv2d and the Dynamic Convolution layers ------------------------------------


def _cond_conv_port(module: TorchModule) -> TorchPort:
    """timm's ``CondConv2d`` (and subclasses, e.g. with a ``routing_fn``): every setting from its attributes.

    timm's ``padding=""`` default and integer paddings are symmetric ints (explicit pads here); its ``"same"``
    that needs run-time padding (``dynamic_padding``) is TensorFlow's SAME, which is JAX's ``"SAME"``. The routing
    is ``routing_fn`` (an ``nn.Linear(C_in, k)``, as timm's ``CondConvResidual``) when the module has one:
    CondConv then computes ``sigmoid(routing_fn(mean of x))``, as timm's block. ``CondConv2d`` alone takes its
    routing weights as a call argument; the port then has no routing (``use_routing=False``) and must be
    called with ``routing_weights`` ``(B, k)``, as the PyTorch layer is.
    """
    require(
        module,
        "timm's CondConv2d",
        "weight",
        "bias",
        "num_experts",
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
    )
    kernel_size = tuple(int(k) for k in module.kernel_size)
    rank = len(kernel_size)
    dilation = ints(module.dilation, rank, "dilation")
    dynamic = bool(getattr(module, "dynamic_padding", False))
    padding: Any = "SAME" if dynamic else torch_padding(module.padding, kernel_size, dilation)
    state_dict = state_dict_of(module)
    k, in_channels = int(module.num_experts), int(module.in_channels)
    attributes = {
        "features": int(module.out_channels),
        "kernel_size": kernel_size,
        "num_experts": k,
        "strides": ints(module.stride, rank, "stride"),
        "padding": padding,
        "kernel_dilation": dilation,
        "feature_group_count": int(module.groups),
        "use_bias": module.bias is not None,
        # timm's CondConv2d alone takes its routing weights per call; with a routing_fn, CondConv routes itself.
        "use_routing": getattr(module, "routing_fn", None) is not None,
    }
    return TorchPort(jdc_linen.CondConv, jdc_nnx.CondConv, attributes, {"in_features": in_channels}, state_dict)


def _dynamic_conv_port(module: TorchModule) -> TorchPort:
    """The Dynamic Convolution layout (kaijieshi7's ``Dynamic_conv{1,2,3}d``): weight ``(k, F, C_in // G, *K)``,
    attention ``fc1`` (no bias), ``fc2`` (bias) and its stored ``temperature``; the hidden width's ratio is not
    stored, so ``ratio`` is one that gives ``attention.fc1``'s width (0.25 when that fits)."""
    require(
        module,
        "a Dynamic Convolution layer",
        "weight",
        "bias",
        "stride",
        "padding",
        "dilation",
        "groups",
        "attention.fc1.weight",
        "attention.fc2.weight",
        "attention.temperature",
    )
    num_experts, features, per_group, *kernel_size = (int(d) for d in module.weight.shape)
    rank = len(kernel_size)
    groups = int(module.groups)
    in_channels = per_group * groups
    hidden = int(module.attention.fc1.weight.shape[0])
    if getattr(module.attention.fc1, "bias", None) is not None or getattr(module.attention.fc2, "bias", None) is None:
        raise ValueError("the attention's fc1 must have no bias and fc2 a bias, as the Dynamic Convolution code's.")
    dilation = ints(module.dilation, rank, "dilation")
    attributes = {
        "features": features,
        "kernel_size": tuple(kernel_size),
        "num_experts": num_experts,
        "ratio": fitting_ratio(hidden, in_channels, 0.25, _kernel_mix.hidden_width),
        "strides": ints(module.stride, rank, "stride"),
        "padding": torch_padding(module.padding, kernel_size, dilation, getattr(module, "padding_mode", "zeros")),
        "kernel_dilation": dilation,
        "feature_group_count": groups,
        "use_bias": module.bias is not None,
        "temperature": float(module.attention.temperature),
    }
    return TorchPort(
        jdc_linen.DynamicConv,
        jdc_nnx.DynamicConv,
        attributes,
        {"in_features": in_channels},
        state_dict_of(module),
    )


register_torch_layer("CondConv2d", _cond_conv_port)
for _name in ("Dynamic_conv1d", "Dynamic_conv2d", "Dynamic_conv3d", "DynamicConvNd"):
    register_torch_layer(_name, _dynamic_conv_port)
