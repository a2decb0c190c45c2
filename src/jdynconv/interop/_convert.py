"""The four conversions, dispatched on the module's type through a small registry.

A module type registers a :class:`Converter`: functions that list its :class:`~jdynconv.interop.Rule`
objects from the module's attributes plus the shapes at hand (the PyTorch state dict's when loading into
linen, which has no variables before ``init``; the Flax variables' otherwise). jdynconv's layers
register themselves; users register their own modules the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdynconv.interop._rules import (
    FlaxKey,
    Rule,
    check_rules,
    describe,
    flatten_variables,
    flax_from_torch,
    state_dict_arrays,
    torch_from_flax,
    tree_shapes,
    unflatten_variables,
)

TorchShapes = Mapping[str, tuple[int, ...]]
FlaxShapes = Mapping[FlaxKey, tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class Converter:
    """How one module type maps to a PyTorch state dict.

    Attributes:
      flax_rules: ``(module, flax_shapes) -> rules``, from the module's attributes and the shapes of its
        Flax variables (``{("params", "kernel"): shape, ...}``). Used to export, and to load into NNX
        models (whose variables exist already).
      torch_rules: ``(module, torch_shapes) -> rules`` from the module's attributes and the state dict's
        shapes, for loading into a linen module (which has no variables before ``init``). Needed for
        linen modules only.
    """

    flax_rules: Callable[[Any, FlaxShapes], list[Rule]]
    torch_rules: Callable[[Any, TorchShapes], list[Rule]] | None = None

    def __post_init__(self) -> None:
        if not callable(self.flax_rules):
            raise TypeError(
                f"`flax_rules` must be a callable (module, flax_shapes) -> list[Rule], got {describe(self.flax_rules)}."
            )
        if self.torch_rules is not None and not callable(self.torch_rules):
            raise TypeError(
                "`torch_rules` must be None or a callable (module, torch_shapes) -> list[Rule], "
                f"got {describe(self.torch_rules)}."
            )


_LINEN: dict[type, Converter] = {}
_NNX: dict[type, Converter] = {}


def register(module_type: type, converter: Converter) -> None:
    """Makes ``torch_to_linen``/``linen_to_torch`` (or the NNX pair) accept ``module_type`` and subclasses.

    Args:
      module_type: a flax.linen or flax.nnx Module subclass (the class, not an instance).
      converter: its :class:`Converter`; a linen module's needs ``torch_rules``.

    Raises:
      TypeError: ``module_type`` is not a class or not a Module subclass, or ``converter`` is not a
        :class:`Converter` (whose constructor checks that ``flax_rules`` and ``torch_rules`` are callable).
      ValueError: a linen module's Converter has no ``torch_rules``.
    """
    if not isinstance(module_type, type):
        instance = f" (an instance; pass the class {type(module_type).__qualname__} itself)"
        hint = instance if isinstance(module_type, nn.Module | nnx.Module) else ""
        raise TypeError(
            f"`module_type` must be a flax.linen or flax.nnx Module subclass, got {describe(module_type)}{hint}."
        )
    if not isinstance(converter, Converter):
        hint = " (wrap a rules function: Converter(flax_rules=..., torch_rules=...))" if callable(converter) else ""
        raise TypeError(f"`converter` must be a jdynconv.interop.Converter, got {describe(converter)}{hint}.")
    if issubclass(module_type, nn.Module):
        if converter.torch_rules is None:
            raise ValueError(f"A linen module ({module_type.__name__}) needs `torch_rules` in its Converter.")
        _LINEN[module_type] = converter
    elif issubclass(module_type, nnx.Module):
        _NNX[module_type] = converter
    else:
        raise TypeError(f"`module_type` must be a flax.linen or flax.nnx Module subclass, got {module_type!r}.")


def _converter(
    module: Any, registry: dict[type, Converter], api: str, instead: str, argument: str = "module"
) -> Converter:
    for cls in type(module).__mro__:
        if cls in registry:
            return registry[cls]
    known = ", ".join(f"{cls.__module__}.{cls.__qualname__}" for cls in registry) or "none"
    other = "nnx" if api == "linen" else "linen"
    other_base = nnx.Module if api == "linen" else nn.Module
    hint = f" (a flax.{other} module: use {instead})" if isinstance(module, other_base) else ""
    name = f"{type(module).__module__}.{type(module).__qualname__}"
    raise TypeError(
        f"`{argument}` must be a registered flax.{api} module ({known}), got {name}{hint}; "
        "register others with jdynconv.interop.register."
    )


def _linen_dtype(module: nn.Module) -> Callable[[FlaxKey], Any]:
    """Flax's convention: params in ``param_dtype``; BatchNorm statistics always float32."""
    param_dtype = getattr(module, "param_dtype", jnp.float32)
    return lambda key: param_dtype if key[0] == "params" else jnp.float32


def _rules(converter: Converter, field: str, module: Any, shapes: Mapping[Any, tuple[int, ...]]) -> list[Rule]:
    """The registered ``flax_rules``/``torch_rules`` of ``module``'s Converter, checked to be a list of Rule."""
    rules_function = getattr(converter, field)
    source = f"What the `{field}` registered for {type(module).__qualname__} returns"
    return check_rules(rules_function(module, shapes), source)


def torch_to_linen(
    module: nn.Module, state_dict: Mapping[str, Any], *, allow_non_finite: bool = False
) -> dict[str, Any]:
    """PyTorch state dict -> ``variables`` for ``module.apply``; no sample input needed.

    Shapes come from the state dict and are checked against the module's attributes. For
    ``BranchMixConv`` (k branches, F features, C_in // G inputs per group, kernel K, gate inputs D):
    ``mlp.1.weight (k, D)`` -> ``gate_kernel (D, k)``, ``mlp.1.bias (k,)`` -> ``gate_bias``,
    ``convs.{n}.0.weight (F, C_in // G, *K)`` -> ``kernel[n]`` of ``(k, *K, C_in // G, F)``,
    ``convs.{n}.0.bias``, ``convs.{n}.1.{weight, bias}`` ``(F,)`` -> ``bias[n]``, ``scale[n]``,
    ``offset[n]`` of ``(k, F)``; ``convs.{n}.1.{running_mean, running_var}`` -> ``batch_stats`` ``mean[n]``,
    ``var[n]``; ``num_batches_tracked`` is ignored.

    Args:
      module: a registered linen module, e.g. ``jdynconv.linen.BranchMixConv``.
      state_dict: PyTorch key (str) -> NumPy array, JAX array or torch tensor (``load_state_dict``'s output,
        ``torch_model.state_dict()``), any float dtype; cast to the module's ``param_dtype``
        (statistics to float32).
      allow_non_finite: load values holding NaN or Inf. By default they are refused (a diverged or corrupted
        checkpoint); pass True to load such weights on purpose.

    Returns:
      ``{"params": {...}, "batch_stats": {...}}`` of JAX arrays in Flax layout.

    Raises:
      TypeError: ``module`` is not a registered linen module; ``state_dict`` is not a mapping (``None``, a
        model instead of its ``state_dict()``), has non-str keys, or values that are not arrays or tensors
        (named by key).
      StateDictError (a ValueError): every missing key, unexpected key, shape mismatch (expected and
        received shapes), non-float value and value with NaN or Inf entries (key and count), in one message.
    """
    converter = _converter(module, _LINEN, "linen", "torch_to_nnx / nnx_to_torch")
    arrays = state_dict_arrays(state_dict)
    rules = _rules(converter, "torch_rules", module, {key: array.shape for key, array in arrays.items()})
    return flax_from_torch(
        rules,
        arrays,
        dtype=_linen_dtype(module),
        what=f"state dict into {type(module).__qualname__}",
        allow_non_finite=allow_non_finite,
    )


def linen_to_torch(module: nn.Module, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """linen ``variables`` -> PyTorch state dict, checked against the module's attributes.

    Args:
      module: a registered linen module.
      variables: ``{"params": ..., "batch_stats": ...}`` as ``module.init`` returns them.

    Returns:
      PyTorch key -> contiguous NumPy array in PyTorch layout, ready for
      ``torch_model.load_state_dict({k: torch.from_numpy(v) ...}, strict=True)``.

    Raises:
      TypeError: ``module`` is not a registered linen module, or ``variables`` is not a mapping.
      StateDictError (a ValueError): every missing, unexpected or mis-shaped variable, in one message.
    """
    converter = _converter(module, _LINEN, "linen", "torch_to_nnx / nnx_to_torch")
    if not isinstance(variables, Mapping):
        raise TypeError(
            "`variables` must be a mapping of collections to variables, as `module.init` returns "
            f"({{'params': ..., 'batch_stats': ...}}), got {describe(variables)}."
        )
    rules = _rules(converter, "flax_rules", module, tree_shapes(variables))
    return torch_from_flax(rules, variables, what=f"{type(module).__qualname__} variables")


def _collection(variable: nnx.Variable) -> str:
    """The linen collection of an NNX variable: ``params``, ``batch_stats``, or its type's ``linen_collection``."""
    if isinstance(variable, nnx.Param):
        return "params"
    return getattr(type(variable), "linen_collection", "batch_stats")


def _converted(path: Any, variable: Any) -> bool:
    return isinstance(variable, nnx.Param | nnx.BatchStat) or hasattr(type(variable), "linen_collection")


def _nnx_variables(model: nnx.Module) -> dict[FlaxKey, nnx.Variable]:
    """``{("params", *path): Param, ("batch_stats", *path): BatchStat, ...}`` of an NNX model (and variables of
    other types that name their ``linen_collection``, e.g. ModulatedConv's ``noise_const``)."""
    state = nnx.state(model, _converted)
    return {(_collection(variable), *path): variable for path, variable in nnx.to_flat_state(state)}


def torch_to_nnx(model: nnx.Module, state_dict: Mapping[str, Any], *, allow_non_finite: bool = False) -> nnx.Module:
    """Loads a PyTorch state dict into an NNX model, in place; returns ``model``.

    Shapes are checked against the model's current variables (the mapping is :func:`torch_to_linen`'s)
    and values are cast to their dtypes. ``model`` may be abstract, from ``nnx.eval_shape(lambda:
    BranchMixConv(...))``, to skip the random initialisation that the loaded weights replace.

    Args:
      model: a registered NNX model, e.g. ``jdynconv.nnx.BranchMixConv``.
      state_dict: PyTorch key (str) -> NumPy array, JAX array or torch tensor, any float dtype.
      allow_non_finite: load values holding NaN or Inf. By default they are refused (a diverged or corrupted
        checkpoint); pass True to load such weights on purpose.

    Raises:
      TypeError: ``model`` is not a registered NNX model; ``state_dict`` is not a mapping, has non-str keys,
        or values that are not arrays or tensors (named by key).
      StateDictError (a ValueError): every missing key, unexpected key, shape mismatch, non-float value and
        value with NaN or Inf entries (key and count), in one message. The model is unchanged when it raises.
    """
    converter = _converter(model, _NNX, "nnx", "torch_to_linen / linen_to_torch", "model")
    arrays = state_dict_arrays(state_dict)
    current = _nnx_variables(model)
    rules = _rules(converter, "flax_rules", model, {key: tuple(variable.shape) for key, variable in current.items()})
    loaded = flatten_variables(
        flax_from_torch(
            rules,
            arrays,
            dtype=lambda key: current[key].dtype if key in current else jnp.float32,
            what=f"state dict into {type(model).__qualname__}",
            allow_non_finite=allow_non_finite,
        )
    )
    if current.keys() != loaded.keys():
        unfilled = sorted("/".join(map(str, key)) for key in current.keys() - loaded.keys())
        foreign = sorted("/".join(map(str, key)) for key in loaded.keys() - current.keys())
        raise ValueError(
            f"The registered rules for {type(model).__qualname__} do not match its variables: no value for "
            f"{unfilled}, values for variables it does not have {foreign}."
        )
    updated = [(key[1:], variable.replace(loaded[key])) for key, variable in current.items()]
    nnx.update(model, nnx.from_flat_state(updated))
    return model


def nnx_to_torch(model: nnx.Module) -> dict[str, np.ndarray]:
    """An NNX model's ``nnx.Param`` and ``nnx.BatchStat`` variables (and ``noise_const``) -> PyTorch state dict.

    Returns:
      PyTorch key -> contiguous NumPy array in PyTorch layout (as :func:`linen_to_torch`).
    """
    converter = _converter(model, _NNX, "nnx", "torch_to_linen / linen_to_torch", "model")
    values = {key: np.asarray(variable[...]) for key, variable in _nnx_variables(model).items()}
    rules = _rules(converter, "flax_rules", model, {key: value.shape for key, value in values.items()})
    return torch_from_flax(rules, unflatten_variables(values), what=f"{type(model).__qualname__} variables")
