"""PyTorch state dict <-> Flax variables as an ordered list of explicit per-key rules.

Following HF transformers' ``modeling_flax_pytorch_utils``: every PyTorch key has one :class:`Rule` that
says which Flax variable it becomes (``("params", "kernel")``, optionally one slot of a stacked bank),
which axis permutation takes the PyTorch layout to the Flax one, and what shape PyTorch must have. Every
key is accounted for; missing keys, unexpected keys, shape mismatches and non-float values are all
reported together, in one :class:`StateDictError` that names each key with both shapes.

The layer rules (:func:`conv_rules`, :func:`linear_rules`, :func:`batchnorm_rules`) are the building
blocks of the jdynconv modules' conversions and of users' own models: list the rules of each layer
with its PyTorch prefix and Flax variables, then call :func:`flax_from_torch` / :func:`torch_from_flax`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

FlaxKey = tuple[str | int, ...]
"""A Flax variable: its collection then its path, e.g. ``("params", "kernel")``,
``("batch_stats", "BatchNorm_0", "mean")``; NNX list entries are ints."""


@dataclasses.dataclass(frozen=True)
class Dim:
    """A dimension of an expected shape that is not one fixed size, e.g. ``C_in * prod(spatial)``.

    Matches any positive size divisible by ``multiple_of``; ``label`` is how error messages show it.
    """

    label: str
    multiple_of: int = 1

    def matches(self, size: int) -> bool:
        return size >= 1 and size % self.multiple_of == 0

    def __repr__(self) -> str:
        return self.label


DimLike = int | Dim
ShapeSpec = tuple[DimLike, ...]


def shape_matches(spec: ShapeSpec, shape: Sequence[int]) -> bool:
    """Whether ``shape`` has ``spec``'s rank and every size matches (ints exactly, :class:`Dim` by rule)."""
    if len(spec) != len(shape):
        return False
    return all(d.matches(s) if isinstance(d, Dim) else d == s for d, s in zip(spec, shape, strict=True))


def format_shape(shape: Sequence[DimLike]) -> str:
    """``(4, 3, 3, 3)``, ``(3,)``, ``()`` -- tuple notation, :class:`Dim` entries by their label."""
    items = ", ".join(repr(d) if isinstance(d, Dim) else str(int(d)) for d in shape)
    return f"({items},)" if len(shape) == 1 else f"({items})"


@dataclasses.dataclass(frozen=True)
class Permutation:
    """How a PyTorch tensor's axes map to Flax's: ``flax = np.transpose(torch, axes)``."""

    axes: tuple[int, ...]

    def to_flax(self, array: np.ndarray) -> np.ndarray:
        return np.transpose(array, self.axes)

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        return np.transpose(array, tuple(int(a) for a in np.argsort(self.axes)))

    def flax_shape(self, torch_shape: Sequence[DimLike]) -> ShapeSpec:
        return tuple(torch_shape[a] for a in self.axes)


def check_sizes(**sizes: Any) -> None:
    """A rule builder's sizes, by argument name: each a positive int or a :class:`Dim`; ``kernel_size`` a sequence
    of 1 to 3 of them."""
    for name, value in sizes.items():
        if name == "kernel_size":
            if isinstance(value, str) or not isinstance(value, Sequence) or not 1 <= len(value) <= 3:
                raise ValueError(f"`kernel_size` must be a sequence of 1 to 3 sizes, got {value!r}.")
            check_sizes(**{f"kernel_size[{i}]": size for i, size in enumerate(value)})
        elif not isinstance(value, Dim):
            if not isinstance(value, int | np.integer) or isinstance(value, bool):
                raise TypeError(f"`{name}` must be a positive int or a Dim, got {value!r}.")
            if value < 1:
                raise ValueError(f"`{name}` must be a positive int or a Dim, got {value!r}.")


def conv_layout(num_spatial: int) -> Permutation:
    """PyTorch ``(O, I, *K)`` -> Flax ``(*K, I, O)``: spatial axes first, then in, then out (never ``.T``)."""
    if not isinstance(num_spatial, int | np.integer) or isinstance(num_spatial, bool):
        raise TypeError(f"`num_spatial` must be an int (1, 2 or 3), got {num_spatial!r}.")
    if not 1 <= num_spatial <= 3:
        raise ValueError(f"`num_spatial` must be 1, 2 or 3, got {num_spatial!r}.")
    return Permutation((*range(2, 2 + num_spatial), 1, 0))


LINEAR_LAYOUT = Permutation((1, 0))
"""PyTorch ``nn.Linear.weight`` ``(out, in)`` -> Flax ``Dense`` kernel ``(in, out)``."""
VECTOR_LAYOUT = Permutation((0,))
"""Biases, BatchNorm weight/bias/statistics: ``(features,)`` in both."""
SCALAR_LAYOUT = Permutation(())


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a PyTorch tensor lives in Flax: variable ``key``, or slot ``index`` of a stacked bank.

    With ``index``, the Flax variable is ``(n, *slice)``: the n PyTorch tensors of the n branches (or
    experts) stacked along a new leading axis, e.g. ``convs.{i}.0.weight`` -> ``kernel[i]``.
    """

    key: FlaxKey
    index: int | None = None


@dataclasses.dataclass(frozen=True)
class Rule:
    """One PyTorch key: its expected shape, its Flax :class:`Target` and the layout between them.

    ``target=None`` is a PyTorch key with no Flax counterpart (``num_batches_tracked``): optional when
    loading (its shape is checked if present, its value ignored unless ``check_value``, then it must equal
    ``default`` within float32 rounding) and written as ``default`` on export.
    """

    torch_key: str
    torch_shape: ShapeSpec
    target: Target | None
    layout: Permutation
    default: np.ndarray | None = None
    check_value: bool = False

    @property
    def flax_shape(self) -> ShapeSpec:
        return self.layout.flax_shape(self.torch_shape)


def conv_rules(
    torch_prefix: str,
    *,
    kernel: Target,
    bias: Target | None,
    features: DimLike,
    in_features_per_group: DimLike,
    kernel_size: Sequence[DimLike],
) -> list[Rule]:
    """``nn.Conv{N}d`` at ``torch_prefix``: ``weight (O, I // G, *K)`` -> ``kernel (*K, I // G, O)``, ``bias (O,)``.

    Grouped convs keep ``I // G`` in both frameworks. ``bias=None`` for ``bias=False`` convs.
    """
    check_sizes(features=features, in_features_per_group=in_features_per_group, kernel_size=kernel_size)
    rules = [
        Rule(
            f"{torch_prefix}.weight",
            (features, in_features_per_group, *kernel_size),
            kernel,
            conv_layout(len(kernel_size)),
        )
    ]
    if bias is not None:
        rules.append(Rule(f"{torch_prefix}.bias", (features,), bias, VECTOR_LAYOUT))
    return rules


def linear_rules(
    torch_prefix: str, *, kernel: Target, bias: Target | None, in_features: DimLike, features: DimLike
) -> list[Rule]:
    """``nn.Linear`` at ``torch_prefix``: ``weight (out, in)`` -> ``kernel (in, out)``, ``bias (out,)``."""
    check_sizes(in_features=in_features, features=features)
    rules = [Rule(f"{torch_prefix}.weight", (features, in_features), kernel, LINEAR_LAYOUT)]
    if bias is not None:
        rules.append(Rule(f"{torch_prefix}.bias", (features,), bias, VECTOR_LAYOUT))
    return rules


def batchnorm_rules(
    torch_prefix: str,
    *,
    scale: Target,
    offset: Target,
    mean: Target,
    var: Target,
    features: DimLike,
) -> list[Rule]:
    """``nn.BatchNorm{N}d`` at ``torch_prefix``, all ``(features,)``.

    ``weight, bias, running_mean, running_var`` -> ``scale, offset, mean, var``. ``num_batches_tracked``
    has no Flax counterpart: ignored (if present) on load, exported as an int64 0-dim ``0`` so that a
    strict ``load_state_dict`` in PyTorch accepts the result. It only matters to PyTorch when
    ``momentum=None`` (cumulative averaging), which has no Flax equivalent either.
    """
    check_sizes(features=features)
    return [
        Rule(f"{torch_prefix}.weight", (features,), scale, VECTOR_LAYOUT),
        Rule(f"{torch_prefix}.bias", (features,), offset, VECTOR_LAYOUT),
        Rule(f"{torch_prefix}.running_mean", (features,), mean, VECTOR_LAYOUT),
        Rule(f"{torch_prefix}.running_var", (features,), var, VECTOR_LAYOUT),
        Rule(f"{torch_prefix}.num_batches_tracked", (), None, SCALAR_LAYOUT, default=np.zeros((), np.int64)),
    ]


class StateDictError(ValueError):
    """A state dict (or Flax variables) that does not fit the module, with every problem at once.

    Attributes:
      missing: expected keys that are absent.
      unexpected: keys that no rule accounts for.
      mismatched: ``(key, expected shape, received shape)`` for every shape mismatch.
      different: ``(key, expected value, received value)`` for a fixed value (a ``check_value`` rule's) that
        differs.
      not_float: ``(key, dtype)`` for values that should be floating point and are not.
      non_finite: ``(key, count)`` for every float value holding ``count`` NaN or infinite entries (refused
        unless the conversion is called with ``allow_non_finite=True``).
    """

    def __init__(
        self,
        what: str,
        missing: Sequence[str],
        unexpected: Sequence[str],
        mismatched: Sequence[tuple[str, str, str]],
        not_float: Sequence[tuple[str, str]],
        different: Sequence[tuple[str, str, str]] = (),
        non_finite: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        self.not_float = list(not_float)
        self.different = list(different)
        self.non_finite = list(non_finite)
        counts = [
            f"{len(items)} {label if len(items) == 1 else plural}"
            for items, label, plural in (
                (missing, "missing key", "missing keys"),
                (unexpected, "unexpected key", "unexpected keys"),
                (mismatched, "shape mismatch", "shape mismatches"),
                (different, "value mismatch", "value mismatches"),
                (not_float, "value not floating point", "values not floating point"),
                (non_finite, "value with NaN or Inf", "values with NaN or Inf"),
            )
            if items
        ]
        lines = [f"{what}: " + ", ".join(counts) + "."]
        lines += [f"  missing key: {item}" for item in missing]
        lines += [f"  unexpected key: {item}" for item in unexpected]
        lines += [f"  shape mismatch: {key}: expected {want}, got {got}" for key, want, got in mismatched]
        lines += [f"  value mismatch: {key}: expected {want}, got {got}" for key, want, got in different]
        lines += [f"  not floating point: {key}: dtype {dtype}" for key, dtype in not_float]
        lines += [f"  non-finite: {key}: {count} NaN or Inf {_entries(count)}" for key, count in non_finite]
        if non_finite:
            lines.append("  (pass allow_non_finite=True to load non-finite values on purpose)")
        super().__init__("\n".join(lines))


def _entries(count: int) -> str:
    return "entry" if count == 1 else "entries"


def to_numpy(value: Any) -> np.ndarray:
    """A NumPy array from a NumPy/JAX array or a PyTorch tensor (bfloat16 tensors via float32, exactly).

    torch is not imported here: a tensor is recognised by its type's module.
    """
    if type(value).__module__.split(".")[0] == "torch":
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":  # NumPy has no bfloat16 that torch can export to
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(value)


def is_tensor(value: Any) -> bool:
    """A torch tensor, recognised without importing torch."""
    return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach")


def state_dict_arrays(state_dict: Any, *, name: str = "state_dict") -> dict[str, np.ndarray]:
    """Checks that ``state_dict`` maps str keys to arrays or tensors and returns them as NumPy arrays.

    Args:
      state_dict: PyTorch key -> NumPy array, JAX array or torch tensor.
      name: the argument's name in error messages.

    Returns:
      The same keys -> NumPy arrays (:func:`to_numpy`).

    Raises:
      TypeError: ``state_dict`` is not a mapping (``None``, a list, a module), has keys that are not str, or
        has values that are not arrays or tensors (a nested dict, a str, a Python number); the message names
        every offending key.
    """
    if not isinstance(state_dict, Mapping):
        hint = " (pass `model.state_dict()`, not the model)" if hasattr(state_dict, "state_dict") else ""
        raise TypeError(
            f"`{name}` must be a mapping of PyTorch keys to arrays or tensors, got {describe(state_dict)}{hint}."
        )
    not_str = [key for key in state_dict if not isinstance(key, str)]
    if not_str:
        raise TypeError(f"`{name}` keys must be str (PyTorch parameter names), got {_listed(not_str)}.")
    arrays, wrong = {}, []
    for key, value in state_dict.items():
        if isinstance(value, Mapping):
            wrong.append(f"{key!r} (a nested mapping: if it is the state dict, pass checkpoint[{key!r}])")
            continue
        if not (isinstance(value, np.ndarray | np.generic) or is_tensor(value) or hasattr(value, "__array__")):
            wrong.append(f"{key!r} ({describe(value)})")
            continue
        try:
            array = to_numpy(value)
        except Exception as error:  # a sparse, meta or quantised tensor; a float8 one, which NumPy cannot hold
            cause = (str(error).strip().splitlines() or [""])[0][:120]
            wrong.append(f"{key!r} ({describe(value)} that has no NumPy form: {type(error).__name__}: {cause})")
            continue
        if not (jnp.issubdtype(array.dtype, jnp.number) or array.dtype == np.bool_):  # str, object, structured
            wrong.append(f"{key!r} (an array of dtype {array.dtype})")
            continue
        arrays[key] = array
    if wrong:
        raise TypeError(f"`{name}` values must be arrays or tensors; these are not: {', '.join(wrong)}.")
    return arrays


def describe(value: Any) -> str:
    """What a caller passed, briefly, for error messages: ``None``, ``str 'abc'``, ``list of length 3``,
    ``Linear`` (other objects by their type, since a module's repr can run to pages)."""
    if value is None:
        return "None"
    kind = type(value).__qualname__
    if isinstance(value, str | bytes):
        text = repr(value)
        return f"{kind} {text if len(text) <= 40 else text[:37] + '...'}"
    if isinstance(value, Sequence):
        return f"{kind} of length {len(value)}"
    return kind


def _listed(items: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(f"{item!r} ({type(item).__qualname__})" for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def non_finite_count(array: np.ndarray) -> int:
    """How many entries of ``array`` are NaN or infinite; 0 for integer and bool arrays, which cannot be."""
    if not jnp.issubdtype(array.dtype, jnp.inexact):
        return 0
    if array.dtype.kind not in "fc":  # ml_dtypes' bfloat16, float8...: exact in float32
        array = array.astype(np.float32)
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def check_rules(rules: Any, source: str) -> list[Rule]:
    """``rules`` as a list, if it is an iterable of :class:`Rule`; otherwise a TypeError naming ``source``."""
    if isinstance(rules, Rule) or not isinstance(rules, Iterable) or isinstance(rules, str | Mapping):
        raise TypeError(f"{source} must be a list of jdynconv.interop.Rule, got {describe(rules)}.")
    rules = list(rules)
    wrong = [f"item {index}: {describe(rule)}" for index, rule in enumerate(rules) if not isinstance(rule, Rule)]
    if wrong:
        raise TypeError(f"{source} must be a list of jdynconv.interop.Rule; these are not: {', '.join(wrong)}.")
    return rules


def _is_float(dtype: np.dtype) -> bool:
    # jnp.issubdtype knows that ml_dtypes' bfloat16 is a float; np.issubdtype does not.
    return bool(jnp.issubdtype(dtype, jnp.floating))


def _cast(array: np.ndarray, dtype: Any) -> np.ndarray:
    """Any float dtype -> ``dtype``; bfloat16 goes through float32, where it is exact."""
    if array.dtype == jnp.bfloat16:
        array = array.astype(np.float32)
    return np.asarray(array, dtype=dtype)


def flatten_variables(tree: Mapping[Any, Any], prefix: FlaxKey = ()) -> dict[FlaxKey, Any]:
    """Nested variables -> ``{("params", "kernel"): array, ...}``."""
    flat: dict[FlaxKey, Any] = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten_variables(value, (*prefix, name)))
        else:
            flat[(*prefix, name)] = value
    return flat


def unflatten_variables(flat: Mapping[FlaxKey, Any]) -> dict[Any, Any]:
    """Inverse of :func:`flatten_variables` (plain nested dicts)."""
    tree: dict[Any, Any] = {}
    for key, value in flat.items():
        node = tree
        for name in key[:-1]:
            node = node.setdefault(name, {})
        node[key[-1]] = value
    return tree


def _key_name(key: FlaxKey) -> str:
    return "/".join(str(k) for k in key)


def _stacks(rules: Iterable[Rule]) -> dict[FlaxKey, list[Rule]]:
    """The rules of each Flax variable, in slot order; checks a stacked bank's slots are 0..n-1."""
    by_key: dict[FlaxKey, list[Rule]] = {}
    for rule in rules:
        if rule.target is not None:
            by_key.setdefault(rule.target.key, []).append(rule)
    for key, group in by_key.items():
        indices = [rule.target.index for rule in group if rule.target is not None]
        if indices == [None]:
            continue
        if sorted(i for i in indices if i is not None) != list(range(len(indices))):
            raise ValueError(f"Rules for {_key_name(key)} must fill slots 0..{len(indices) - 1}, got {indices}.")
        group.sort(key=lambda rule: rule.target.index if rule.target is not None else 0)
    return by_key


def flax_variable_shape(group: Sequence[Rule]) -> ShapeSpec:
    """A Flax variable's expected shape from its rules: one tensor's shape, or ``(n, *slice)`` for a bank."""
    if group[0].target is not None and group[0].target.index is None:
        return group[0].flax_shape
    return (len(group), *group[0].flax_shape)


def flax_from_torch(
    rules: Sequence[Rule],
    state_dict: Mapping[str, Any],
    *,
    dtype: Callable[[FlaxKey], Any],
    what: str = "state dict",
    allow_non_finite: bool = False,
) -> dict[str, Any]:
    """Converts a PyTorch state dict to nested Flax variables by ``rules``, strictly.

    Args:
      rules: one per PyTorch key (see :func:`conv_rules` and friends).
      state_dict: PyTorch key (str) -> NumPy array, JAX array or torch tensor, any float dtype (bfloat16
        included).
      dtype: the dtype of each Flax variable, e.g. the module's ``param_dtype`` for ``"params"``.
      what: names the conversion in the error message.
      allow_non_finite: load float values holding NaN or infinite entries. By default they are refused: a
        diverged or corrupted checkpoint would otherwise load without a word and turn every output NaN.

    Returns:
      ``{"params": {...}, "batch_stats": {...}}`` (whatever collections the rules name) of JAX arrays.

    Raises:
      TypeError: ``state_dict`` is not a mapping of str keys to arrays or tensors (the message names the
        offending keys), or ``rules`` is not a list of :class:`Rule`.
      StateDictError: listing every missing key, unexpected key, shape mismatch, non-float value and
        (unless ``allow_non_finite``) value with NaN or Inf entries, with how many.
    """
    rules = check_rules(rules, "`rules`")
    arrays = state_dict_arrays(state_dict)
    missing, mismatched, not_float, different, non_finite = [], [], [], [], []
    slices: dict[str, np.ndarray] = {}
    for rule in rules:
        if rule.torch_key not in arrays:
            if rule.target is not None:
                missing.append(f"{rule.torch_key} (expected shape {format_shape(rule.torch_shape)})")
            continue
        value = arrays[rule.torch_key]
        if not shape_matches(rule.torch_shape, value.shape):
            mismatched.append((rule.torch_key, format_shape(rule.torch_shape), format_shape(value.shape)))
        elif rule.check_value and not np.allclose(value, rule.default, rtol=1e-6, atol=0):
            different.append((rule.torch_key, f"the module's {np.asarray(rule.default).tolist()}", f"{value.tolist()}"))
        elif rule.target is not None and not _is_float(value.dtype):
            not_float.append((rule.torch_key, str(value.dtype)))
        elif rule.target is not None:
            count = 0 if allow_non_finite else non_finite_count(value)
            if count:
                non_finite.append((rule.torch_key, count))
            slices[rule.torch_key] = _cast(rule.layout.to_flax(value), dtype(rule.target.key))
    known = {rule.torch_key for rule in rules}
    unexpected = [f"{key} (shape {format_shape(value.shape)})" for key, value in arrays.items() if key not in known]
    if missing or unexpected or mismatched or not_float or different or non_finite:
        raise StateDictError(
            f"Cannot load the PyTorch {what}", missing, unexpected, mismatched, not_float, different, non_finite
        )
    flat = {}
    for key, group in _stacks(rules).items():
        if group[0].target is not None and group[0].target.index is None:
            flat[key] = jnp.asarray(slices[group[0].torch_key])
        else:
            flat[key] = jnp.asarray(np.stack([slices[rule.torch_key] for rule in group]))
    return unflatten_variables(flat)


def _export(array: np.ndarray) -> np.ndarray:
    """A C-contiguous, writable copy PyTorch can take without a warning (``torch.from_numpy`` has no
    bfloat16: exported as float32, exactly); never a view of a (read-only) JAX buffer."""
    if array.dtype == jnp.bfloat16:
        array = array.astype(np.float32)
    return np.array(array, order="C", copy=True)


def torch_from_flax(
    rules: Sequence[Rule], variables: Mapping[str, Any], *, what: str = "Flax variables"
) -> dict[str, np.ndarray]:
    """Converts nested Flax variables to a PyTorch state dict by ``rules``, strictly.

    Args:
      rules: one per PyTorch key.
      variables: ``{"params": {...}, "batch_stats": {...}}`` (nested mappings of arrays).
      what: names the variables in the error message.

    Returns:
      PyTorch key -> contiguous, writable NumPy array (a copy) in PyTorch layout and the variable's
      dtype (bfloat16 as float32, exactly, since ``torch.from_numpy`` has no bfloat16); keys without a
      Flax counterpart get their rule's ``default``.

    Raises:
      TypeError: ``variables`` is not a mapping, or ``rules`` is not a list of :class:`Rule`.
      StateDictError: listing every missing variable, unexpected variable and shape mismatch.
    """
    rules = check_rules(rules, "`rules`")
    if not isinstance(variables, Mapping):
        raise TypeError(
            "`variables` must be a mapping of collections to variables ({'params': ..., 'batch_stats': ...}), "
            f"got {describe(variables)}."
        )
    flat = {key: np.asarray(value) for key, value in flatten_variables(variables).items()}
    stacks = _stacks(rules)
    missing, mismatched, not_float = [], [], []
    for key, group in stacks.items():
        expected = flax_variable_shape(group)
        if key not in flat:
            missing.append(f"{_key_name(key)} (expected shape {format_shape(expected)})")
        elif not shape_matches(expected, flat[key].shape):
            mismatched.append((_key_name(key), format_shape(expected), format_shape(flat[key].shape)))
        elif not _is_float(flat[key].dtype):
            not_float.append((_key_name(key), str(flat[key].dtype)))
    unexpected = [
        f"{_key_name(key)} (shape {format_shape(value.shape)})" for key, value in flat.items() if key not in stacks
    ]
    if missing or unexpected or mismatched or not_float:
        raise StateDictError(f"Cannot export the {what}", missing, unexpected, mismatched, not_float)
    state_dict = {}
    for rule in rules:
        if rule.target is None:
            state_dict[rule.torch_key] = np.array(rule.default)
            continue
        value = flat[rule.target.key]
        if rule.target.index is not None:
            value = value[rule.target.index]
        state_dict[rule.torch_key] = _export(rule.layout.to_torch(value))
    return state_dict


def tree_shapes(variables: Mapping[str, Any]) -> dict[FlaxKey, tuple[int, ...]]:
    """``{("params", "kernel"): shape, ...}`` of nested Flax variables."""
    return {key: tuple(np.shape(value)) for key, value in flatten_variables(variables).items()}
