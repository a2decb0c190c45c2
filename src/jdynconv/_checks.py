"""Argument canonicalisation and validation shared by every jdynconv entry point.

Everything here runs at trace time on static shapes, so it costs nothing under ``jax.jit``. Error
messages name the argument in backticks, say what was expected and what was received.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PaddingLike = str | int | Sequence[int | tuple[int, int]]
IntOrSequence = int | Sequence[int]
Pads = tuple[tuple[int, int], ...]

_PADDING_FORMS = (
    '"SAME", "VALID", "CAUSAL" (1-D only), an int, a sequence of {rank} ints, '
    "or a sequence of {rank} (low, high) pairs of ints"
)


def is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def canonicalize_ints(value: IntOrSequence, rank: int, name: str, *, minimum: int = 1) -> tuple[int, ...]:
    """Returns ``value`` as a tuple of ``rank`` ints, each at least ``minimum``.

    An int means the same value in every spatial dimension.
    """
    items = (value,) * rank if is_int(value) else value
    if isinstance(items, str) or not isinstance(items, Sequence) or not all(is_int(v) for v in items):
        raise TypeError(f"`{name}` must be an int or a sequence of {rank} ints, got {value!r}.")
    if len(items) != rank:
        raise ValueError(f"`{name}` must have one entry per spatial dimension ({rank}), got {tuple(items)!r}.")
    if any(v < minimum for v in items):
        raise ValueError(f"`{name}` entries must be >= {minimum}, got {tuple(int(v) for v in items)!r}.")
    return tuple(int(v) for v in items)


def canonicalize_padding(
    padding: PaddingLike,
    *,
    spatial_shape: Sequence[int],
    kernel_size: Sequence[int],
    strides: Sequence[int],
    kernel_dilation: Sequence[int],
    input_dilation: Sequence[int],
) -> Pads:
    """Resolves any accepted padding form to explicit ``((low, high), ...)`` per spatial dim.

    ``"SAME"`` follows ``jax.lax``: output size ``ceil(size / stride)``, the odd extra pad at the end.
    ``"CAUSAL"`` pads only at the start of a 1-D signal, by ``(kernel_size - 1) * kernel_dilation``.
    Explicit pads must be non-negative (as in PyTorch; crop the input to shrink it).
    """
    rank = len(spatial_shape)
    forms = _PADDING_FORMS.format(rank=rank)
    if isinstance(padding, str):
        mode = padding.upper()
        if mode not in ("SAME", "VALID", "CAUSAL"):
            raise ValueError(f"`padding` must be {forms}; got the string {padding!r}.")
        if mode != "VALID" and any(d != 1 for d in input_dilation):
            raise ValueError(
                f"`padding` {padding!r} is ambiguous with `input_dilation` {tuple(input_dilation)!r} "
                "(as in jax.lax.conv_general_dilated); pass explicit (low, high) pairs instead."
            )
        if mode == "VALID":
            return ((0, 0),) * rank
        effective_kernel = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
        if mode == "CAUSAL":
            if rank != 1:
                raise ValueError(f'`padding` "CAUSAL" is only defined for 1-D convolution, got {rank}-D inputs.')
            return ((effective_kernel[0] - 1, 0),)
        pads = []
        for size, k, s in zip(spatial_shape, effective_kernel, strides, strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    if is_int(padding):
        pads = ((int(padding), int(padding)),) * rank
    elif isinstance(padding, Sequence) and len(padding) == rank:
        pads_list = []
        for p in padding:
            if is_int(p):
                pads_list.append((int(p), int(p)))
            elif isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 and all(map(is_int, p)):
                pads_list.append((int(p[0]), int(p[1])))
            else:
                raise ValueError(f"`padding` must be {forms}; got {padding!r} (bad entry {p!r}).")
        pads = tuple(pads_list)
    else:
        raise ValueError(f"`padding` must be {forms}; got {padding!r}.")
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        raise ValueError(f"`padding` must be non-negative, got {pads!r}.")
    return pads


def conv_output_shape(
    spatial_shape: Sequence[int],
    kernel_size: Sequence[int],
    *,
    strides: Sequence[int],
    pads: Pads,
    kernel_dilation: Sequence[int],
    input_dilation: Sequence[int],
) -> tuple[int, ...]:
    """Spatial output shape of a convolution; raises if the kernel does not fit the padded input."""
    out = []
    for size, k, s, (lo, hi), kd, idil in zip(
        spatial_shape, kernel_size, strides, pads, kernel_dilation, input_dilation, strict=True
    ):
        padded = (size - 1) * idil + 1 + lo + hi
        effective_kernel = (k - 1) * kd + 1
        if effective_kernel > padded:
            raise ValueError(
                f"The (dilated) kernel size {tuple(kernel_size)!r} (effective {effective_kernel} with "
                f"`kernel_dilation` {tuple(kernel_dilation)!r}) is larger than the padded input: spatial shape "
                f"{tuple(spatial_shape)!r} with `padding` {pads!r} and `input_dilation` {tuple(input_dilation)!r}."
            )
        out.append((padded - effective_kernel) // s + 1)
    return tuple(out)


def as_array(name: str, value: Any) -> jax.Array:
    """``value`` as a JAX array, or a TypeError naming ``name`` for None, strings, ragged sequences and other
    values that are not arrays (instead of ``jnp.asarray``'s error, which names no argument)."""
    if isinstance(value, jax.Array):
        return value
    if value is None or isinstance(value, str | bytes):
        raise TypeError(
            f"`{name}` must be an array (a JAX or NumPy array, or nested sequences of numbers), got {value!r}."
        )
    try:
        array = jnp.asarray(value)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"`{name}` must be an array (a JAX or NumPy array, or nested sequences of numbers of one shape), got a "
            f"{type(value).__name__} that is not one ({error})."
        ) from None
    return array


def mixing_weights(name: str, weights: Any, batch: int, k: int, axis: str) -> jax.Array:
    """Caller-supplied mixing weights (routing, attention or gate weights): a float ``(B, k)`` array."""
    weights = as_array(name, weights)
    check_float_dtype(name, weights)
    if tuple(weights.shape) != (batch, k):
        raise ValueError(f"`{name}` must have shape ({batch}, {k}) (batch, {axis}), got shape {tuple(weights.shape)}.")
    return weights


def check_float_dtype(name: str, array: object) -> None:
    """Raises TypeError unless ``array`` has a floating-point dtype."""
    dtype = array.dtype if hasattr(array, "dtype") else np.asarray(array).dtype
    # jnp.issubdtype knows bfloat16 is a float; np.issubdtype does not.
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`{name}` must have a floating-point dtype (float32, bfloat16, float16, ...), got {dtype}.")


def check_rank(name: str, shape: Sequence[int], expected: int | Sequence[int], layout: str) -> None:
    """Raises ValueError unless ``len(shape)`` is ``expected`` (or one of them); ``layout`` names the axes."""
    allowed = (expected,) if isinstance(expected, int) else tuple(expected)
    if len(shape) not in allowed:
        wanted = " or ".join(str(a) for a in allowed)
        raise ValueError(f"`{name}` must have rank {wanted} {layout}, got shape {tuple(shape)!r}.")


def check_layer_inputs(
    inputs: Any,
    in_features: int | None,
    feature_group_count: int,
    num_spatial: int | None = None,
    fixed_by: str = "the layer's variables were built for",
) -> None:
    """``inputs`` must be a float ``(B, *spatial, C_in)`` with 1 to 3 spatial dims (``num_spatial`` of them when
    ``fixed_by`` fixes it: the layer's variables, or a ``kernel_size`` with one entry per dim) and ``in_features``
    channels (when known), divisible by G."""
    check_float_dtype("inputs", inputs)
    shape = tuple(inputs.shape)
    if num_spatial is not None and inputs.ndim != num_spatial + 2:
        raise ValueError(
            f"`inputs` must have rank {num_spatial + 2} (B, *spatial, C_in) with {num_spatial} spatial dims, as "
            f"{fixed_by}, got shape {shape}."
        )
    if inputs.ndim not in (3, 4, 5):
        raise ValueError(
            f"`inputs` must have rank 3, 4 or 5 (B, *spatial, C_in) with 1 to 3 spatial dims, got shape {shape}."
        )
    channels = shape[-1]
    if in_features is not None and channels != in_features:
        hint = (
            " (channels-first data? jdynconv's layers take channels-last inputs: move the channel axis last)"
            if shape[1] == in_features
            else ""
        )
        raise ValueError(f"`inputs` must have {in_features} channels (last axis), got shape {shape}{hint}.")
    if channels % feature_group_count:
        raise ValueError(
            f"`inputs` channels (={channels}) must be divisible by `feature_group_count` (={feature_group_count})."
        )


def check_positive_int(name: str, value: Any) -> None:
    """An int (Python or NumPy, not bool) >= 1: counts and sizes such as ``features`` or ``num_experts``."""
    if not is_int(value) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def check_positive_number(name: str, value: Any, *, allow_zero: bool = False) -> None:
    """A real scalar (a Python or NumPy number, a 0-d array), finite and > 0 (>= 0 with ``allow_zero``): attributes
    such as ``ratio``. A traced value's dtype and shape are checked, its value cannot be."""
    bound = ">= 0" if allow_zero else "> 0"
    dtype = getattr(value, "dtype", None)
    if isinstance(value, bool | np.bool_ | str) or value is None or np.ndim(value) != 0:
        raise TypeError(f"`{name}` must be a finite number {bound}, got {value!r}.")
    if dtype is not None and not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"`{name}` must be a finite number {bound}, got dtype {dtype}.")
    if dtype is None and not isinstance(value, int | float):
        raise TypeError(f"`{name}` must be a finite number {bound}, got {value!r}.")
    if isinstance(value, jax.core.Tracer):
        return
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value!r}.")


def check_spatial_ints(name: str, value: Any) -> None:
    """An int >= 1 or a sequence of 1 to 3 of them (an attribute whose length the inputs' rank checks later)."""
    rank = 1 if is_int(value) else len(value) if isinstance(value, Sequence) and not isinstance(value, str) else 0
    if rank == 0:  # the type canonicalize_ints refuses at the call: the same TypeError, at construction
        raise TypeError(f"`{name}` must be an int or a sequence of 1 to 3 ints, got {value!r}.")
    if rank > 3:
        raise ValueError(f"`{name}` must be an int or a sequence of 1 to 3 ints, got {value!r}.")
    canonicalize_ints(value, rank, name)


def check_conv_attributes(
    *,
    features: Any,
    kernel_size: Any,
    strides: Any = 1,
    padding: Any = "VALID",
    kernel_dilation: Any = 1,
    feature_group_count: Any = 1,
) -> None:
    """A layer's conv attributes, at construction, before the inputs fix the number of spatial dims: every form
    that could be valid for some rank passes; :func:`canonicalize_ints` and :func:`canonicalize_padding` check the
    rest at the call."""
    check_positive_int("features", features)
    check_positive_int("feature_group_count", feature_group_count)
    if features % feature_group_count:
        raise ValueError(
            f"`features` (={features}) must be divisible by `feature_group_count` (={feature_group_count})."
        )
    for name, value in (("kernel_size", kernel_size), ("strides", strides), ("kernel_dilation", kernel_dilation)):
        check_spatial_ints(name, value)
    if isinstance(padding, str) or is_int(padding):
        rank = 1
    elif isinstance(padding, Sequence) and 1 <= len(padding) <= 3:
        rank = len(padding)
    else:
        raise ValueError(f"`padding` must be {_PADDING_FORMS.format(rank='N')}; got {padding!r}.")
    if not (isinstance(padding, str) and padding.upper() == "CAUSAL"):
        canonicalize_padding(
            padding,
            spatial_shape=(1,) * rank,
            kernel_size=(1,) * rank,
            strides=(1,) * rank,
            kernel_dilation=(1,) * rank,
            input_dilation=(1,) * rank,
        )


def check_batch_norm_attributes(momentum: Any, epsilon: Any) -> None:
    """BatchNorm's ``momentum`` in [0, 1] (Flax's convention: PyTorch's 0.1 is 0.9) and ``epsilon`` > 0."""
    check_positive_number("momentum", momentum, allow_zero=True)
    if momentum > 1:
        raise ValueError(
            f"`momentum` must be in [0, 1] (Flax's convention: PyTorch's momentum m is 1 - m), got {momentum!r}."
        )
    check_positive_number("epsilon", epsilon)


def check_temperature(temperature: Any) -> None:
    """A non-scalar temperature is an error (a traced one's shape is static too); so is a concrete non-positive
    one (a traced value cannot be checked here)."""
    if temperature is None or isinstance(temperature, str):
        raise TypeError(f"`temperature` must be a positive finite scalar, got {temperature!r}.")
    if np.ndim(temperature) != 0:
        raise ValueError(f"`temperature` must be a positive finite scalar, got shape {np.shape(temperature)}.")
    if isinstance(temperature, jax.core.Tracer):
        return
    value = np.asarray(temperature)
    if value.shape != () or not np.isfinite(value) or value <= 0:
        raise ValueError(f"`temperature` must be a positive finite scalar, got {temperature!r}.")
