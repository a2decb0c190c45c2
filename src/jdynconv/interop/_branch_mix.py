"""BranchMixConv <-> the seed's PyTorch model.

The PyTorch names are those of the seed's model as written::

    self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, k), nn.LeakyReLU())
    self.convs = nn.ModuleList(
        [nn.Sequential(nn.Conv2d(C, F, K, padding=p), nn.BatchNorm2d(F), nn.LeakyReLU()) for _ in range(k)]
    )

``mlp.1.{weight,bias}`` -> ``gate_kernel``, ``gate_bias``; ``convs.{n}.0.{weight,bias}`` -> slot n of
``kernel``, ``bias``; ``convs.{n}.1.{weight,bias,running_mean,running_var}`` -> slot n of ``scale``,
``offset``, ``mean``, ``var``; ``convs.{n}.1.num_batches_tracked`` has no counterpart.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jdynconv import _branch_mix, _gates
from jdynconv import linen as jdc_linen
from jdynconv import nnx as jdc_nnx
from jdynconv.interop._convert import Converter, FlaxShapes, TorchShapes, register
from jdynconv.interop._from_torch import (
    TorchModule,
    TorchPort,
    batch_norm_settings,
    class_name,
    ints,
    register_torch_layer,
    require,
    spatial_shape,
    state_dict_of,
    torch_padding,
)
from jdynconv.interop._rules import Dim, DimLike, Rule, Target, batchnorm_rules, check_sizes, conv_rules, linear_rules


def branch_mix_rules(
    *,
    num_branches: int,
    features: int,
    in_features_per_group: DimLike,
    kernel_size: Sequence[DimLike],
    gate_features: DimLike,
    use_bias: bool,
    torch_prefix: str = "",
) -> list[Rule]:
    """The rules of one BranchMixConv whose PyTorch twin is the seed's model.

    Args:
      num_branches: the module's k.
      features: the module's F.
      in_features_per_group: ``C_in // feature_group_count``.
      kernel_size: one size per spatial dim.
      gate_features: D, the gate Dense's inputs (``C_in * prod(spatial)`` flattened channel-major, as
        ``nn.Flatten`` does, or ``C_in`` for ``gate_input="mean"``).
      use_bias: the module's ``use_bias``.
      torch_prefix: the PyTorch module's path in a bigger model, e.g. ``"block1."``.

    Returns:
      Rules for ``mlp.1.weight (k, D)``, ``mlp.1.bias (k,)``, ``convs.{n}.0.weight (F, C_in // G, *K)``,
      ``convs.{n}.0.bias (F,)`` and ``convs.{n}.1.*`` ``(F,)``.
    """
    check_sizes(
        num_branches=num_branches,
        features=features,
        in_features_per_group=in_features_per_group,
        kernel_size=kernel_size,
        gate_features=gate_features,
    )
    rules = linear_rules(
        f"{torch_prefix}mlp.1",
        kernel=Target(("params", "gate_kernel")),
        bias=Target(("params", "gate_bias")),
        in_features=gate_features,
        features=num_branches,
    )
    for n in range(num_branches):
        rules += conv_rules(
            f"{torch_prefix}convs.{n}.0",
            kernel=Target(("params", "kernel"), n),
            bias=Target(("params", "bias"), n) if use_bias else None,
            features=features,
            in_features_per_group=in_features_per_group,
            kernel_size=kernel_size,
        )
        rules += batchnorm_rules(
            f"{torch_prefix}convs.{n}.1",
            scale=Target(("params", "scale"), n),
            offset=Target(("params", "offset"), n),
            mean=Target(("batch_stats", "mean"), n),
            var=Target(("batch_stats", "var"), n),
            features=features,
        )
    return rules


def _check_config(module: jdc_linen.BranchMixConv) -> None:
    _branch_mix.check_config(
        module.features, module.num_branches, module.feature_group_count, module.gate_input, module.gate_activation
    )


def _linen_rules(module: jdc_linen.BranchMixConv, in_features_per_group: int | None, rank: int | None) -> list[Rule]:
    """Rules from the module's attributes; C_in // G and the rank from the data when the module lacks them.

    A linen module does not know C_in nor (for an int ``kernel_size``) the number of spatial dims, nor
    the flatten gate's input size; those come from the other side's shapes and are checked for
    consistency by the rules (every branch must agree with the first).
    """
    groups = module.feature_group_count
    if isinstance(module.kernel_size, int):
        kernel_size: tuple[DimLike, ...] = (
            (module.kernel_size,) * rank if rank else (Dim(f"{module.kernel_size} per spatial dim"),)
        )
    else:
        kernel_size = tuple(module.kernel_size)
    in_channels: DimLike = in_features_per_group * groups if in_features_per_group else Dim("C_in")
    if module.gate_input == "mean":
        gate_features: DimLike = in_channels
    else:
        multiple = in_channels if isinstance(in_channels, int) else 1
        gate_features = Dim(f"{in_channels}*prod(spatial)", multiple_of=multiple)
    return branch_mix_rules(
        num_branches=module.num_branches,
        features=module.features,
        in_features_per_group=in_features_per_group or Dim("C_in//G"),
        kernel_size=kernel_size,
        gate_features=gate_features,
        use_bias=module.use_bias,
    )


def _linen_torch_rules(module: jdc_linen.BranchMixConv, shapes: TorchShapes) -> list[Rule]:
    """C_in // G and the rank from the first branch conv weight ``(F, C_in // G, *K)`` in the state dict."""
    _check_config(module)
    for n in range(module.num_branches):
        shape = shapes.get(f"convs.{n}.0.weight")
        if shape is not None and len(shape) >= 3:
            return _linen_rules(module, shape[1], len(shape) - 2)
    return _linen_rules(module, None, None)


def _linen_flax_rules(module: jdc_linen.BranchMixConv, shapes: FlaxShapes) -> list[Rule]:
    """C_in // G and the rank from the kernel bank ``(k, *K, C_in // G, F)`` in the variables."""
    _check_config(module)
    shape = shapes.get(("params", "kernel"))
    if shape is not None and len(shape) >= 4:
        return _linen_rules(module, shape[-2], len(shape) - 3)
    return _linen_rules(module, None, None)


def _nnx_flax_rules(model: jdc_nnx.BranchMixConv, shapes: FlaxShapes) -> list[Rule]:
    """An NNX model knows every shape: C_in from ``in_features``, K and D from its current variables."""
    config = model.config
    return branch_mix_rules(
        num_branches=config.num_branches,
        features=config.features,
        in_features_per_group=model.in_features // config.feature_group_count,
        kernel_size=tuple(shapes[("params", "kernel")][1:-2]),
        gate_features=shapes[("params", "gate_kernel")][0],
        use_bias=("params", "bias") in shapes,
    )


register(jdc_linen.BranchMixConv, Converter(flax_rules=_linen_flax_rules, torch_rules=_linen_torch_rules))
register(jdc_nnx.BranchMixConv, Converter(flax_rules=_nnx_flax_rules))


# --- from_torch: the seed's PyTorch block -> BranchMixConv -----------------------------------------------


def identity(x: jax.Array) -> jax.Array:
    """No activation (``nn.Identity``, or none in the ``Sequential``)."""
    return x


@functools.cache
def _leaky_relu(slope: float) -> Callable[[jax.Array], jax.Array]:
    """One function per slope, so that branches with equal slopes have equal activations."""
    return _gates.leaky_relu if slope == 0.01 else functools.partial(jax.nn.leaky_relu, negative_slope=slope)


def _activation(module: TorchModule | None, where: str) -> Callable[[jax.Array], jax.Array]:
    """A PyTorch activation module as a JAX function (hashable, so it can be a linen attribute)."""
    name = None if module is None else class_name(module)
    if name is None or name == "Identity":
        return identity
    if name == "LeakyReLU":
        return _leaky_relu(float(module.negative_slope))
    if name == "ReLU":
        return jax.nn.relu
    if name == "Sigmoid":
        return jax.nn.sigmoid
    if name == "Tanh":
        return jax.nn.tanh
    raise ValueError(f"{where}: the activation {name} has no jdynconv counterpart (LeakyReLU, ReLU, Sigmoid, Tanh).")


def _gate_activation(module: TorchModule | None, where: str) -> Any:
    """The gate's activation: BranchMixConv's named gates where one fits, else a function."""
    name = None if module is None else class_name(module)
    if name is None or name == "Identity":
        return "identity"
    if name == "LeakyReLU" and float(module.negative_slope) == 0.01:
        return "leaky_relu"
    if name == "Sigmoid":
        return "sigmoid"
    if name == "Softmax":
        if module.dim not in (1, -1):
            raise ValueError(f"{where}: the gate's Softmax must be over dim 1 (the branches), got dim={module.dim}.")
        return "softmax"
    return _activation(module, where)


def _split_sequential(block: TorchModule, kinds: tuple[str, ...], where: str) -> list[TorchModule]:
    """The layers of a ``Sequential``, checked to start with the class names ``kinds`` (a prefix each)."""
    layers = list(block)
    for layer, kind in zip(layers, kinds, strict=False):
        if not class_name(layer).startswith(kind):
            raise TypeError(f"{where} must be Sequential({', '.join(kinds)}, ...), found {class_name(layer)}.")
    if len(layers) < len(kinds):
        raise TypeError(f"{where} must hold {', '.join(kinds)}, got {[class_name(layer) for layer in layers]}.")
    return layers


def _gate(mlp: TorchModule) -> tuple[TorchModule, Any]:
    """``Sequential(Flatten, Linear[, activation])`` -> (the Linear, the gate activation)."""
    layers = list(mlp)
    names = [class_name(layer) for layer in layers]
    if names[:2] != ["Flatten", "Linear"] or len(layers) > 3:
        raise TypeError(f"mlp must be Sequential(Flatten, Linear[, activation]), got {names}.")
    if (layers[0].start_dim, layers[0].end_dim) != (1, -1):
        raise ValueError(f"mlp's Flatten must flatten dims 1..-1, got {layers[0].start_dim}..{layers[0].end_dim}.")
    return layers[1], _gate_activation(layers[2] if len(layers) == 3 else None, "mlp")


def _seed_port(module: TorchModule) -> TorchPort:
    """The seed's block: ``mlp = Sequential(Flatten, Linear, LeakyReLU)``, ``convs = ModuleList(Sequential(ConvNd,
    BatchNormNd, LeakyReLU))``; every branch must share its configuration (it is one BranchMixConv)."""
    require(module, "the seed's BranchMixConv block (SeedModel)", "mlp", "convs")
    linear, gate_activation = _gate(module.mlp)
    settings = []
    for n, branch in enumerate(module.convs):
        where = f"convs.{n}"
        layers = _split_sequential(branch, ("Conv", "BatchNorm"), where)
        conv, norm = layers[0], layers[1]
        if len(layers) > 3:
            raise TypeError(f"{where} must be Sequential(ConvNd, BatchNormNd[, activation]), got {len(layers)} layers.")
        rank = len(conv.kernel_size)
        kernel_size = ints(conv.kernel_size, rank, "kernel_size")
        dilation = ints(conv.dilation, rank, "dilation")
        settings.append(
            {
                "features": int(conv.out_channels),
                "kernel_size": kernel_size,
                "strides": ints(conv.stride, rank, "stride"),
                "padding": torch_padding(conv.padding, kernel_size, dilation, conv.padding_mode),
                "kernel_dilation": dilation,
                "feature_group_count": int(conv.groups),
                "use_bias": conv.bias is not None,
                **batch_norm_settings(norm, where),
                "branch_activation": _activation(layers[2] if len(layers) == 3 else None, where),
            }
        )
    if not settings:
        raise ValueError("convs is empty: a BranchMixConv needs at least one branch.")
    differ = sorted(key for config in settings[1:] for key in config if config[key] != settings[0][key])
    if differ:
        raise ValueError(f"the branches differ in {sorted(set(differ))}: a BranchMixConv's branches share one setting.")
    in_channels = int(module.convs[0][0].in_channels)
    rank = len(settings[0]["kernel_size"])
    gate_size = int(linear.in_features)
    if gate_size % in_channels:
        raise ValueError(f"mlp's Linear takes {gate_size} inputs, not a multiple of C_in = {in_channels}.")
    # NNX creates the gate before it sees an input, from a spatial shape with H * W elements. The torch module
    # does not record (H, W), and only the product matters to the layer: a square shape when there is one.
    nnx_attributes = {"in_features": in_channels, "input_shape": spatial_shape(gate_size // in_channels, rank)}
    attributes = {**settings[0], "num_branches": len(settings), "gate_activation": gate_activation}
    if linear.bias is None:
        raise ValueError("mlp's Linear has no bias; BranchMixConv's gate always has one.")
    return TorchPort(jdc_linen.BranchMixConv, jdc_nnx.BranchMixConv, attributes, nnx_attributes, state_dict_of(module))


register_torch_layer("SeedModel", _seed_port)
register_torch_layer("BranchMixConv", _seed_port)
