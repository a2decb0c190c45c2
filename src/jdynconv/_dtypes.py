"""Flax's dtype promotion, without importing Flax.

``promote_dtype`` is ``flax.nnx.nn.dtypes.promote_dtype``: the same rule, the same results. It lives here
because the functional maths (``_kernel_mix``, ``_odconv``, ``_branch_mix``) is imported by ``import jdynconv``,
and importing Flax's copy loads ``flax.linen`` and ``flax.nnx`` (and optax), about as long again as
``import jax``; the Flax modules in ``jdynconv.linen`` and ``jdynconv.nnx`` load Flax when they are used.
"""

from __future__ import annotations

from typing import Any, TypeVar

import jax.numpy as jnp

T = TypeVar("T", bound=tuple)


def canonicalize_dtype(*args: Any, dtype: Any = None, inexact: bool = True) -> Any:
    """The dtype ``args`` are cast to: ``dtype`` when given, else ``jnp.result_type`` of the arguments that are
    not None, promoted with float32 when ``inexact`` and it is not inexact; a ValueError when ``inexact`` and
    the dtype is an integer or boolean one (as ``flax.nnx.nn.dtypes.canonicalize_dtype``)."""
    if dtype is None:
        dtype = jnp.result_type(*(jnp.asarray(x) for x in args if x is not None))
        if inexact and not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
    if inexact and not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(f"Dtype must be inexact: {dtype}")
    return dtype


def promote_dtype(args: T, /, *, dtype: Any = None, inexact: bool = True) -> T:
    """``args`` (one tuple, not variadic) cast to arrays of one dtype (``canonicalize_dtype``'s); None entries
    stay None."""
    dtype = canonicalize_dtype(*args, dtype=dtype, inexact=inexact)
    return tuple(jnp.asarray(x, dtype) if x is not None else None for x in args)  # type: ignore[return-value]
