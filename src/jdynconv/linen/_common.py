"""What several linen families share: the type aliases, Flax's default initialisers, and the ``(k, ...)``
bank of branch or expert kernels (its initialiser and the check of the inputs against it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdynconv import _checks

Initializer = Callable[..., jax.Array]
Dtype = Any

# Flax's defaults (flax.linen.linear): lecun_normal kernels, zero biases; BatchNorm scale ones.
default_kernel_init: Initializer = nn.initializers.lecun_normal()
zeros: Initializer = nn.initializers.zeros_init()
ones: Initializer = nn.initializers.ones_init()


def branch_bank_init(init: Initializer) -> Initializer:
    """Initialises a ``(k, *shape)`` bank as k independent draws of ``init(shape)``.

    So each branch's fan-in is its own kernel's, not k times it (as a plain initializer on the stacked
    shape would compute).
    """

    def bank_init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        keys = jax.random.split(key, shape[0])
        return jax.vmap(lambda k: init(k, tuple(shape[1:]), dtype))(keys)

    return bank_init


def check_inputs_against_bank(module: nn.Module, inputs: jax.Array) -> None:
    """``inputs`` of the rank and channels the ``kernel`` bank ``(k, *kernel_size, C_in // G, features)`` was
    built for; checked before ``self.param``, whose shape error would not say what the layer expects."""
    in_features = num_spatial = None
    if module.has_variable("params", "kernel"):
        shape = module.get_variable("params", "kernel").shape
        num_spatial, in_features = len(shape) - 3, shape[-2] * module.feature_group_count
    _checks.check_layer_inputs(inputs, in_features, module.feature_group_count, num_spatial)
