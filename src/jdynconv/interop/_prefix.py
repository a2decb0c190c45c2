"""A layer's rules in a bigger model, and arrays named back in PyTorch's terms.

:func:`rules_for` gives the registered rules of one jdynconv layer (keys relative to the layer, targets its own
variables); :func:`under` moves them to the layer's place in a model, PyTorch prefix and Flax path; the lists of
a whole model's layers, concatenated, go to :func:`~jdynconv.interop.flax_from_torch` /
:func:`~jdynconv.interop.torch_from_flax`. :func:`torch_names` names a params-shaped tree (gradients, optimizer
moments) by the PyTorch keys, in PyTorch's layouts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import numpy as np
from flax import nnx

from jdynconv.interop._convert import _LINEN, _NNX, _converter, _nnx_variables
from jdynconv.interop._rules import Rule, Target, to_numpy, torch_from_flax, tree_shapes


def under(torch_prefix: str, flax_path: str | Sequence[str | int], rules: Sequence[Rule]) -> list[Rule]:
    """``rules`` re-rooted: PyTorch keys under ``torch_prefix``, Flax targets under the submodule ``flax_path``.

    Args:
      torch_prefix: the layer's path in the PyTorch model, without the trailing dot (``"layer1.0.conv"``); ``""``
        leaves the keys as they are.
      flax_path: the layer's path in the Flax model: a submodule name (``"conv"``) or a sequence of names (and, for
        NNX lists, ints): ``("layer1", "conv")``. ``()`` leaves the targets as they are.
      rules: the layer's rules, e.g. from :func:`rules_for`, keys relative to the layer.

    Returns:
      New rules: ``weight`` -> ``f"{torch_prefix}.weight"``; target ``("params", "kernel")`` -> ``("params",
      *flax_path, "kernel")`` (collection first, as Flax variables nest); PyTorch-only keys
      (``num_batches_tracked``) keep no target.
    """
    if not isinstance(torch_prefix, str):
        raise TypeError(f"`torch_prefix` must be a str (the layer's path in the PyTorch model), got {torch_prefix!r}.")
    if torch_prefix.startswith(".") or torch_prefix.endswith("."):
        raise ValueError(f"`torch_prefix` must not start or end with a dot (under adds it), got {torch_prefix!r}.")
    if isinstance(rules, str) or not isinstance(rules, Sequence) or not all(isinstance(r, Rule) for r in rules):
        raise TypeError(f"`rules` must be a sequence of Rule (e.g. from rules_for), got {rules!r}.")
    path = (flax_path,) if isinstance(flax_path, str) else tuple(flax_path)
    prefix = f"{torch_prefix}." if torch_prefix else ""

    def move(rule: Rule) -> Rule:
        target = rule.target
        if target is not None:
            collection, *rest = target.key
            target = Target((collection, *path, *rest), target.index)
        return dataclasses.replace(rule, torch_key=prefix + rule.torch_key, target=target)

    return [move(rule) for rule in rules]


def rules_for(
    module: nn.Module | nnx.Module,
    variables: Mapping[str, Any] | None = None,
    *,
    state_dict: Mapping[str, Any] | None = None,
) -> list[Rule]:
    """The registered rules of one layer: its PyTorch keys (relative to the layer) and their Flax targets.

    An NNX model knows its shapes. A linen module does not (it has no variables before ``init``): pass its
    ``variables`` (or their shapes, ``jax.eval_shape`` of ``init``), or the layer's own ``state_dict``.

    Args:
      module: a registered linen module or NNX model (a jdynconv layer, or one registered with
        :func:`~jdynconv.interop.register`).
      variables: linen: the layer's variables, ``{"params": ..., "batch_stats": ...}`` (arrays or anything with a
        ``shape``).
      state_dict: linen: the layer's PyTorch state dict (keys relative to the layer).

    Returns:
      The rules, one per PyTorch key, targets relative to the layer's variables.
    """
    if isinstance(module, nnx.Module):
        converter = _converter(module, _NNX, "nnx", "a linen module")
        shapes = {key: tuple(variable.shape) for key, variable in _nnx_variables(module).items()}
        return converter.flax_rules(module, shapes)
    converter = _converter(module, _LINEN, "linen", "an NNX model")
    if variables is not None and state_dict is not None:
        raise TypeError("`state_dict` must not be given with `variables`: a linen module's rules need one of them.")
    if variables is None and state_dict is None:
        raise TypeError("`variables` (or `state_dict`) is required for a linen module, which has no shapes of its own.")
    if variables is not None:
        return converter.flax_rules(module, tree_shapes(variables))
    assert converter.torch_rules is not None  # register() guarantees it for linen modules
    return converter.torch_rules(module, {key: tuple(np.shape(to_numpy(value))) for key, value in state_dict.items()})


def torch_names(
    module: nn.Module | nnx.Module | Sequence[Rule],
    tree: Any,
    *,
    variables: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """A params-shaped tree (gradients, optimizer moments, updates) named by PyTorch keys, in PyTorch's layouts.

    Keys with no ``params`` counterpart (BatchNorm running statistics, ``num_batches_tracked``, buffers) are
    left out, so the result has the keys of the PyTorch model's ``named_parameters()`` that jdynconv holds.

    Args:
      module: a registered linen module or NNX model, or the rules of a whole model (e.g. concatenated
        :func:`under` lists).
      tree: the ``params`` collection's tree (linen: what ``jax.grad`` with respect to ``variables["params"]``
        returns; an optax moment such as Adam's ``mu``), or for NNX the state ``nnx.grad`` returns.
      variables: linen only: the layer's variables, when its rules need more shapes than ``tree`` has (never for
        jdynconv's layers).

    Returns:
      PyTorch key -> NumPy array in PyTorch's layout (e.g. a conv kernel gradient as ``(O, I // G, *K)``).

    Raises:
      StateDictError: ``tree`` has a variable the rules do not know, or lacks one they name.
    """
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    if not isinstance(tree, Mapping):
        raise TypeError(
            f"`tree` must be a params-shaped mapping (e.g. the gradients w.r.t. variables['params']), got {tree!r}."
        )
    if isinstance(module, nn.Module | nnx.Module):
        rules = (
            rules_for(module) if isinstance(module, nnx.Module) else rules_for(module, variables or {"params": tree})
        )
    else:
        rules = list(module)
    params_rules = [rule for rule in rules if rule.target is not None and rule.target.key[0] == "params"]
    return torch_from_flax(params_rules, {"params": tree}, what="params-shaped tree")
