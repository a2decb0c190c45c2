"""Per-sample transposed convolution (PyTorch's ``conv_transposeNd`` with one kernel per batch element).

Both forms below are one :func:`jdynconv.functional.per_sample_conv` call plus reshapes of non-batch axes,
so the transposed conv inherits its lowerings, its derivatives and its batch-parallelism under SPMD.

- **Sub-pixel** (``kernel_dilation == 1``): a stride-``s`` transposed conv is ``s**N`` stride-1 convs, one
  per output phase ``r``, with the taps ``r, r + s, r + 2s, ...`` of the kernel. They run as one conv with
  ``s**N * C_out`` output channels over the undilated input, interleaved afterwards (depth-to-space).
  It multiplies no inserted zeros: ``ceil(k / s)**N`` taps an input position, against ``k**N`` over
  ``s**N`` times the positions for the input-dilated form.
- **Input-dilated** (any dilation): the adjoint of a strided conv, a stride-1 conv with the flipped kernel
  over the input with ``s - 1`` zeros between samples (``input_dilation``).

``benchmarks/per_sample_conv_transpose.py`` compares the two (results in
``docs/results/families/per_sample_conv_transpose_cpu.md``); the sub-pixel form is used wherever it applies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jdynconv import _checks, functional

TransposeForm = Literal["auto", "sub_pixel", "input_dilated"]
FORMS: tuple[str, ...] = ("auto", "sub_pixel", "input_dilated")


def per_sample_conv_transpose(
    inputs: ArrayLike,
    kernels: ArrayLike,
    bias: ArrayLike | None = None,
    *,
    strides: _checks.IntOrSequence = 1,
    padding: _checks.IntOrSequence = 0,
    output_padding: _checks.IntOrSequence = 0,
    kernel_dilation: _checks.IntOrSequence = 1,
    feature_group_count: int = 1,
    data_format: functional.DataFormat = "channels_last",
    precision: Any = None,
    preferred_element_type: Any = None,
    method: functional.Method = "auto",
    form: TransposeForm = "auto",
) -> jax.Array:
    """N-d transposed convolution (N = 1, 2, 3) where every batch element has its own kernel (and bias).

    ``out[b] = conv_transpose(inputs[b], kernels[b]) + bias[b]`` with PyTorch's ``conv_transposeNd``
    semantics: the adjoint (input gradient) of the strided, padded, dilated conv whose kernel is
    ``kernels[b]``, so an input position ``i`` reaches output positions ``i * stride + t * dilation -
    padding`` for the kernel taps ``t``.

    Args:
      inputs: ``(B, *spatial, C_in)`` for ``"channels_last"``, ``(B, C_in, *spatial)`` for ``"channels_first"``.
      kernels: the kernel of that forward conv, per sample: ``(B, *kernel_size, C_out // G, C_in)`` for
        ``"channels_last"`` (its HWIO), ``(B, C_in, C_out // G, *kernel_size)`` for ``"channels_first"``
        (PyTorch's ``ConvTransposeNd.weight`` layout, per sample). Same dtype as ``inputs``.
      bias: ``(B, C_out)`` per sample, ``(C_out,)`` shared, or None.
      strides: an int or one int per spatial dim (PyTorch's ``stride``).
      padding: an int or one int per spatial dim: PyTorch's ``padding``, removed from both ends of the
        full output, ``dilation * (kernel_size - 1) - padding`` zero-padding of the dilated input.
      output_padding: an int or one int per spatial dim, added to the end of the output; each must be
        smaller than the stride or the dilation of its dim (as in PyTorch).
      kernel_dilation: an int or one int per spatial dim (PyTorch's ``dilation``).
      feature_group_count: G (PyTorch's ``groups``).
      data_format: ``"channels_last"`` or ``"channels_first"``.
      precision: passed to the underlying conv/matmul, as in ``jax.lax``.
      preferred_element_type: accumulation and output dtype, as in ``jax.lax``.
      method: the :func:`jdynconv.per_sample_conv` lowering of the conv the transposed conv runs as.
      form: ``"auto"`` (``"sub_pixel"`` when every dilation is 1, else ``"input_dilated"``),
        ``"sub_pixel"`` (needs dilation 1) or ``"input_dilated"``; both compute the same function.

    Returns:
      ``(B, *out_spatial, C_out)`` for ``"channels_last"``, ``(B, C_out, *out_spatial)`` for
      ``"channels_first"``, with ``out_spatial[i] = (spatial[i] - 1) * strides[i] - 2 * padding[i] +
      dilation[i] * (kernel_size[i] - 1) + output_padding[i] + 1``.
    """
    if data_format not in functional.DATA_FORMATS:
        raise ValueError(f"`data_format` must be one of {functional.DATA_FORMATS}, got {data_format!r}.")
    if form not in FORMS:
        raise ValueError(f"`form` must be one of {FORMS}, got {form!r}.")
    inputs = _checks.as_array("inputs", inputs)
    kernels = _checks.as_array("kernels", kernels)
    _checks.check_float_dtype("inputs", inputs)
    _checks.check_float_dtype("kernels", kernels)
    channels_first = data_format == "channels_first"
    input_layout = "(B, C_in, *spatial)" if channels_first else "(B, *spatial, C_in)"
    _checks.check_rank("inputs", inputs.shape, (3, 4, 5), f"{input_layout} with 1 to 3 spatial dims")
    num_spatial = inputs.ndim - 2
    kernel_layout = "(B, C_in, C_out // G, *kernel_size)" if channels_first else "(B, *kernel_size, C_out // G, C_in)"
    _checks.check_rank("kernels", kernels.shape, inputs.ndim + 1, f"{kernel_layout} for {num_spatial}-D `inputs`")
    given = f"kernels shape {tuple(kernels.shape)}"
    if channels_first:
        # To the channels-last layout: (B, C_in, C_out // G, *k) -> (B, *k, C_out // G, C_in).
        kernels = jnp.moveaxis(kernels, (1, 2), (-1, -2))
        inputs = jnp.moveaxis(inputs, 1, -1)
    batch, *spatial, in_channels = inputs.shape
    *kernel_size, _, kernel_in = kernels.shape[1:]
    if kernels.shape[0] != batch:
        raise ValueError(f"`kernels` must have batch size {batch} to match `inputs`, got {given}.")
    if kernel_in != in_channels:
        raise ValueError(f"`kernels` must have C_in = {in_channels} (the channels of `inputs`), got {given}.")
    _checks.check_positive_int("feature_group_count", feature_group_count)
    groups = int(feature_group_count)
    if in_channels % groups:
        raise ValueError(f"`inputs` channels (={in_channels}) must be divisible by `feature_group_count` (={groups}).")
    strides_t = _checks.canonicalize_ints(strides, num_spatial, "strides")
    dilation_t = _checks.canonicalize_ints(kernel_dilation, num_spatial, "kernel_dilation")
    padding_t = _checks.canonicalize_ints(padding, num_spatial, "padding", minimum=0)
    output_padding_t = _checks.canonicalize_ints(output_padding, num_spatial, "output_padding", minimum=0)
    for op, s, d in zip(output_padding_t, strides_t, dilation_t, strict=True):
        if op >= max(s, d):
            raise ValueError(
                f"`output_padding` {output_padding_t} must be smaller than the stride or the dilation of each dim "
                f"(`strides` {strides_t}, `kernel_dilation` {dilation_t}), as in PyTorch."
            )
    out_spatial = output_spatial_shape(spatial, kernel_size, strides_t, padding_t, dilation_t, output_padding_t)
    if any(size < 1 for size in out_spatial):
        raise ValueError(
            f"The transposed conv's output would be empty: spatial shape {tuple(spatial)}, kernel size "
            f"{tuple(kernel_size)}, `strides` {strides_t}, `padding` {padding_t}, `kernel_dilation` {dilation_t}, "
            f"`output_padding` {output_padding_t} give {out_spatial}."
        )
    if form == "sub_pixel" and any(d != 1 for d in dilation_t):
        raise ValueError(f'`form` "sub_pixel" needs `kernel_dilation` 1, got {dilation_t}; use "input_dilated".')

    def conv(x: jax.Array, k: jax.Array, **geometry: Any) -> jax.Array:
        return functional.per_sample_conv(
            x,
            k,
            feature_group_count=groups,
            precision=precision,
            preferred_element_type=preferred_element_type,
            method=method,
            **geometry,
        )

    out = transposed(conv, inputs, kernels, strides_t, padding_t, dilation_t, out_spatial, groups, form)
    if bias is not None:
        bias = functional.broadcastable_bias(bias, batch, out.shape[-1], inputs.dtype, num_spatial)
        out = out + bias.astype(out.dtype)
    return jnp.moveaxis(out, -1, 1) if channels_first else out


def output_spatial_shape(
    spatial: Sequence[int],
    kernel_size: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    output_padding: Sequence[int],
) -> tuple[int, ...]:
    """PyTorch's ``(size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1`` per dim."""
    geometry = zip(spatial, kernel_size, strides, padding, dilation, output_padding, strict=True)
    return tuple((n - 1) * s - 2 * p + d * (k - 1) + op + 1 for n, k, s, p, d, op in geometry)


ConvFn = Callable[..., jax.Array]


def transposed(
    conv: ConvFn,
    inputs: jax.Array,
    kernels: jax.Array,
    strides: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    out_spatial: tuple[int, ...],
    groups: int,
    form: str = "auto",
) -> jax.Array:
    """The transposed conv of channels-last ``inputs`` with ``kernels`` ``(B, *k, C_out // G, C_in)``
    per sample, run as ``conv(inputs, forward_kernels, padding=...,
    [input_dilation=..., kernel_dilation=...])``, a stride-1 conv, and cropped to ``out_spatial``."""
    if form == "sub_pixel" or (form == "auto" and all(d == 1 for d in dilation)):
        full = _sub_pixel(conv, inputs, kernels, strides, groups)
    else:
        full = _input_dilated(conv, inputs, kernels, strides, dilation, groups)
    return _crop(full, padding, out_spatial)


def _forward_kernels(kernels: jax.Array, groups: int) -> jax.Array:
    """``(..., C_out // G, C_in)`` (the transposed conv's) -> ``(..., C_in // G, C_out)``: the kernel of the
    conv it runs as, its in and out channels swapped group by group."""
    *lead, group_out, in_channels = kernels.shape
    grouped = kernels.reshape(*lead, group_out, groups, in_channels // groups)
    return jnp.swapaxes(grouped, -1, -3).reshape(*lead, in_channels // groups, groups * group_out)


def _input_dilated(
    conv: ConvFn,
    inputs: jax.Array,
    kernels: jax.Array,
    strides: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> jax.Array:
    """The full (uncropped) output: a stride-1 conv with the flipped kernel over the input dilated by ``strides``."""
    num_spatial = inputs.ndim - 2
    kernel_size = kernels.shape[-2 - num_spatial : -2]
    spatial_axes = tuple(range(kernels.ndim - 2 - num_spatial, kernels.ndim - 2))
    forward = jnp.flip(_forward_kernels(kernels, groups), axis=spatial_axes)
    reach = [d * (k - 1) for d, k in zip(dilation, kernel_size, strict=True)]
    return conv(inputs, forward, padding=[(r, r) for r in reach], input_dilation=strides, kernel_dilation=dilation)


def _sub_pixel(conv: ConvFn, inputs: jax.Array, kernels: jax.Array, strides: tuple[int, ...], groups: int) -> jax.Array:
    """The full output as ``prod(strides)`` phase convs in one: output ``s * q + r`` is
    ``sum_m inputs[q - m] * kernels[r + s * m]``, a stride-1 conv with the taps ``r + s * m`` reversed."""
    batch, *spatial, _ = inputs.shape
    *kernel_size, group_out, in_channels = kernels.shape[1:]
    num_spatial = len(spatial)
    phases = math.prod(strides)
    taps = [-(-k // s) for k, s in zip(kernel_size, strides, strict=True)]
    # Taps padded to a multiple of the stride, then split as (m, r) per dim: tap r + s * m.
    tap_pads = [(0, m * s - k) for m, s, k in zip(taps, strides, kernel_size, strict=True)]
    padded = jnp.pad(kernels, [(0, 0), *tap_pads, (0, 0), (0, 0)])
    split_sizes = [size for m, s in zip(taps, strides, strict=True) for size in (m, s)]
    split = padded.reshape(batch, *split_sizes, group_out, in_channels)
    split = jnp.flip(split, axis=tuple(1 + 2 * i for i in range(num_spatial)))
    # (B, m1, r1, m2, r2, ..., C_out // G, C_in) -> (B, m1, m2, ..., r1, r2, ..., C_out // G, C_in)
    order = [0, *(1 + 2 * i for i in range(num_spatial)), *(2 + 2 * i for i in range(num_spatial))]
    phased = jnp.transpose(split, [*order, split.ndim - 2, split.ndim - 1])
    # Phases become output channels inside each group: (B, *m, C_in // G, G * phases * C_out // G).
    phased = phased.reshape(batch, *taps, phases, group_out, groups, in_channels // groups)
    phased = jnp.moveaxis(phased, -2, -4)  # (B, *m, G, phases, C_out // G, C_in // G)
    forward = jnp.moveaxis(phased, -1, 1 + num_spatial).reshape(
        batch, *taps, in_channels // groups, groups * phases * group_out
    )
    out = conv(inputs, forward, padding=[(m - 1, m - 1) for m in taps])
    # Depth-to-space: (B, *q, G, r1, r2, ..., C_out // G) -> (B, q1, r1, q2, r2, ..., G, C_out // G).
    out_sizes = out.shape[1:-1]
    out = out.reshape(batch, *out_sizes, groups, *strides, group_out)
    interleaved = [0]
    for i in range(num_spatial):
        interleaved += [1 + i, num_spatial + 2 + i]
    out = jnp.transpose(out, [*interleaved, num_spatial + 1, out.ndim - 1])
    return out.reshape(batch, *(q * s for q, s in zip(out_sizes, strides, strict=True)), groups * group_out)


def _crop(full: jax.Array, padding: tuple[int, ...], out_spatial: tuple[int, ...]) -> jax.Array:
    """Output positions ``[padding, padding + out)`` of the full output; positions past its end, which no
    input reaches (``output_padding``), are zeros."""
    pads = [(0, 0)]
    slices: list[slice] = [slice(None)]
    for size, p, n in zip(full.shape[1:-1], padding, out_spatial, strict=True):
        pads.append((0, max(p + n - size, 0)))
        slices.append(slice(p, p + n))
    pads.append((0, 0))
    slices.append(slice(None))
    return jnp.pad(full, pads)[tuple(slices)]
