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

from collections.abc import Sequence

from jdynconv import _branch_mix
from jdynconv import linen as jdc_linen
from jdynconv import nnx as jdc_nnx
from jdynconv.interop._convert import Converter, FlaxShapes, TorchShapes, register
from jdynconv.interop._rules import Dim, DimLike, Rule, Target, batchnorm_rules, conv_rules, linear_rules


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
      num_branches, features, use_bias: the module's k, F and ``use_bias``.
      in_features_per_group: ``C_in // feature_group_count``.
      kernel_size: one size per spatial dim.
      gate_features: D, the gate Dense's inputs (``C_in * prod(spatial)`` flattened channel-major, as
        ``nn.Flatten`` does, or ``C_in`` for ``gate_input="mean"``).
      torch_prefix: the PyTorch module's path in a bigger model, e.g. ``"block1."``.

    Returns:
      Rules for ``mlp.1.weight (k, D)``, ``mlp.1.bias (k,)``, ``convs.{n}.0.weight (F, C_in // G, *K)``,
      ``convs.{n}.0.bias (F,)`` and ``convs.{n}.1.*`` ``(F,)``.
    """
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
