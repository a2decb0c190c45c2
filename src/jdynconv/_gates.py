"""Gates: what a per-sample gate (a Dense layer or a small MLP) sees of its input, and how its logits
become mixing weights.

Shared by ``BranchMixConv`` (its gate) and the kernel-mixing layers (their routing and attention
read :func:`spatial_mean`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

from jdynconv import _checks

Activation = Callable[[jax.Array], jax.Array]
GateInput = Literal["flatten", "mean"]
GATE_INPUTS: tuple[str, ...] = ("flatten", "mean")
GATE_ACTIVATIONS: tuple[str, ...] = ("leaky_relu", "softmax", "sigmoid", "identity")


def leaky_relu(x: jax.Array) -> jax.Array:
    """PyTorch's ``nn.LeakyReLU()`` default: negative slope 0.01 (Flax's default too)."""
    return jax.nn.leaky_relu(x, negative_slope=0.01)


def spatial_mean(inputs: jax.Array) -> jax.Array:
    """Global average pooling: ``(B, *spatial, C) -> (B, C)``."""
    return jnp.mean(inputs, axis=tuple(range(1, inputs.ndim - 1)))


def gate_features(inputs: jax.Array, gate_input: GateInput) -> jax.Array:
    """What the gate's Dense layer sees: ``(B, C * prod(spatial))`` or ``(B, C)``.

    ``"flatten"`` flattens channel-major, in PyTorch's ``nn.Flatten`` order over ``(C, *spatial)``,
    so a PyTorch ``Linear`` weight ports by a plain transpose.
    """
    if gate_input == "flatten":
        return jnp.moveaxis(inputs, -1, 1).reshape(inputs.shape[0], math.prod(inputs.shape[1:]))
    return spatial_mean(inputs)


def gate_activation(logits: jax.Array, activation: str | Activation, temperature: float | jax.Array) -> jax.Array:
    """Turns gate logits ``(B, k)`` into mixing weights."""
    if callable(activation):
        return activation(logits)
    if activation == "leaky_relu":
        return leaky_relu(logits)
    if activation == "softmax":
        _checks.check_temperature(temperature)
        return jax.nn.softmax(logits / jnp.asarray(temperature, logits.dtype), axis=-1)
    if activation == "sigmoid":
        return jax.nn.sigmoid(logits)
    return logits
