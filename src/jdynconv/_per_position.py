"""Per-position convolution, N-d: :func:`per_position_conv`, a kernel for every output position.

Involution (Li et al. 2021) and the lightweight and dynamic convolutions of Wu et al. (2019) generate one
``kernel_size`` window per output position and channel group from the input and apply it to the window of the
input under it, shared by the group's channels. Written as ``prod(kernel_size)`` products of strided slices of the
padded input with one tap of the kernels each, summed: XLA fuses them into one loop, so the ``K``-times unfold
that the originals build (``nn.Unfold``, fairseq's ``unfold1d``) is never made. The derivatives are a
``jax.custom_vjp`` whose residuals are the inputs and kernels only: the input gradient is again such a sum (the
cotangent against the kernels moved to the input positions), the kernel gradient per-tap reductions over a group's
channels, or in 1-D (stride 1, wide enough groups) batched matrix products over blocks of output positions.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jdynconv import _checks
from jdynconv._lowering import batch_parallel

DataFormat = Literal["channels_last", "channels_first"]
DATA_FORMATS: tuple[str, ...] = ("channels_last", "channels_first")


def per_position_conv(
    inputs: ArrayLike,
    kernels: ArrayLike,
    *,
    strides: _checks.IntOrSequence = 1,
    padding: _checks.PaddingLike = "SAME",
    kernel_dilation: _checks.IntOrSequence = 1,
    data_format: DataFormat = "channels_last",
) -> jax.Array:
    """N-d convolution (N = 1, 2, 3) with its own kernel at every output position, shared within channel groups.

    ``out[b, o, c] = sum_t kernels[b, o, g(c), t] * pad(inputs)[b, o * strides + t * kernel_dilation, c]``

    over the taps ``t`` of the kernel window, with ``g(c) = c // (C / G)``: the ``C / G`` contiguous channels of
    group ``g`` share its kernel (involution's ``group_channels``, fairseq's heads). ``pad`` adds zeros as
    ``padding`` says. Channels are not mixed: the output has the input's ``C`` channels.

    Args:
      inputs: ``(B, *spatial, C)`` for ``"channels_last"`` (Flax's layout), ``(B, C, *spatial)`` for
        ``"channels_first"`` (PyTorch's).
      kernels: ``(B, *out_spatial, G, *kernel_size)`` for ``"channels_last"``, ``(B, G, *kernel_size,
        *out_spatial)`` for ``"channels_first"`` (involution's ``weight.view(b, G, K, K, h, w)``). The number of
        groups ``G`` must divide ``C``; ``kernel_size`` and ``G`` are read from this shape, and ``out_spatial``
        must be the size the convolution arithmetic gives.
      strides: an int or one int per spatial dim.
      padding: ``"SAME"`` (the default, as Flax's ``nn.Conv``), ``"VALID"``, ``"CAUSAL"`` (1-D: ``(K - 1) *
        kernel_dilation`` zeros before the start, so output ``t`` sees inputs ``<= t``), an int, one int per
        spatial dim, or one ``(low, high)`` pair per spatial dim. fairseq's ``padding_l`` is ``[(padding_l,
        K - 1 - padding_l)]``; involution's is ``(K - 1) // 2``.
      kernel_dilation: an int or one int per spatial dim.
      data_format: ``"channels_last"`` or ``"channels_first"``.

    Returns:
      ``(B, *out_spatial, C)`` (``"channels_last"``) or ``(B, C, *out_spatial)`` (``"channels_first"``), in the
      dtype of ``inputs`` and ``kernels`` (which must agree). Half-precision products are summed in float32.
    """
    config = _configure(inputs, kernels, strides, padding, kernel_dilation, data_format)
    inputs, kernels = config.inputs, config.kernels
    num_spatial = config.num_spatial
    if config.channels_first:
        inputs = jnp.moveaxis(inputs, 1, -1)
        # (B, G, *K, *out) -> (B, *out, G, *K)
        order = (0, *range(2 + num_spatial, 2 + 2 * num_spatial), 1, *range(2, 2 + num_spatial))
        kernels = jnp.transpose(kernels, order)
    if config.batch == 0:
        out = jnp.zeros((0, *config.out_spatial, config.channels), inputs.dtype)
    else:

        def local(inputs: jax.Array, kernels: jax.Array) -> jax.Array:
            return _summed_taps(inputs, kernels, config.strides, config.pads, config.kernel_dilation)

        out = batch_parallel.map_batch_shards(local, (inputs, kernels))
    return jnp.moveaxis(out, -1, 1) if config.channels_first else out


def _taps(
    inputs: jax.Array,
    kernels: jax.Array,
    strides: tuple[int, ...],
    pads: _checks.Pads,
    kernel_dilation: tuple[int, ...],
) -> jax.Array:
    """``sum_t window_t(pad(inputs)) * kernels[..., t]``, channels-last: ``(B, *out_spatial, C)``."""
    batch, *spatial, channels = inputs.shape
    out_spatial = kernels.shape[1 : 1 + len(spatial)]
    groups = kernels.shape[1 + len(spatial)]
    kernel_size = kernels.shape[2 + len(spatial) :]
    compute = jnp.float32 if jnp.finfo(inputs.dtype).bits < 32 else inputs.dtype
    padded = jnp.pad(inputs, ((0, 0), *pads, (0, 0)))
    out = None
    for tap in itertools.product(*(range(k) for k in kernel_size)):
        window = (
            _window(padded, tap, out_spatial, strides, kernel_dilation)
            .reshape(batch, *out_spatial, groups, channels // groups)
            .astype(compute)
        )
        weight = kernels[(Ellipsis, *tap)].astype(compute)[..., None]  # (B, *out, G, 1)
        term = window * weight
        out = term if out is None else out + term
    return out.reshape(batch, *out_spatial, channels).astype(inputs.dtype)


def _summed_taps(
    inputs: jax.Array,
    kernels: jax.Array,
    strides: tuple[int, ...],
    pads: _checks.Pads,
    kernel_dilation: tuple[int, ...],
) -> jax.Array:
    """The channels-last op with its own derivatives (:func:`_backward`)."""
    return _conv(inputs, kernels, (strides, pads, kernel_dilation))


Geometry = tuple[tuple[int, ...], _checks.Pads, tuple[int, ...]]  # strides, pads, kernel_dilation


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(inputs: jax.Array, kernels: jax.Array, geometry: Geometry) -> jax.Array:
    return _taps(inputs, kernels, *geometry)


def _forward(inputs: jax.Array, kernels: jax.Array, geometry: Geometry) -> tuple[jax.Array, Any]:
    return _taps(inputs, kernels, *geometry), (inputs, kernels)


def _backward(geometry: Geometry, residuals: Any, cotangent: jax.Array) -> tuple[jax.Array, jax.Array]:
    inputs, kernels = residuals
    return _input_grad(cotangent, kernels, geometry, inputs), _kernel_grad(inputs, cotangent, geometry, kernels)


_conv.defvjp(_forward, _backward)


def _input_grad(cotangent: jax.Array, kernels: jax.Array, geometry: Geometry, inputs: jax.Array) -> jax.Array:
    """``d inputs``: itself a per-position convolution, of the cotangent with the kernels moved to the inputs.

    Input position ``p`` (of the padded input) received ``kernels[o, t] * inputs[p]`` for every ``(o, t)`` with
    ``o * s + t * d = p``. With the cotangent and the kernels spread to the padded input's grid (zeros between
    strided positions) and padded by ``(K - 1) d`` in front, ``d padded[p] = sum_t' up(cotangent)[p + t' d] *
    moved[p, t']`` with ``moved[p, t'] = up(kernels)[p + t' d, K - 1 - t']``: the forward's sum of products
    over stride-1 windows, so it runs as fast as the forward pass (autodiff would sum K transposed slices).
    """
    strides, pads, dilation = geometry
    num_spatial = len(strides)
    spatial = inputs.shape[1:-1]
    out_spatial = kernels.shape[1 : 1 + num_spatial]
    kernel_size = kernels.shape[2 + num_spatial :]
    padded = [n + lo + hi for n, (lo, hi) in zip(spatial, pads, strict=True)]
    spread = [
        ((k - 1) * d, p - (o - 1) * s - 1, s - 1)
        for k, d, p, o, s in zip(kernel_size, dilation, padded, out_spatial, strides, strict=True)
    ]
    zero = (0, 0, 0)
    cotangent_up = lax.pad(cotangent, jnp.zeros((), cotangent.dtype), [zero, *spread, zero])
    kernels_up = lax.pad(kernels, jnp.zeros((), kernels.dtype), [zero, *spread, zero] + [zero] * num_spatial)
    # Only the input's own positions p in [low, low + size) of the padded grid get a gradient: the windows start
    # there (the padding's gradient is never computed).
    lows = [lo for lo, _ in pads]
    moved = []
    for tap in itertools.product(*(range(k) for k in kernel_size)):
        start = (0, *(lo + t * d for lo, t, d in zip(lows, tap, dilation, strict=True)), 0)
        limit = (
            kernels_up.shape[0],
            *(a + n for a, n in zip(start[1:-1], spatial, strict=True)),
            kernels.shape[-1 - num_spatial],
        )
        source = tuple(k - 1 - t for k, t in zip(kernel_size, tap, strict=True))
        moved.append(lax.slice(kernels_up[(Ellipsis, *source)], start, limit))
    moved = jnp.stack(moved, axis=-1).reshape(*moved[0].shape, *kernel_size)
    windows = tuple(
        slice(lo, lo + n + (k - 1) * d) for lo, n, k, d in zip(lows, spatial, kernel_size, dilation, strict=True)
    )
    ones = (1,) * num_spatial
    return _taps(cotangent_up[(slice(None), *windows)], moved, ones, ((0, 0),) * num_spatial, dilation)


def _kernel_grad(inputs: jax.Array, cotangent: jax.Array, geometry: Geometry, kernels: jax.Array) -> jax.Array:
    """``d kernels[o, g, t] = sum_{c in g} cotangent[o, c] * pad(inputs)[o * s + t * d, c]``."""
    strides, pads, dilation = geometry
    num_spatial = len(strides)
    batch, *out_spatial, groups = kernels.shape[: 2 + num_spatial]
    kernel_size = kernels.shape[2 + num_spatial :]
    compute = jnp.float32 if jnp.finfo(inputs.dtype).bits < 32 else inputs.dtype
    padded = jnp.pad(inputs, ((0, 0), *pads, (0, 0))).astype(compute)
    channels = inputs.shape[-1]
    cotangent = cotangent.astype(compute).reshape(batch, *out_spatial, groups, channels // groups)
    group_channels = channels // groups
    if (
        num_spatial == 1
        and strides == (1,)
        and BLOCK + (kernel_size[0] - 1) * dilation[0] <= kernel_size[0] * group_channels
    ):
        # The blocks' products are then no larger than the K-times unfold (and measured faster); else the K
        # reductions, which need no more than the inputs.
        grad = _kernel_grad_1d(padded, cotangent, kernel_size[0], dilation[0])
    else:
        grad = []
        for tap in itertools.product(*(range(k) for k in kernel_size)):
            window = _window(padded, tap, out_spatial, strides, dilation)
            grad.append(jnp.sum(window.reshape(cotangent.shape) * cotangent, axis=-1))
        grad = jnp.stack(grad, axis=-1).reshape(kernels.shape)
    return grad.astype(kernels.dtype)


# Output positions per block of the 1-D kernel gradient's products (:func:`_kernel_grad_1d`): 32 against 16 and 64
# in the probe on docs/performance.md ("Probes behind the lowerings' constants").
BLOCK = 32


def _kernel_grad_1d(padded: jax.Array, cotangent: jax.Array, kernel_size: int, dilation: int) -> jax.Array:
    """The 1-D, stride-1 kernel gradient as batched matrix products over blocks of output positions.

    For a block of ``BLOCK`` outputs and the ``BLOCK + (K - 1) d`` inputs they read, the products of every
    output's cotangent with every input (over a group's channels) are one matmul; the gradient is the band
    ``[o, o + t d]`` of it. ``K`` separate reductions over the group's channels instead ran 1.1x-1.2x slower at
    K = 3 and 2x-9x slower at K = 7 to 31 (fairseq's shapes; the probe on ``docs/performance.md``).
    """
    batch, out_size, groups, group_channels = cotangent.shape
    block = min(out_size, BLOCK)
    blocks = -(-out_size // block)
    span = block + (kernel_size - 1) * dilation
    extra = blocks * block - out_size
    cotangent = jnp.pad(cotangent, ((0, 0), (0, extra), (0, 0), (0, 0)))
    padded = jnp.pad(padded, ((0, 0), (0, extra), (0, 0)))
    padded = padded.reshape(batch, -1, groups, group_channels)
    windows = jnp.stack([lax.slice_in_dim(padded, i * block, i * block + span, axis=1) for i in range(blocks)], 1)
    cotangent = cotangent.reshape(batch, blocks, block, groups, group_channels)
    products = jnp.einsum("bnogc,bnqgc->bngoq", cotangent, windows, precision=lax.Precision.HIGHEST)
    band = jnp.arange(block)[:, None] + jnp.arange(kernel_size)[None, :] * dilation  # (block, K)
    grad = jnp.take_along_axis(products, jnp.broadcast_to(band, (*products.shape[:3], block, kernel_size)), axis=-1)
    grad = jnp.transpose(grad, (0, 1, 3, 2, 4)).reshape(batch, blocks * block, groups, kernel_size)
    return grad[:, :out_size]


def _window(
    padded: jax.Array, tap: tuple[int, ...], out_spatial: Any, strides: tuple[int, ...], dilation: tuple[int, ...]
) -> jax.Array:
    """The inputs tap ``tap`` reads for every output position: ``padded[:, o * s + t * d, :]``."""
    start = (0, *(t * d for t, d in zip(tap, dilation, strict=True)), 0)
    limit = (
        padded.shape[0],
        *(a + (n - 1) * s + 1 for a, n, s in zip(start[1:-1], out_spatial, strides, strict=True)),
        padded.shape[-1],
    )
    return lax.slice(padded, start, limit, (1, *strides, 1))


class _Config:
    """Checked arrays and the static sizes of one call."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


def _configure(
    inputs: Any, kernels: Any, strides: Any, padding: Any, kernel_dilation: Any, data_format: Any
) -> _Config:
    if data_format not in DATA_FORMATS:
        raise ValueError(f"`data_format` must be one of {DATA_FORMATS}, got {data_format!r}.")
    channels_first = data_format == "channels_first"
    inputs = _checks.as_array("inputs", inputs)
    kernels = _checks.as_array("kernels", kernels)
    _checks.check_float_dtype("inputs", inputs)
    _checks.check_float_dtype("kernels", kernels)
    input_layout = "(B, C, *spatial)" if channels_first else "(B, *spatial, C)"
    _checks.check_rank("inputs", inputs.shape, (3, 4, 5), f"{input_layout} with 1 to 3 spatial dims")
    num_spatial = inputs.ndim - 2
    kernel_layout = "(B, G, *kernel_size, *out_spatial)" if channels_first else "(B, *out_spatial, G, *kernel_size)"
    _checks.check_rank("kernels", kernels.shape, 2 * num_spatial + 2, f"{kernel_layout} for {num_spatial}-D `inputs`")
    if kernels.dtype != inputs.dtype:
        raise TypeError(f"`kernels` must have the dtype of `inputs` ({inputs.dtype}), got {kernels.dtype}.")
    if channels_first:
        batch, channels, *spatial = inputs.shape
        kernel_batch, groups, *rest = kernels.shape
        kernel_size, kernel_out = tuple(rest[:num_spatial]), tuple(rest[num_spatial:])
    else:
        batch, *spatial, channels = inputs.shape
        kernel_batch, *rest = kernels.shape
        kernel_out, groups, kernel_size = tuple(rest[:num_spatial]), rest[num_spatial], tuple(rest[num_spatial + 1 :])
    if channels == 0:
        raise ValueError(f"`inputs` {input_layout} must have C >= 1 channels, got shape {tuple(inputs.shape)}.")
    if groups == 0 or channels % groups:
        raise ValueError(
            f"`kernels` {kernel_layout} must have a number of groups G that divides the {channels} channels of "
            f"`inputs`, got G = {groups} (kernels shape {tuple(kernels.shape)})."
        )
    if any(k < 1 for k in kernel_size):
        raise ValueError(f"`kernels` must have every kernel size >= 1, got shape {tuple(kernels.shape)}.")
    strides_t = _checks.canonicalize_ints(strides, num_spatial, "strides")
    dilation_t = _checks.canonicalize_ints(kernel_dilation, num_spatial, "kernel_dilation")
    ones = (1,) * num_spatial
    pads = _checks.canonicalize_padding(
        padding,
        spatial_shape=spatial,
        kernel_size=kernel_size,
        strides=strides_t,
        kernel_dilation=dilation_t,
        input_dilation=ones,
    )
    out_spatial = _checks.conv_output_shape(
        spatial, kernel_size, strides=strides_t, pads=pads, kernel_dilation=dilation_t, input_dilation=ones
    )
    if kernel_batch != batch or kernel_out != out_spatial:
        raise ValueError(
            f"`kernels` must have shape {kernel_layout} with batch {batch} and out_spatial {out_spatial} (the "
            f"output of `inputs` {tuple(inputs.shape)} with kernel_size {kernel_size}, strides {strides_t}, "
            f"padding {pads}, kernel_dilation {dilation_t}), got shape {tuple(kernels.shape)}."
        )
    return _Config(
        inputs=inputs,
        kernels=kernels,
        channels_first=channels_first,
        batch=batch,
        channels=channels,
        num_spatial=num_spatial,
        strides=strides_t,
        pads=pads,
        kernel_dilation=dilation_t,
        out_spatial=out_spatial,
        taps=math.prod(kernel_size),
    )
