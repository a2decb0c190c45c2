"""The maths of fairseq's ``LightweightConv1dTBC`` and ``DynamicConv1dTBC`` (Wu et al. 2019), layout-free.

Both convolve each head's ``C / H`` contiguous channels with a ``K``-tap kernel per position: one learned kernel
per head for the lightweight form, one predicted from the query at every time step for the dynamic form. The
layers (``jdynconv.linen`` / ``jdynconv.nnx``: ``LightweightConv``, ``DynamicLightweightConv``) hold the variables
and call these functions on ``(B, T, C)`` arrays; the convolution itself is :func:`per_position_conv`.

fairseq runs one of two paths: the band-matrix ``_forward_expanded`` (its default for ``T <= 512``) and the
unfolded ``_forward_unfolded`` (``T > 512``, ``unfold=True``, and incremental decoding). They agree except for
a causal ``K > T`` with ``weight_softmax`` in ``DynamicConv1dTBC``: the unfold path cuts the kernel to its last
``T`` taps before the softmax, the band path after it. jdynconv computes the band path's function (and its
incremental decoding's, which is the same): the softmax is over all ``K`` taps, the taps before the start read
zeros.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdynconv import _checks
from jdynconv._per_position import per_position_conv

PADDINGS = ("SAME", "CAUSAL")


def padding_left(padding: Any, kernel_size: int) -> int:
    """fairseq's ``padding_l`` from ``padding``: ``"CAUSAL"`` is ``K - 1``, ``"SAME"`` ``(K - 1) // 2`` (the
    odd extra pad at the end, as ``jax.lax``), an int is ``padding_l`` itself (``0 <= padding_l < K``)."""
    if isinstance(padding, str):
        if padding.upper() not in PADDINGS:
            raise ValueError(f"`padding` must be one of {PADDINGS} or an int padding_l, got {padding!r}.")
        return kernel_size - 1 if padding.upper() == "CAUSAL" else (kernel_size - 1) // 2
    if not _checks.is_int(padding) or not 0 <= padding < kernel_size:
        raise ValueError(
            f"`padding` must be {PADDINGS[0]!r}, {PADDINGS[1]!r} or an int padding_l with 0 <= padding_l < "
            f"kernel_size (={kernel_size}), got {padding!r}."
        )
    return int(padding)


def check_config(*, kernel_size: Any, num_heads: Any, padding: Any, weight_dropout: Any) -> int:
    """Checks the attributes both layers share; returns ``padding_l``."""
    _checks.check_positive_int("kernel_size", kernel_size)
    _checks.check_positive_int("num_heads", num_heads)
    is_number = isinstance(weight_dropout, int | float | np.integer | np.floating) and not isinstance(
        weight_dropout, bool
    )
    if not is_number or not 0 <= weight_dropout < 1:
        raise ValueError(f"`weight_dropout` must be a number in [0, 1), got {weight_dropout!r}.")
    return padding_left(padding, kernel_size)


def check_sequence(name: str, array: Any, channels: int | None, num_heads: int) -> None:
    """``array`` must be a float ``(B, T, channels)`` with channels divisible by the heads."""
    _checks.check_float_dtype(name, array)
    shape = tuple(array.shape)
    if len(shape) != 3:
        raise ValueError(f"`{name}` must have rank 3 (B, T, C), or (T, B, C) with time_major, got shape {shape}.")
    if channels is not None and shape[-1] != channels:
        raise ValueError(f"`{name}` must have {channels} channels (last axis), got shape {shape}.")
    if shape[-1] % num_heads:
        raise ValueError(f"`{name}` channels (={shape[-1]}) must be divisible by `num_heads` (={num_heads}).")


def check_query(query: Any, inputs: jax.Array, in_proj: bool, features: int | None) -> jax.Array | None:
    """``query`` as an array of the inputs' leading ``(B, T)`` dims (``features`` of them when known), or None;
    none with ``in_proj``."""
    if query is None:
        return None
    if in_proj:
        raise ValueError("`query` must be None with `in_proj` (the kernels come from the inputs' projection).")
    query = _checks.as_array("query", query)
    check_sequence("query", query, features, 1)
    if query.shape[:2] != inputs.shape[:2]:
        raise ValueError(
            f"`query` must have the inputs' leading (B, T) dims {tuple(inputs.shape[:2])} (time-major: (T, B)), got "
            f"shape {tuple(query.shape)}."
        )
    return query


def valid_taps(length: int, kernel_size: int, padding_l: int, start: jax.Array | int = 0) -> jax.Array:
    """``(length, K)`` bool: tap ``k`` of output ``start + t`` reads an input inside the sequence.

    With ``start`` (incremental decoding: the step's index) the sequence is the ``start + length`` inputs so far.
    """
    position = jnp.arange(length)[:, None] + start
    read = position + jnp.arange(kernel_size)[None, :] - padding_l
    return (read >= 0) & (read < start + length)


def normalise(
    weights: jax.Array,
    *,
    weight_softmax: bool,
    renorm_padding: bool = False,
    padding_l: int = 0,
    start: jax.Array | int = 0,
) -> jax.Array:
    """Kernels ``(B, T, H, K)`` from raw ``weights`` of that shape, as fairseq before its weight dropout.

    ``weight_softmax``: a softmax over the ``K`` taps, computed in float32 and cast back (fairseq's
    ``utils.softmax``). With ``renorm_padding`` too, over the taps that read inside the sequence only (fairseq's
    band path fills the others with -inf first: "normalize the weight over valid positions like
    self-attention"); ``start`` is the first output's index when decoding step by step.
    """
    if not weight_softmax:
        return weights
    logits = weights.astype(jnp.promote_types(weights.dtype, jnp.float32))
    if renorm_padding:
        valid = valid_taps(weights.shape[1], weights.shape[-1], padding_l, start)
        logits = jnp.where(valid[None, :, None, :], logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1).astype(weights.dtype)


def convolve(inputs: jax.Array, kernels: jax.Array, padding_l: int) -> jax.Array:
    """``out[b, t, c] = sum_k kernels[b, t, h(c), k] * inputs[b, t + k - padding_l, c]``, zeros outside.

    Args:
      inputs: ``(B, T, C)``.
      kernels: ``(B, T, H, K)``; head ``h`` holds channels ``h * C / H .. (h + 1) * C / H - 1``.
      padding_l: zeros before the start; ``K - 1 - padding_l`` after the end.
    """
    kernel_size = kernels.shape[-1]
    return per_position_conv(inputs, kernels, padding=[(padding_l, kernel_size - 1 - padding_l)])


def decode_step(inputs: jax.Array, kernels: jax.Array, cached_inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One step of the causal convolution: ``(output, new cache)``.

    Args:
      inputs: ``(B, 1, C)``, this step's input.
      kernels: ``(B, 1, H, K)``, this step's (normalised) kernel.
      cached_inputs: ``(B, K - 1, C)``, the previous ``K - 1`` inputs, oldest first (zeros before the start).

    Returns:
      ``(B, 1, C)`` output, the causal :func:`convolve`'s at this position, and the ``(B, K - 1, C)``
      cache for the next step.
    """
    window = jnp.concatenate([cached_inputs, inputs], axis=1)  # (B, K, C)
    # The full pass's sum of products, tap by tap in the same order (what may differ from the full pass is what runs
    # before: a Dense layer on one step rather than the sequence rounds its sums in another order).
    return per_position_conv(window, kernels, padding="VALID"), window[:, 1:]
