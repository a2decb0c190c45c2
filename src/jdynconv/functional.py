"""Pure functions: per-sample convolution and the two ways of mixing with per-sample weights.

Everything here is jit-, grad- and vmap-safe; validation runs on static shapes at trace time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jdynconv import _checks, _lowering, _platform
from jdynconv._lowering import auto, batch_parallel, canonical

DataFormat = Literal["channels_last", "channels_first"]
Method = Literal["auto", "vmap", "grouped", "scan", "im2col", "direct", "hybrid", "depthwise"]

METHODS: tuple[str, ...] = ("auto", *_lowering.LOWERINGS)
DATA_FORMATS: tuple[str, ...] = ("channels_last", "channels_first")


def per_sample_conv(
    inputs: ArrayLike,
    kernels: ArrayLike,
    bias: ArrayLike | None = None,
    *,
    strides: _checks.IntOrSequence = 1,
    padding: _checks.PaddingLike = "SAME",
    kernel_dilation: _checks.IntOrSequence = 1,
    input_dilation: _checks.IntOrSequence = 1,
    feature_group_count: int = 1,
    data_format: DataFormat = "channels_last",
    precision: Any = None,
    preferred_element_type: Any = None,
    method: Method = "auto",
) -> jax.Array:
    """N-d convolution (N = 1, 2, 3) where every batch element has its own kernel (and bias).

    ``out[b] = conv(inputs[b], kernels[b]) + bias[b]``, with ``jax.lax.conv_general_dilated``'s
    semantics for strides, padding, dilations and ``feature_group_count``.

    Args:
      inputs: ``(B, *spatial, C_in)`` for ``"channels_last"``, ``(B, C_in, *spatial)`` for
        ``"channels_first"`` (PyTorch's layout).
      kernels: ``(B, *kernel_size, C_in // G, C_out)`` for ``"channels_last"`` (Flax's HWIO per
        sample), ``(B, C_out, C_in // G, *kernel_size)`` for ``"channels_first"`` (PyTorch's OIHW per
        sample). Same dtype as ``inputs``.
      bias: ``(B, C_out)`` per sample, ``(C_out,)`` shared, or None.
      strides: an int or one int per spatial dim.
      padding: ``"SAME"`` (``jax.lax``'s: extra pad at the end), ``"VALID"``, ``"CAUSAL"`` (1-D: all
        padding at the start), an int, one int per spatial dim, or one ``(low, high)`` per spatial dim.
      kernel_dilation: an int or one int per spatial dim (PyTorch's ``dilation``).
      input_dilation: an int or one int per spatial dim (transposed-conv style; needs explicit or
        ``"VALID"`` padding).
      feature_group_count: G, as in ``jax.lax`` (PyTorch's ``groups``).
      data_format: ``"channels_last"`` or ``"channels_first"``.
      precision: passed to the underlying conv/matmul, as in ``jax.lax``.
      preferred_element_type: accumulation and output dtype, as in ``jax.lax``.
      method: ``"auto"`` (the fastest lowering measured for the backend and shape; the documentation's
        Performance page says which it picks where), ``"vmap"`` (reference semantics), ``"grouped"``,
        ``"scan"``, ``"im2col"``, ``"direct"``, ``"hybrid"`` or ``"depthwise"`` (a multiply-add per kernel
        tap, for ``C_in // G == 1``; its program grows with ``C_in // G`` otherwise). All compute the same
        function.

    Returns:
      ``(B, *out_spatial, C_out)`` for ``"channels_last"``, ``(B, C_out, *out_spatial)`` for
      ``"channels_first"``, with ``out_spatial[i] = (padded_i - dilated_kernel_i) // strides[i] + 1``.
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f"`data_format` must be one of {DATA_FORMATS}, got {data_format!r}.")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    inputs = _checks.as_array("inputs", inputs)
    kernels = _checks.as_array("kernels", kernels)
    _checks.check_float_dtype("inputs", inputs)
    _checks.check_float_dtype("kernels", kernels)
    if kernels.dtype != inputs.dtype:
        raise TypeError(
            f"`kernels` must have the dtype of `inputs` ({inputs.dtype}), got {kernels.dtype} "
            "(as jax.lax.conv_general_dilated requires; cast one of them)."
        )
    channels_first = data_format == "channels_first"
    input_layout = "(B, C_in, *spatial)" if channels_first else "(B, *spatial, C_in)"
    _checks.check_rank("inputs", inputs.shape, (3, 4, 5), f"{input_layout} with 1 to 3 spatial dims")
    num_spatial = inputs.ndim - 2
    kernel_layout = "(B, C_out, C_in // G, *kernel_size)" if channels_first else "(B, *kernel_size, C_in // G, C_out)"
    _checks.check_rank("kernels", kernels.shape, inputs.ndim + 1, f"{kernel_layout} for {num_spatial}-D `inputs`")

    given_kernel_shape = tuple(kernels.shape)
    if channels_first:
        batch, in_channels, *spatial = inputs.shape
        out_channels, group_in_channels, *kernel_size = kernels.shape[1:]
    else:
        batch, *spatial, in_channels = inputs.shape
        *kernel_size, group_in_channels, out_channels = kernels.shape[1:]
    if kernels.shape[0] != batch:
        raise ValueError(f"`kernels` must have batch size {batch} to match `inputs`, got shape {given_kernel_shape}.")
    groups = _check_groups(feature_group_count, in_channels, group_in_channels, out_channels, given_kernel_shape)
    if any(k < 1 for k in kernel_size):
        raise ValueError(
            f"`kernels` must have every kernel size >= 1, got kernel size {tuple(kernel_size)} "
            f"(kernels shape {given_kernel_shape})."
        )
    _check_preferred_element_type(preferred_element_type, inputs.dtype)

    spec = conv_spec(
        spatial,
        kernel_size,
        strides=strides,
        padding=padding,
        kernel_dilation=kernel_dilation,
        input_dilation=input_dilation,
        feature_group_count=groups,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    # ``auto`` chooses for the platform the program is lowered for (an export for GPU from a CPU host included).
    rule = auto.choose_lowering if method == "auto" else lambda platform: _lowering.LOWERINGS[method]
    if batch == 0:
        # An empty batch has an empty result; the lowerings' reshapes and B * G groups cannot express it.
        out_spatial = canonical.output_spatial_shape(spatial, kernel_size, spec)
        out = jnp.zeros((0, *out_spatial, out_channels), preferred_element_type or inputs.dtype)
        out = jnp.moveaxis(out, -1, 1) if channels_first else out
    else:
        run = _platform.by_platform(rule, lambda lowering: _in_layout(lowering, channels_first, spec))
        out = batch_parallel.map_batch_shards(run, (inputs, kernels))
    if bias is not None:
        bias = broadcastable_bias(bias, batch, out_channels, inputs.dtype, num_spatial).astype(out.dtype)
        out = out + (jnp.moveaxis(bias, -1, 1) if channels_first else bias)
    return out


def _in_layout(lowering: canonical.Lowering, channels_first: bool, spec: canonical.ConvSpec) -> Any:
    """``lowering`` as a function of ``(inputs, kernels)`` in the caller's layout: its channels-first form
    where it has one, else transposes around it."""
    if not channels_first:
        return lambda inputs, kernels: lowering(inputs, kernels, spec)
    if lowering in _lowering.CHANNELS_FIRST_FORMS:
        return lambda inputs, kernels: _lowering.CHANNELS_FIRST_FORMS[lowering](inputs, kernels, spec)

    def transposed(inputs: jax.Array, kernels: jax.Array) -> jax.Array:
        out = lowering(jnp.moveaxis(inputs, 1, -1), jnp.moveaxis(kernels, (1, 2), (-1, -2)), spec)
        return jnp.moveaxis(out, -1, 1)

    return transposed


def conv_spec(
    spatial: Sequence[int],
    kernel_size: Sequence[int],
    *,
    strides: _checks.IntOrSequence,
    padding: _checks.PaddingLike,
    kernel_dilation: _checks.IntOrSequence,
    input_dilation: _checks.IntOrSequence,
    feature_group_count: int,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> canonical.ConvSpec:
    """Validates and canonicalises conv hyper-parameters for inputs of ``spatial`` shape.

    Raises if the (dilated) kernel does not fit the padded input. Shared by every jdynconv layer.
    """
    num_spatial = len(spatial)
    strides_t = _checks.canonicalize_ints(strides, num_spatial, "strides")
    kernel_dilation_t = _checks.canonicalize_ints(kernel_dilation, num_spatial, "kernel_dilation")
    input_dilation_t = _checks.canonicalize_ints(input_dilation, num_spatial, "input_dilation")
    pads = _checks.canonicalize_padding(
        padding,
        spatial_shape=spatial,
        kernel_size=kernel_size,
        strides=strides_t,
        kernel_dilation=kernel_dilation_t,
        input_dilation=input_dilation_t,
    )
    _checks.conv_output_shape(
        spatial,
        kernel_size,
        strides=strides_t,
        pads=pads,
        kernel_dilation=kernel_dilation_t,
        input_dilation=input_dilation_t,
    )
    return canonical.ConvSpec(
        strides=strides_t,
        pads=pads,
        kernel_dilation=kernel_dilation_t,
        input_dilation=input_dilation_t,
        feature_group_count=feature_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def _check_groups(
    feature_group_count: int,
    in_channels: int,
    group_in_channels: int,
    out_channels: int,
    kernel_shape: tuple[int, ...],
) -> int:
    _checks.check_positive_int("feature_group_count", feature_group_count)
    groups = int(feature_group_count)
    if in_channels % groups:
        raise ValueError(f"`inputs` channels (={in_channels}) must be divisible by `feature_group_count` (={groups}).")
    if group_in_channels * groups != in_channels:
        raise ValueError(
            f"`kernels` must have C_in // G = {in_channels} // {groups} = {in_channels // groups} input channels "
            f"to match `inputs`, got {group_in_channels} (kernels shape {tuple(kernel_shape)})."
        )
    if out_channels % groups:
        raise ValueError(
            f"`kernels` output channels (={out_channels}) must be divisible by `feature_group_count` (={groups}); "
            f"kernels shape {tuple(kernel_shape)}."
        )
    return groups


def _check_preferred_element_type(preferred_element_type: Any, dtype: Any) -> None:
    """As ``jax.lax``: a floating-point accumulation type no narrower than the inputs' (or None)."""
    if preferred_element_type is None:
        return
    wanted = jnp.dtype(preferred_element_type)
    if not jnp.issubdtype(wanted, jnp.floating) or jnp.finfo(wanted).bits < jnp.finfo(dtype).bits:
        raise TypeError(
            f"`preferred_element_type` must be a floating-point dtype at least as wide as the inputs' ({dtype}), "
            f"got {wanted}."
        )


def broadcastable_bias(bias: ArrayLike, batch: int, out_channels: int, dtype: Any, num_spatial: int) -> jax.Array:
    """``(B, C_out)`` or ``(C_out,)`` bias reshaped to add to a channels-last output explicitly."""
    bias = _checks.as_array("bias", bias)
    _checks.check_float_dtype("bias", bias)
    if bias.dtype != dtype:
        raise TypeError(f"`bias` must have the dtype of `inputs` ({dtype}), got {bias.dtype}.")
    if bias.shape == (out_channels,):
        return bias.reshape((1,) * (num_spatial + 1) + (out_channels,))
    if bias.shape == (batch, out_channels):
        return bias.reshape((batch,) + (1,) * num_spatial + (out_channels,))
    raise ValueError(
        f"`bias` must have shape ({batch}, {out_channels}) (per sample) or ({out_channels},) (shared), "
        f"got shape {tuple(bias.shape)}."
    )


def mix_outputs(outputs: ArrayLike, weights: ArrayLike, axis: int = 1) -> jax.Array:
    """Per-sample weighted sum over a stacked axis: ``out[b, ...] = sum_n weights[b, n] * outputs[b, ..n.., ...]``.

    The :term:`seed model`'s branch mixing (``(w[:, :, None, None, None] * stacked).sum(1)``) as one fused op.

    Args:
      outputs: ``(B, ..., k, ...)`` with the k stacked values on ``axis`` (default 1: ``(B, k, ...)``).
      weights: ``(B, k)``, same dtype as ``outputs``.
      axis: the axis of ``outputs`` that holds the k values; not the batch axis 0.

    Returns:
      ``outputs`` with ``axis`` summed out: ``(B, ...)``.
    """
    outputs = _checks.as_array("outputs", outputs)
    weights = _checks.as_array("weights", weights)
    _checks.check_float_dtype("outputs", outputs)
    _checks.check_float_dtype("weights", weights)
    if outputs.ndim < 2:
        raise ValueError(f"`outputs` must have rank >= 2 (batch, k, ...), got shape {tuple(outputs.shape)}.")
    if not _checks.is_int(axis) or not -outputs.ndim <= axis < outputs.ndim or axis % outputs.ndim == 0:
        raise ValueError(
            f"`axis` must index a non-batch axis of `outputs` (1 to {outputs.ndim - 1}, or negative), got {axis!r} "
            f"for shape {tuple(outputs.shape)}."
        )
    axis = axis % outputs.ndim
    expected = (outputs.shape[0], outputs.shape[axis])
    if weights.shape != expected:
        raise ValueError(
            f"`weights` must have shape {expected} (batch, k) to match `outputs` of shape "
            f"{tuple(outputs.shape)} mixed over axis {axis}, got shape {tuple(weights.shape)}."
        )
    if weights.dtype != outputs.dtype:
        raise TypeError(f"`weights` must have the dtype of `outputs` ({outputs.dtype}), got {weights.dtype}.")
    # Collapse to (B, [before], k, [after]) with no size-1 axes: XLA:CPU's YNNPACK reduction took an order of
    # magnitude longer on (B, H, W, 1, k, F) than on (B, H * W, k, F) (a one-process probe).
    before = math.prod(outputs.shape[1:axis])
    after = math.prod(outputs.shape[axis + 1 :])
    batch, k = expected
    collapsed = [batch, *([before] if before > 1 else []), k, *([after] if after > 1 else [])]
    weight_shape = [batch, *([1] if before > 1 else []), k, *([1] if after > 1 else [])]
    k_axis = 2 if before > 1 else 1
    # A broadcast multiply + sum rather than einsum: XLA fuses it into one pass, and it stays exact in
    # float32 on GPU, where an einsum would be a matmul run in TF32 by default.
    mixed = jnp.sum(outputs.reshape(collapsed) * weights.reshape(weight_shape), axis=k_axis)
    return mixed.reshape(outputs.shape[:axis] + outputs.shape[axis + 1 :])


def mix_kernels(bank: ArrayLike, weights: ArrayLike, *, precision: Any = None) -> jax.Array:
    """Per-sample kernels as weighted sums of a bank: ``out[b] = sum_n weights[b, n] * bank[n]``.

    Args:
      bank: ``(k, *kernel_shape)``: k expert kernels (or biases, ``(k, C_out)``).
      weights: ``(B, k)``, same dtype as ``bank``.
      precision: passed to the matmul, as in ``jax.lax``.

    Returns:
      ``(B, *kernel_shape)``, ready for :func:`per_sample_conv`.
    """
    bank = _checks.as_array("bank", bank)
    weights = _checks.as_array("weights", weights)
    _checks.check_float_dtype("bank", bank)
    _checks.check_float_dtype("weights", weights)
    if bank.ndim < 1:
        raise ValueError(f"`bank` must have rank >= 1 (k, *kernel_shape), got shape {tuple(bank.shape)}.")
    if weights.ndim != 2 or weights.shape[1] != bank.shape[0]:
        raise ValueError(
            f"`weights` must have shape (batch, {bank.shape[0]}) to mix a bank of {bank.shape[0]} kernels "
            f"(bank shape {tuple(bank.shape)}), got shape {tuple(weights.shape)}."
        )
    if weights.dtype != bank.dtype:
        raise TypeError(f"`weights` must have the dtype of `bank` ({bank.dtype}), got {weights.dtype}.")
    mixed = jnp.matmul(weights, bank.reshape(bank.shape[0], -1), precision=precision)
    return mixed.reshape(weights.shape[0], *bank.shape[1:])
