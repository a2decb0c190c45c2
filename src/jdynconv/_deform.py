"""Deformable convolution (Dai et al. 2017; DCNv2's mask, Zhu et al. 2019), N-d: :func:`deform_conv`.

Every kernel tap of every output position reads the input at its regular grid position plus a learned,
per-sample offset, multilinearly (:mod:`jdynconv._sampling`), optionally scaled by a mask; the sampled values
are then contracted with one shared kernel, as a convolution contracts its window.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jdynconv import _checks, _sampling
from jdynconv._lowering import batch_parallel

DataFormat = Literal["channels_last", "channels_first"]
DATA_FORMATS: tuple[str, ...] = ("channels_last", "channels_first")


def deform_conv(
    inputs: ArrayLike,
    offsets: ArrayLike,
    kernel: ArrayLike,
    bias: ArrayLike | None = None,
    *,
    mask: ArrayLike | None = None,
    strides: _checks.IntOrSequence = 1,
    padding: _checks.PaddingLike = 0,
    kernel_dilation: _checks.IntOrSequence = 1,
    feature_group_count: int = 1,
    data_format: DataFormat = "channels_last",
    precision: Any = None,
) -> jax.Array:
    """N-d deformable convolution (N = 1, 2, 3), torchvision's ``deform_conv2d`` generalised.

    For output position ``o``, kernel tap ``t`` and offset group ``g``, input channel ``c`` of group ``g``
    (``g = c // (C_in / G_off)``) is read at ``o * strides - pad_low + t * kernel_dilation + offset[o, g, t]``
    by multilinear interpolation with zeros outside the input, scaled by ``mask[o, g, t]`` if given, and the
    values are contracted with ``kernel`` as a convolution with ``feature_group_count`` groups contracts its
    window. With zero offsets and no mask this is ``jax.lax.conv_general_dilated``.

    ``data_format="channels_first"`` is torchvision's ``deform_conv2d(input, offset, weight, bias, stride,
    padding, dilation, mask)`` exactly, in 1-D and 3-D too. ``"channels_last"`` (Flax's layout) holds the same
    numbers with the channel axis last.

    Args:
      inputs: ``(B, *spatial, C_in)`` for ``"channels_last"``, ``(B, C_in, *spatial)`` for
        ``"channels_first"``.
      offsets: ``(B, *out_spatial, G_off * K * N)`` for ``"channels_last"``, ``(B, G_off * K * N,
        *out_spatial)`` for ``"channels_first"``, with ``K = prod(kernel_size)`` and N spatial dims; along
        the channel axis, offset group ``g``, tap ``t`` (row-major over the kernel's dims) and coordinate
        ``n`` (the first spatial dim first: ``(dy, dx)`` in 2-D) are at ``(g * K + t) * N + n``. The number
        of offset groups G_off is read from this size; it must divide ``C_in``.
      kernel: ``(*kernel_size, C_in // G, C_out)`` for ``"channels_last"`` (Flax's HWIO),
        ``(C_out, C_in // G, *kernel_size)`` for ``"channels_first"`` (PyTorch's OIHW).
      bias: ``(C_out,)`` or None.
      mask: ``(B, *out_spatial, G_off * K)`` (``"channels_last"``) or ``(B, G_off * K, *out_spatial)``
        (``"channels_first"``), tap ``t`` of group ``g`` at ``g * K + t``, used as given (DCNv2 passes a
        sigmoid); None for DCNv1.
      strides: an int or one int per spatial dim.
      padding: ``"SAME"``, ``"VALID"``, ``"CAUSAL"`` (1-D), an int, one int per spatial dim, or one
        ``(low, high)`` pair per spatial dim. Defaults to 0, as torchvision.
      kernel_dilation: an int or one int per spatial dim (PyTorch's ``dilation``).
      feature_group_count: G, as in ``jax.lax`` (PyTorch's ``groups``).
      data_format: ``"channels_last"`` or ``"channels_first"``.
      precision: of the contraction with ``kernel``, as in ``jax.lax``.

    Returns:
      ``(B, *out_spatial, C_out)`` for ``"channels_last"``, ``(B, C_out, *out_spatial)`` for
      ``"channels_first"``, ``out_spatial`` as for a convolution with the same arguments.

    At an integer sampling coordinate the derivative w.r.t. the offset is the one from above, as torchvision's
    kernels take it, on the border too: a point at coordinate ``-1`` (value 0) gets the derivative from the
    first pixel inside the input, and a point at coordinate ``size`` (value 0, every corner outside) gets 0.

    Derivatives are reverse mode (``jax.grad``, ``jax.vjp``, ``jax.jacrev``, grad of grad). Forward mode
    (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) works w.r.t. ``kernel`` and ``bias`` only: the sampling is a
    ``jax.custom_vjp``, so a tangent for ``inputs``, ``offsets`` or ``mask`` is a TypeError ("can't apply
    forward-mode autodiff (jvp) to a custom_vjp function"); take their Hessian as
    ``jax.jacrev(jax.jacrev(f))``.
    """
    config = _configure(
        inputs, offsets, kernel, bias, mask, strides, padding, kernel_dilation, feature_group_count, data_format
    )
    config.precision = precision
    inputs, offsets, kernel, bias, mask = config.arrays
    if config.channels_first:
        inputs, offsets = jnp.moveaxis(inputs, 1, -1), jnp.moveaxis(offsets, 1, -1)
        mask = None if mask is None else jnp.moveaxis(mask, 1, -1)
        kernel = jnp.moveaxis(kernel, (0, 1), (-1, -2))
    if config.batch == 0:
        out = jnp.zeros((0, *config.out_spatial, config.out_channels), inputs.dtype)
    else:
        batched = (inputs, offsets) if mask is None else (inputs, offsets, mask)

        def local(inputs: jax.Array, offsets: jax.Array, *rest: jax.Array) -> jax.Array:
            return _channels_last(config, inputs, offsets, rest[0] if mask is not None else None, rest[-1])

        out = batch_parallel.map_batch_shards(local, batched, (kernel,))
    if bias is not None:
        out = out + bias.astype(out.dtype).reshape((1,) * (out.ndim - 1) + (-1,))
    return jnp.moveaxis(out, -1, 1) if config.channels_first else out


class _Config:
    """Checked arrays and the static sizes of one call."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


def _channels_last(
    config: _Config, inputs: jax.Array, offsets: jax.Array, mask: jax.Array | None, kernel: jax.Array
) -> jax.Array:
    batch = inputs.shape[0]
    out_spatial = config.out_spatial
    taps, offset_groups, num_spatial = config.taps, config.offset_groups, config.num_spatial
    compute = _sampling._compute_dtype(inputs.dtype)
    # Regular grid: o * stride - pad_low + t * dilation, (out_spatial..., K, N); + offset in one rounding.
    grid = _grid(out_spatial, config.kernel_size, config.strides, config.pads, config.kernel_dilation)
    offsets = offsets.reshape(batch, *out_spatial, offset_groups, taps, num_spatial)
    offsets = jnp.swapaxes(offsets, -3, -2)  # (B, *out, K, G_off, N)
    positions = grid[None, ..., None, :].astype(compute) + offsets.astype(compute)
    if mask is not None:
        mask = jnp.swapaxes(mask.reshape(batch, *out_spatial, offset_groups, taps), -2, -1)
    grouped = inputs.reshape(*inputs.shape[:-1], offset_groups, config.in_channels // offset_groups)
    groups = config.feature_group_count
    kernel = kernel.reshape(taps, config.in_channels // groups, groups, config.out_channels // groups)

    def rows(positions: jax.Array, mask: jax.Array | None) -> jax.Array:
        """The output at the rows (first output dim) of ``positions``: sample, then contract."""
        columns = _sampling.sample(grouped, positions, mask)  # (B, rows, ..., K, G_off, Cg)
        if groups == 1:
            columns = columns.reshape(-1, taps * config.in_channels)
            out = jnp.matmul(columns, kernel.reshape(columns.shape[-1], -1), precision=config.precision)
        else:
            columns = columns.reshape(*columns.shape[:-3], taps, groups, config.in_channels // groups)
            out = jnp.einsum("...kgc,kcgf->...gf", columns, kernel, precision=config.precision)
        return out.reshape(batch, *positions.shape[1 : 1 + num_spatial], config.out_channels)

    column_bytes = batch * math.prod(out_spatial) * taps * config.in_channels * inputs.dtype.itemsize
    chunks = math.ceil(column_bytes / COLUMN_BYTES)
    if chunks <= 1:
        return rows(positions, mask)
    return _by_row_chunks(jax.checkpoint(rows), positions, mask, min(chunks, out_spatial[0]))


# The sampled columns (B, *out_spatial, K, C_in) are the op's one K-times-the-input array; above this size
# they are made and contracted a block of output rows at a time (and made again in the backward pass).
COLUMN_BYTES = 256 * 2**20


def _by_row_chunks(fn: Any, positions: jax.Array, mask: jax.Array | None, chunks: int) -> jax.Array:
    """``fn(positions, mask)`` computed over ``chunks`` blocks of the first output dim in a loop."""
    size = positions.shape[1]
    block = math.ceil(size / chunks)
    chunks = math.ceil(size / block)
    extra = chunks * block - size
    # Rows past the end sample far outside the input (zero weights); their outputs are dropped.
    positions = jnp.pad(positions, ((0, 0), (0, extra)) + ((0, 0),) * (positions.ndim - 2), constant_values=-4)
    split = lambda a: jnp.moveaxis(a.reshape(a.shape[0], chunks, block, *a.shape[2:]), 1, 0)  # noqa: E731
    if mask is None:
        out = jax.lax.map(lambda p: fn(p, None), split(positions))
    else:
        mask = jnp.pad(mask, ((0, 0), (0, extra)) + ((0, 0),) * (mask.ndim - 2))
        out = jax.lax.map(lambda pm: fn(*pm), (split(positions), split(mask)))
    out = jnp.moveaxis(out, 0, 1)
    return out.reshape(out.shape[0], chunks * block, *out.shape[3:])[:, :size]


def _grid(
    out_spatial: tuple[int, ...],
    kernel_size: tuple[int, ...],
    strides: tuple[int, ...],
    pads: _checks.Pads,
    kernel_dilation: tuple[int, ...],
) -> jax.Array:
    """``(*out_spatial, K, N)`` int32: each tap's undeformed sampling position."""
    axes = []
    for size, k, s, (low, _), d in zip(out_spatial, kernel_size, strides, pads, kernel_dilation, strict=True):
        axes.append((jnp.arange(size) * s - low, jnp.arange(k) * d))
    outs = jnp.meshgrid(*(o for o, _ in axes), indexing="ij")
    taps = jnp.meshgrid(*(t for _, t in axes), indexing="ij")
    out_grid = jnp.stack(outs, axis=-1).reshape(*out_spatial, 1, len(axes))
    tap_grid = jnp.stack(taps, axis=-1).reshape(math.prod(kernel_size), len(axes))
    return (out_grid + tap_grid[(None,) * len(out_spatial)]).astype(jnp.int32)


def _configure(
    inputs: Any,
    offsets: Any,
    kernel: Any,
    bias: Any,
    mask: Any,
    strides: Any,
    padding: Any,
    kernel_dilation: Any,
    feature_group_count: Any,
    data_format: Any,
) -> _Config:
    if data_format not in DATA_FORMATS:
        raise ValueError(f"`data_format` must be one of {DATA_FORMATS}, got {data_format!r}.")
    channels_first = data_format == "channels_first"
    inputs = _checks.as_array("inputs", inputs)
    offsets = _checks.as_array("offsets", offsets)
    kernel = _checks.as_array("kernel", kernel)
    for name, array in (("inputs", inputs), ("offsets", offsets), ("kernel", kernel)):
        _checks.check_float_dtype(name, array)
    input_layout = "(B, C_in, *spatial)" if channels_first else "(B, *spatial, C_in)"
    _checks.check_rank("inputs", inputs.shape, (3, 4, 5), f"{input_layout} with 1 to 3 spatial dims")
    num_spatial = inputs.ndim - 2
    kernel_layout = "(C_out, C_in // G, *kernel_size)" if channels_first else "(*kernel_size, C_in // G, C_out)"
    _checks.check_rank("kernel", kernel.shape, inputs.ndim, f"{kernel_layout} for {num_spatial}-D `inputs`")
    for name, array in (("offsets", offsets), ("kernel", kernel)):
        if array.dtype != inputs.dtype:
            raise TypeError(f"`{name}` must have the dtype of `inputs` ({inputs.dtype}), got {array.dtype}.")
    if channels_first:
        batch, in_channels, *spatial = inputs.shape
        out_channels, group_in_channels, *kernel_size = kernel.shape
    else:
        batch, *spatial, in_channels = inputs.shape
        *kernel_size, group_in_channels, out_channels = kernel.shape
    if in_channels == 0:
        raise ValueError(f"`inputs` {input_layout} must have C_in >= 1 channels, got shape {tuple(inputs.shape)}.")
    kernel_size = tuple(kernel_size)
    _checks.check_positive_int("feature_group_count", feature_group_count)
    groups = int(feature_group_count)
    if in_channels % groups or group_in_channels * groups != in_channels or out_channels % groups:
        raise ValueError(
            f"`kernel` must have C_in // G = {in_channels} // {groups} input channels and a multiple of "
            f"`feature_group_count` (={groups}) output channels for `inputs` with {in_channels} channels, "
            f"got kernel shape {tuple(kernel.shape)}."
        )
    if any(k < 1 for k in kernel_size):
        raise ValueError(f"`kernel` must have every kernel size >= 1, got shape {tuple(kernel.shape)}.")
    strides_t = _checks.canonicalize_ints(strides, num_spatial, "strides")
    dilation_t = _checks.canonicalize_ints(kernel_dilation, num_spatial, "kernel_dilation")
    pads = _checks.canonicalize_padding(
        padding,
        spatial_shape=spatial,
        kernel_size=kernel_size,
        strides=strides_t,
        kernel_dilation=dilation_t,
        input_dilation=(1,) * num_spatial,
    )
    out_spatial = _checks.conv_output_shape(
        spatial,
        kernel_size,
        strides=strides_t,
        pads=pads,
        kernel_dilation=dilation_t,
        input_dilation=(1,) * num_spatial,
    )
    taps = math.prod(kernel_size)
    offset_layout = "(B, G_off * K * N, *out_spatial)" if channels_first else "(B, *out_spatial, G_off * K * N)"
    offset_groups = _offset_groups(
        "offsets", offsets.shape, batch, out_spatial, taps * num_spatial, channels_first, offset_layout, in_channels
    )
    if mask is not None:
        mask = _checks.as_array("mask", mask)
        _checks.check_float_dtype("mask", mask)
        if mask.dtype != inputs.dtype:
            raise TypeError(f"`mask` must have the dtype of `inputs` ({inputs.dtype}), got {mask.dtype}.")
        mask_layout = "(B, G_off * K, *out_spatial)" if channels_first else "(B, *out_spatial, G_off * K)"
        mask_groups = _offset_groups(
            "mask", mask.shape, batch, out_spatial, taps, channels_first, mask_layout, in_channels
        )
        if mask_groups != offset_groups:
            raise ValueError(
                f"`mask` must have G_off * K = {offset_groups} * {taps} channels, as `offsets` has "
                f"{offset_groups} offset groups, got shape {tuple(mask.shape)}."
            )
    if bias is not None:
        bias = _checks.as_array("bias", bias)
        _checks.check_float_dtype("bias", bias)
        if bias.shape != (out_channels,):
            raise ValueError(f"`bias` must have shape ({out_channels},), got shape {tuple(bias.shape)}.")
        if bias.dtype != inputs.dtype:
            raise TypeError(f"`bias` must have the dtype of `inputs` ({inputs.dtype}), got {bias.dtype}.")
    return _Config(
        arrays=(inputs, offsets, kernel, bias, mask),
        channels_first=channels_first,
        batch=batch,
        num_spatial=num_spatial,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel_size,
        taps=taps,
        strides=strides_t,
        pads=pads,
        kernel_dilation=dilation_t,
        feature_group_count=groups,
        offset_groups=offset_groups,
        out_spatial=out_spatial,
        precision=None,
    )


def _offset_groups(
    name: str,
    shape: tuple[int, ...],
    batch: int,
    out_spatial: tuple[int, ...],
    per_group: int,
    channels_first: bool,
    layout: str,
    in_channels: int,
) -> int:
    """The number of offset groups ``shape`` (offsets or mask) holds, or an error naming ``name``."""
    _checks.check_rank(name, shape, 2 + len(out_spatial), layout)
    channels = shape[1] if channels_first else shape[-1]
    spatial = tuple(shape[2:] if channels_first else shape[1:-1])
    if shape[0] != batch or spatial != out_spatial or channels % per_group or channels == 0:
        raise ValueError(
            f"`{name}` must have shape {layout} = batch {batch}, out_spatial {out_spatial} and a positive "
            f"multiple of {per_group} channels, got shape {tuple(shape)}."
        )
    groups = channels // per_group
    if in_channels % groups:
        raise ValueError(
            f"`{name}` has {groups} offset groups ({channels} channels / {per_group}), which must divide the "
            f"{in_channels} input channels; got shape {tuple(shape)}."
        )
    return groups
