"""Combining two lowerings of the same convolution: values from one program, derivatives from another."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jdynconv._lowering.canonical import ConvSpec, Lowering


def with_tangent_lowering(primal: Lowering, tangent: Lowering, kernel_tangent: Lowering | None = None) -> Lowering:
    """Computes values with ``primal`` and derivatives with ``tangent`` (same function, other program).

    A custom JVP rather than a custom VJP, so forward mode, ``jax.hessian`` and nested ``jax.grad``
    keep working: the tangent ``tangent(d_inputs, kernels) + kernel_tangent(inputs, d_kernels)`` is
    linear, and JAX transposes it into the reverse pass. ``kernel_tangent`` defaults to ``tangent``.
    """
    kernel_tangent = tangent if kernel_tangent is None else kernel_tangent

    @functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
    def conv(inputs: jax.Array, kernels: jax.Array, spec: ConvSpec) -> jax.Array:
        return primal(inputs, kernels, spec)

    @functools.partial(conv.defjvp, symbolic_zeros=True)
    def conv_jvp(
        spec: ConvSpec, primals: tuple[jax.Array, jax.Array], tangents: tuple[Any, Any]
    ) -> tuple[jax.Array, jax.Array]:
        inputs, kernels = primals
        d_inputs, d_kernels = tangents
        out = conv(inputs, kernels, spec)
        terms = []
        if not isinstance(d_inputs, SymbolicZero):
            terms.append(tangent(d_inputs, kernels, spec))
        if not isinstance(d_kernels, SymbolicZero):
            terms.append(kernel_tangent(inputs, d_kernels, spec))
        return out, functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(out)

    return conv
