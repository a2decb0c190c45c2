"""StyleGAN2's modulated convolution (NVIDIA's ``modulated_conv2d`` with ``conv2d_resample``), N-d.

One shared kernel, scaled per sample and input channel by a style and (optionally) demodulated per sample
and output channel, with 2x-style up- or down-sampling through a FIR filter. Two execution paths compute
the same function:

- **fused**: per-sample kernels, one :func:`jdynconv.per_sample_conv` (or its transposed form for ``up``);
- **non-fused**: the styles scale the activations, one shared ``lax`` conv runs for the whole batch, the
  demodulation scales its output.

Both are batch-parallel under SPMD: the per-sample path through ``per_sample_conv``, the shared path
because XLA partitions a shared-kernel conv along a sharded batch by itself.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jdynconv import _checks, _resample, _transpose, functional
from jdynconv._lowering import canonical

Fused = bool | Literal["auto"]

DEFAULT_RESAMPLE_FILTER: tuple[float, ...] = (1.0, 3.0, 3.0, 1.0)


def modulated_conv(
    inputs: ArrayLike,
    kernel: ArrayLike,
    styles: ArrayLike,
    *,
    demodulate: bool = True,
    up: int = 1,
    down: int = 1,
    padding: _checks.PaddingLike = 0,
    resample_filter: ArrayLike = DEFAULT_RESAMPLE_FILTER,
    flip_weight: bool | None = True,
    flip_filter: bool = False,
    fused: Fused = "auto",
    noise: ArrayLike | None = None,
    epsilon: float = 1e-8,
    data_format: functional.DataFormat = "channels_last",
    precision: Any = None,
    method: functional.Method = "auto",
) -> jax.Array:
    """N-d (N = 1, 2, 3) modulated convolution, as NVIDIA's StyleGAN2 ``modulated_conv2d``.

    Per sample ``b``: ``w_b[..., i, o] = kernel[..., i, o] * styles[b, i]``; with ``demodulate``,
    ``w_b[..., i, o] *= rsqrt(sum_{taps, i} w_b[..., i, o] ** 2 + epsilon)``; then ``conv2d_resample``:
    ``up > 1`` is a stride-``up`` transposed conv followed by the FIR filter (gain ``up ** N``),
    ``down > 1`` the FIR filter followed by a stride-``down`` conv, with NVIDIA's padding arithmetic
    (``padding`` is applied once, around the up-sampled input); then ``noise`` is added.

    Args:
      inputs: ``(B, *spatial, C_in)`` for ``"channels_last"``, ``(B, C_in, *spatial)`` for ``"channels_first"``.
      kernel: the shared kernel: ``(*kernel_size, C_in, C_out)`` for ``"channels_last"`` (Flax's HWIO),
        ``(C_out, C_in, *kernel_size)`` for ``"channels_first"`` (PyTorch's ``weight``). Any float dtype;
        the per-sample kernels are computed in it and cast to the inputs' dtype, as NVIDIA's.
      styles: ``(B, C_in)``, the dtype of ``kernel``.
      demodulate: normalise each output channel's per-sample kernel to unit L2 norm.
      up: up-sampling factor (1 or more); ``up`` and ``down`` cannot both exceed 1.
      down: down-sampling factor (1 or more).
      padding: an int, one int per spatial dim, or one ``(low, high)`` pair per spatial dim (negative crops), in
        the order of the spatial dims (H, then W: NVIDIA's lists give x first, ``[x0, x1, y0, y1]``).
      resample_filter: the FIR filter for ``up``/``down``: 1-D taps (separable) or an N-d array, normalised to
        sum 1 (NVIDIA's ``setup_filter``); the default is StyleGAN2's ``[1, 3, 3, 1]``.
      flip_weight: NVIDIA's flag: True runs a cross-correlation (``lax``'s and PyTorch's ``conv``), False a
        true convolution (the kernel flipped); None is ``up == 1``, what NVIDIA's ``SynthesisLayer`` passes (and
        what :class:`jdynconv.linen.ModulatedConv`'s None means).
      flip_filter: False convolves with the FIR filter, True cross-correlates (NVIDIA's ``flip_filter``).
      fused: True for per-sample kernels, False to scale the activations around one shared conv; "auto"
        chooses by :func:`use_fused`.
      noise: added to the output: ``(B, *out_spatial, 1 or C_out)`` (``"channels_last"``) or
        ``(B, 1 or C_out, *out_spatial)``.
      epsilon: added to the squared norm before the reciprocal square root (NVIDIA's 1e-8).
      data_format: ``"channels_last"`` or ``"channels_first"``.
      precision: passed to the convs, as in ``jax.lax``.
      method: the :func:`jdynconv.per_sample_conv` lowering of the fused path.

    Returns:
      ``(B, *out_spatial, C_out)`` (``"channels_last"``) or ``(B, C_out, *out_spatial)``, in the inputs' dtype;
      with ``padding`` ``(low, high)``: ``size * up + low + high - kernel_size + 1`` per dim for ``up``,
      ``(size + low + high - kernel_size + 1) // down`` for ``down``, ``size + low + high - kernel_size + 1``
      otherwise (NVIDIA's sizes).

    Half-precision inputs (float16, bfloat16) with ``demodulate`` take NVIDIA's pre-normalisation: the kernel
    scaled by ``1 / sqrt(fan_in)`` over its largest magnitude per output channel and the styles over their
    largest magnitude per sample, which demodulation cancels, so the scaled activations of the non-fused path
    cannot overflow (the fused path builds its kernels in the kernel's dtype, demodulated, before the cast).
    The demodulation's sum of squares and (in the layer) the affine run at ``Precision.HIGHEST``: they are
    small, and NVIDIA computes them in float32.
    """
    if data_format not in functional.DATA_FORMATS:
        raise ValueError(f"`data_format` must be one of {functional.DATA_FORMATS}, got {data_format!r}.")
    if fused not in (True, False, "auto"):
        raise ValueError(f'`fused` must be True, False or "auto", got {fused!r}.')
    if method not in functional.METHODS:  # checked here: the non-fused path never reaches per_sample_conv's check
        raise ValueError(f"`method` must be one of {functional.METHODS}, got {method!r}.")
    inputs = _checks.as_array("inputs", inputs)
    kernel = _checks.as_array("kernel", kernel)
    styles = _checks.as_array("styles", styles)
    for name, array in (("inputs", inputs), ("kernel", kernel), ("styles", styles)):
        _checks.check_float_dtype(name, array)
    channels_first = data_format == "channels_first"
    input_layout = "(B, C_in, *spatial)" if channels_first else "(B, *spatial, C_in)"
    _checks.check_rank("inputs", inputs.shape, (3, 4, 5), f"{input_layout} with 1 to 3 spatial dims")
    num_spatial = inputs.ndim - 2
    kernel_layout = "(C_out, C_in, *kernel_size)" if channels_first else "(*kernel_size, C_in, C_out)"
    _checks.check_rank("kernel", kernel.shape, num_spatial + 2, f"{kernel_layout} for {num_spatial}-D `inputs`")
    given_kernel = tuple(kernel.shape)
    if channels_first:
        inputs = jnp.moveaxis(inputs, 1, -1)
        kernel = jnp.moveaxis(kernel, (0, 1), (-1, -2))
    batch, *spatial, in_channels = inputs.shape
    *kernel_size, kernel_in, _ = kernel.shape
    if kernel_in != in_channels:
        raise ValueError(
            f"`kernel` must have C_in = {in_channels} (the channels of `inputs`), got kernel shape {given_kernel}."
        )
    if styles.shape != (batch, in_channels):
        raise ValueError(
            f"`styles` must have shape ({batch}, {in_channels}) (batch, C_in of `inputs`), got {tuple(styles.shape)}."
        )
    if styles.dtype != kernel.dtype:
        raise TypeError(f"`styles` must have the dtype of `kernel` ({kernel.dtype}), got {styles.dtype}.")
    check_resampling(up, down)
    _checks.check_positive_number("epsilon", epsilon, allow_zero=True)
    flip_weight = resolve_flip_weight(flip_weight, up)
    pads = _explicit_pads(padding, num_spatial)
    taps = _resample.setup_filter(resample_filter, num_spatial=num_spatial)
    resample = _Resample(up, down, taps, flip_weight, flip_filter)
    out_spatial = resample.output_spatial_shape(spatial, kernel_size, pads)
    if fused == "auto":
        fused = use_fused(up, down, math.prod(out_spatial))

    if inputs.dtype.itemsize <= 2 and demodulate:
        fan_in = in_channels * math.prod(kernel_size)
        peak = jnp.max(jnp.abs(kernel), axis=tuple(range(num_spatial + 1)), keepdims=True)
        kernel = kernel * (1 / math.sqrt(fan_in) / peak)
        styles = styles / jnp.max(jnp.abs(styles), axis=1, keepdims=True)
    scale = None
    if demodulate:
        energy = jnp.sum(jnp.square(kernel), axis=tuple(range(num_spatial)))  # (C_in, C_out)
        scale = lax.rsqrt(jnp.matmul(jnp.square(styles), energy, precision=lax.Precision.HIGHEST) + epsilon)

    if fused:
        spatial_ones = (1,) * num_spatial
        kernels = kernel[None] * styles.reshape(batch, *spatial_ones, in_channels, 1)
        if scale is not None:
            kernels = kernels * scale.reshape(batch, *spatial_ones, 1, scale.shape[-1])
        out = resample(inputs, kernels.astype(inputs.dtype), pads, _per_sample_conv(precision, method))
    else:
        scaled = inputs * styles.astype(inputs.dtype).reshape(batch, *(1,) * num_spatial, in_channels)
        if up > 1:
            # XLA:CPU's kernel gradient of the shared sub-pixel conv is slow; per_sample_conv's is not, and the
            # broadcast's transpose sums the per-sample kernel gradients.
            broadcast = jnp.broadcast_to(kernel.astype(inputs.dtype), (batch, *kernel.shape))
            out = resample(scaled, broadcast, pads, _per_sample_conv(precision, method))
        else:
            out = resample(scaled, kernel.astype(inputs.dtype), pads, _shared_conv(precision))
        if scale is not None:
            out = out * scale.astype(out.dtype).reshape(batch, *(1,) * num_spatial, scale.shape[-1])
    out = jnp.moveaxis(out, -1, 1) if channels_first else out
    if noise is not None:
        out = out + _checked_noise(noise, out.shape, channels_first).astype(out.dtype)
    return out


def check_resampling(up: Any, down: Any) -> None:
    _checks.check_positive_int("up", up)
    _checks.check_positive_int("down", down)
    if up > 1 and down > 1:
        raise ValueError(f"`up` and `down` cannot both exceed 1 (got up={up}, down={down}); resample in two layers.")


def resolve_flip_weight(flip_weight: bool | None, up: int) -> bool:
    """``flip_weight`` as a bool: None is NVIDIA's ``SynthesisLayer`` choice, ``up == 1``, in the function and the
    layers alike."""
    if flip_weight is None:
        return up == 1
    if not isinstance(flip_weight, bool | np.bool_):
        raise TypeError(f"`flip_weight` must be True, False or None (NVIDIA's `up == 1`), got {flip_weight!r}.")
    return bool(flip_weight)


def use_fused(up: int, down: int, out_positions: int) -> bool:
    """The ``fused="auto"`` rule: per-sample kernels, except without resampling on small maps (at most
    ``FUSED_MIN_POSITIONS`` output positions a sample), where one shared conv is the faster program. The shared
    conv's kernel gradient is XLA:CPU's, several times slower than per_sample_conv's on larger maps, so the rule
    follows the training step (``benchmarks/modulated_conv.py``, ``docs/results/families/``); for
    inference on large maps ``fused=False`` can be the faster forward."""
    return up > 1 or down > 1 or out_positions > FUSED_MIN_POSITIONS


FUSED_MIN_POSITIONS = 256


ConvFn = _transpose.ConvFn


def _per_sample_conv(precision: Any, method: functional.Method) -> ConvFn:
    def conv(x: jax.Array, k: jax.Array, **geometry: Any) -> jax.Array:
        return functional.per_sample_conv(x, k, precision=precision, method=method, **geometry)

    return conv


def _shared_conv(precision: Any) -> ConvFn:
    def conv(
        x: jax.Array,
        k: jax.Array,
        *,
        padding: Sequence[tuple[int, int]],
        strides: int | Sequence[int] = 1,
        input_dilation: Sequence[int] | None = None,
        kernel_dilation: Sequence[int] | None = None,
    ) -> jax.Array:
        num_spatial = x.ndim - 2
        spec = canonical.ConvSpec(
            strides=_checks.canonicalize_ints(strides, num_spatial, "strides"),
            pads=tuple(padding),
            kernel_dilation=tuple(kernel_dilation or (1,) * num_spatial),
            input_dilation=tuple(input_dilation or (1,) * num_spatial),
            feature_group_count=1,
            precision=precision,
        )
        return canonical.shared_conv(x, k, spec, 1)

    return conv


class _Resample:
    """NVIDIA's ``conv2d_resample`` in N-d, for a per-sample (``(B, *k, I, O)``) or shared (``(*k, I, O)``)
    channels-last kernel, through ``conv``; the same paths as the original, which its padding arithmetic
    belongs to."""

    def __init__(self, up: int, down: int, taps: np.ndarray, flip_weight: bool, flip_filter: bool) -> None:
        self.up, self.down, self.taps = up, down, taps
        self.flip_weight, self.flip_filter = flip_weight, flip_filter

    def _filter_pads(self, pads: Sequence[tuple[int, int]], num_spatial: int) -> list[tuple[int, int]]:
        sizes = _resample.filter_size(self.taps, num_spatial)
        out = []
        for (low, high), fw in zip(pads, sizes, strict=True):
            if self.up > 1:
                low, high = low + (fw + self.up - 1) // 2, high + (fw - self.up) // 2
            if self.down > 1:
                low, high = low + (fw - self.down + 1) // 2, high + (fw - self.down) // 2
            out.append((low, high))
        return out

    def output_spatial_shape(
        self, spatial: Sequence[int], kernel_size: Sequence[int], pads: Sequence[tuple[int, int]]
    ) -> tuple[int, ...]:
        num_spatial = len(spatial)
        filter_pads = self._filter_pads(pads, num_spatial)
        fws = _resample.filter_size(self.taps, num_spatial)
        out = []
        for size, k, (low, high), fw in zip(spatial, kernel_size, filter_pads, fws, strict=True):
            if self.up > 1:
                n = size * self.up + low + high - fw + 1 - k + 1
            elif self.down > 1:
                n = (size + low + high - fw + 1 - k) // self.down + 1
            else:
                n = size + low + high - k + 1
            out.append(n)
        if any(n < 1 for n in out):
            raise ValueError(
                f"The output would be empty: spatial shape {tuple(spatial)}, kernel size {tuple(kernel_size)}, "
                f"`padding` {tuple(pads)}, up={self.up}, down={self.down}, filter size {fws}."
            )
        return tuple(out)

    def __call__(self, x: jax.Array, kernel: jax.Array, pads: Sequence[tuple[int, int]], conv: ConvFn) -> jax.Array:
        num_spatial = x.ndim - 2
        kernel_size = kernel.shape[-2 - num_spatial : -2]
        spatial_axes = tuple(range(kernel.ndim - 2 - num_spatial, kernel.ndim - 2))
        pads = self._filter_pads(pads, num_spatial)
        pointwise = all(k == 1 for k in kernel_size)
        fir = {"flip_filter": self.flip_filter}
        if pointwise and self.down > 1:
            x = _resample.upfirdn(x, self.taps, down=self.down, padding=pads, **fir)
            return conv(x, kernel, padding=[(0, 0)] * num_spatial)
        if pointwise and self.up > 1:
            x = conv(x, kernel, padding=[(0, 0)] * num_spatial)
            return _resample.upfirdn(x, self.taps, up=self.up, padding=pads, gain=self.up**num_spatial, **fir)
        if self.up > 1:
            # A transposed conv with the kernel as given is a true convolution of the up-sampled input.
            transposed_kernel = jnp.swapaxes(jnp.flip(kernel, spatial_axes) if self.flip_weight else kernel, -1, -2)
            pads = [(low - (k - 1), high - (k - self.up)) for (low, high), k in zip(pads, kernel_size, strict=True)]
            trims = tuple(max(min(-low, -high), 0) for low, high in pads)
            in_spatial = x.shape[1:-1]
            ones = (1,) * num_spatial
            out_spatial = _transpose.output_spatial_shape(
                in_spatial, kernel_size, (self.up,) * num_spatial, trims, ones, (0,) * num_spatial
            )
            x = _transpose.transposed(
                conv,
                x,
                transposed_kernel,
                (self.up,) * num_spatial,
                trims,
                ones,
                out_spatial,
                1,
            )
            fir_pads = [(low + t, high + t) for (low, high), t in zip(pads, trims, strict=True)]
            return _resample.upfirdn(x, self.taps, padding=fir_pads, gain=self.up**num_spatial, **fir)
        if not self.flip_weight:
            kernel = jnp.flip(kernel, spatial_axes)
        if self.down > 1:
            x = _resample.upfirdn(x, self.taps, padding=pads, **fir)
            return conv(x, kernel, padding=[(0, 0)] * num_spatial, strides=self.down)
        x = _crop_negative(x, pads)
        return conv(x, kernel, padding=[(max(low, 0), max(high, 0)) for low, high in pads])


def _crop_negative(x: jax.Array, pads: Sequence[tuple[int, int]]) -> jax.Array:
    if all(low >= 0 and high >= 0 for low, high in pads):
        return x
    config = [(0, 0, 0), *((min(low, 0), min(high, 0), 0) for low, high in pads), (0, 0, 0)]
    return lax.pad(x, jnp.zeros((), x.dtype), config)


def _explicit_pads(padding: _checks.PaddingLike, num_spatial: int) -> tuple[tuple[int, int], ...]:
    forms = f"an int, {num_spatial} ints, or {num_spatial} (low, high) pairs"
    if _checks.is_int(padding):
        return ((int(padding), int(padding)),) * num_spatial
    if isinstance(padding, Sequence) and not isinstance(padding, str) and len(padding) == num_spatial:
        pads = []
        for p in padding:
            if _checks.is_int(p):
                pads.append((int(p), int(p)))
            elif isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 and all(map(_checks.is_int, p)):
                pads.append((int(p[0]), int(p[1])))
            else:
                raise ValueError(f"`padding` must be {forms}; got {padding!r} (bad entry {p!r}).")
        return tuple(pads)
    raise ValueError(f"`padding` must be {forms}; got {padding!r}.")


def _one_channel(out_shape: tuple[int, ...], channels_first: bool) -> tuple[int, ...]:
    """``out_shape`` with one channel: the shape of noise broadcast over the channels."""
    single = list(out_shape)
    single[1 if channels_first else -1] = 1
    return tuple(single)


def _checked_noise(noise: ArrayLike, out_shape: tuple[int, ...], channels_first: bool) -> jax.Array:
    """``noise`` of the output's shape, or with one channel (broadcast over the channels), in its layout."""
    noise = _checks.as_array("noise", noise)
    _checks.check_float_dtype("noise", noise)
    single = _one_channel(out_shape, channels_first)
    if tuple(noise.shape) not in (tuple(single), tuple(out_shape)):
        raise ValueError(
            f"`noise` must have shape {tuple(single)} or {tuple(out_shape)} (the output's), got {tuple(noise.shape)}."
        )
    return noise


Activation = Literal["lrelu", "linear"]
NoiseMode = Literal["random", "const", "none"]

_ACTIVATION_GAINS = {"lrelu": math.sqrt(2.0), "linear": 1.0}
LRELU_SLOPE = 0.2


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """The static configuration of a ModulatedConv layer (linen and NNX share it)."""

    features: int
    kernel_size: tuple[int, ...]
    up: int
    down: int
    padding: _checks.PaddingLike
    demodulate: bool
    style_gain: float
    activation: Activation
    activation_gain: float
    clamp: float | None
    resample_filter: tuple[float, ...] | np.ndarray
    flip_weight: bool
    fused: Fused
    lr_multiplier: float
    data_format: functional.DataFormat
    precision: Any
    method: functional.Method

    @classmethod
    def of(
        cls,
        *,
        features: int,
        kernel_size: _checks.IntOrSequence,
        num_spatial: int,
        padding: _checks.PaddingLike | None,
        activation: str,
        activation_gain: float | None,
        flip_weight: bool | None,
        up: int,
        **rest: Any,
    ) -> LayerConfig:
        """Validated, with NVIDIA's defaults: ``padding`` ``kernel_size // 2``, ``flip_weight`` ``up == 1``,
        the activation's gain (``sqrt(2)`` for lrelu). Every error names the attribute."""
        _checks.check_positive_int("features", features)
        kernel_size_t = _checks.canonicalize_ints(kernel_size, num_spatial, "kernel_size")
        if activation not in _ACTIVATION_GAINS:
            raise ValueError(f"`activation` must be one of {tuple(_ACTIVATION_GAINS)}, got {activation!r}.")
        check_resampling(up, rest["down"])
        if padding is not None:
            _explicit_pads(padding, num_spatial)
        _resample.setup_filter(rest["resample_filter"], num_spatial=num_spatial)
        if rest["fused"] not in (True, False, "auto"):
            raise ValueError(f'`fused` must be True, False or "auto", got {rest["fused"]!r}.')
        if rest["method"] not in functional.METHODS:
            raise ValueError(f"`method` must be one of {functional.METHODS}, got {rest['method']!r}.")
        if rest["data_format"] not in functional.DATA_FORMATS:
            raise ValueError(f"`data_format` must be one of {functional.DATA_FORMATS}, got {rest['data_format']!r}.")
        _checks.check_positive_number("lr_multiplier", rest["lr_multiplier"])
        _checks.check_positive_number("style_gain", rest["style_gain"])
        if activation_gain is not None:
            _checks.check_positive_number("activation_gain", activation_gain)
        if rest["clamp"] is not None:
            _checks.check_positive_number("clamp", rest["clamp"], allow_zero=True)
        return cls(
            features=int(features),
            kernel_size=kernel_size_t,
            up=up,
            padding=tuple(k // 2 for k in kernel_size_t) if padding is None else padding,
            activation=activation,  # type: ignore[arg-type]
            activation_gain=_ACTIVATION_GAINS[activation] if activation_gain is None else float(activation_gain),
            flip_weight=resolve_flip_weight(flip_weight, up),
            **rest,
        )


def affine_styles(latents: jax.Array, kernel: jax.Array, bias: jax.Array, lr_multiplier: float) -> jax.Array:
    """NVIDIA's ``FullyConnectedLayer`` (linear): ``latents @ kernel * lr / sqrt(fan_in) + bias * lr``;
    ``latents`` ``(B, latent_dim)``, ``kernel`` ``(latent_dim, C_in)`` -> ``(B, C_in)``."""
    if latents.ndim != 2 or latents.shape[1] != kernel.shape[0]:
        raise ValueError(f"`latents` must have shape (batch, {kernel.shape[0]}), got {tuple(latents.shape)}.")
    weight = kernel * (lr_multiplier / math.sqrt(kernel.shape[0]))
    styles = jnp.matmul(latents.astype(kernel.dtype), weight, precision=lax.Precision.HIGHEST)
    return styles + (bias * lr_multiplier)[None]


def layer(
    config: LayerConfig,
    inputs: jax.Array,
    kernel: jax.Array,
    styles: jax.Array,
    *,
    noise: Callable[[tuple[int, ...]], jax.Array | None],
    bias: jax.Array | None,
    gain: float | jax.Array = 1.0,
) -> jax.Array:
    """NVIDIA's ``SynthesisLayer`` after the affine: ``modulated_conv(inputs, kernel, styles * style_gain)``
    plus ``noise(output_shape)`` (already scaled; None for none), then bias, activation,
    ``activation_gain * gain`` and the clamp at ``clamp * gain``."""
    out = modulated_conv(
        inputs,
        kernel,
        styles * jnp.asarray(config.style_gain, styles.dtype) if config.style_gain != 1 else styles,
        demodulate=config.demodulate,
        up=config.up,
        down=config.down,
        padding=config.padding,
        resample_filter=config.resample_filter,
        flip_weight=config.flip_weight,
        fused=config.fused,
        data_format=config.data_format,
        precision=config.precision,
        method=config.method,
    )
    added = noise(tuple(out.shape))
    if added is not None:
        channels_first = config.data_format == "channels_first"
        out = out + _checked_noise(added, tuple(out.shape), channels_first).astype(out.dtype)
    if bias is not None:
        spatial_ones = (1,) * (out.ndim - 2)
        shape = (1, -1, *spatial_ones) if config.data_format == "channels_first" else (1, *spatial_ones, -1)
        out = out + bias.astype(out.dtype).reshape(shape)
    if config.activation == "lrelu":
        # x > 0, not >= 0: the gradient at 0 is the slope, as PyTorch's leaky_relu.
        out = jnp.where(out > 0, out, out * jnp.asarray(LRELU_SLOPE, out.dtype))
    out = out * jnp.asarray(config.activation_gain * gain, out.dtype)
    if config.clamp is not None:
        limit = jnp.asarray(config.clamp * gain, out.dtype)
        out = jnp.clip(out, -limit, limit)
    return out


def kernel_shape(config: LayerConfig, in_channels: int) -> tuple[int, ...]:
    """The layer's kernel: ``(*kernel_size, C_in, features)``, or ``(features, C_in, *kernel_size)`` (PyTorch's)
    for ``"channels_first"``."""
    if config.data_format == "channels_first":
        return (config.features, in_channels, *config.kernel_size)
    return (*config.kernel_size, in_channels, config.features)


def noise_source(
    noise: ArrayLike | None,
    noise_mode: str,
    strength: jax.Array,
    const: jax.Array | None,
    channels_first: bool,
    key: Callable[[], jax.Array],
) -> Callable[[tuple[int, ...]], jax.Array | None]:
    """The layer's noise for an output shape, times ``strength``, as NVIDIA's ``noise_mode``: ``"random"`` (the
    ``noise`` passed, or a standard normal draw from ``key()``, one channel), ``"const"`` (``const``, the
    output's spatial shape), ``"none"``."""
    _check_noise_mode(noise_mode)
    if noise is not None and noise_mode != "random":
        raise ValueError(f'`noise` is used only with `noise_mode` "random", got {noise_mode!r}.')

    def draw(out_shape: tuple[int, ...]) -> jax.Array | None:
        single = _one_channel(out_shape, channels_first)
        if noise_mode == "none":
            return None
        if noise_mode == "const":
            spatial = out_shape[2:] if channels_first else out_shape[1:-1]
            if const is None or tuple(const.shape) != tuple(spatial):
                got = "no `noise_shape`" if const is None else f"`noise_shape` {tuple(const.shape)}"
                raise ValueError(f'`noise_mode` "const" needs `noise_shape` {tuple(spatial)} (the output), got {got}.')
            values = jnp.broadcast_to(const.reshape((1, *single[1:])), single)
            return values * strength
        values = jax.random.normal(key(), single, strength.dtype) if noise is None else jnp.asarray(noise)
        return values.astype(strength.dtype) * strength

    return draw


def _check_noise_mode(noise_mode: str) -> None:
    if noise_mode not in ("random", "const", "none"):
        raise ValueError(f'`noise_mode` must be "random", "const" or "none", got {noise_mode!r}.')


def no_noise(noise: ArrayLike | None, noise_mode: str) -> Callable[[tuple[int, ...]], None]:
    """The noise of a layer without ``use_noise``: none, and an error if some was passed."""
    _check_noise_mode(noise_mode)
    if noise is not None:
        raise ValueError("`noise` was passed to a ModulatedConv without `use_noise`.")
    return lambda out_shape: None


def check_layer_inputs(config: LayerConfig, inputs: jax.Array, in_features: int | None) -> None:
    """``inputs`` of the layer's rank (from ``kernel_size``) and, when known, ``in_features`` channels."""
    channels_first = config.data_format == "channels_first"
    layout = "(B, C_in, *spatial)" if channels_first else "(B, *spatial, C_in)"
    num_spatial = len(config.kernel_size)
    _checks.check_float_dtype("inputs", inputs)
    _checks.check_rank("inputs", inputs.shape, num_spatial + 2, f"{layout} for a {num_spatial}-D kernel_size")
    channels = inputs.shape[1 if channels_first else -1]
    if in_features is not None and channels != in_features:
        other = inputs.shape[-1 if channels_first else 1]
        hint = (
            f" (the other layout? this layer's `data_format` is {config.data_format!r})" if other == in_features else ""
        )
        raise ValueError(
            f"`inputs` must have {in_features} channels, got shape {tuple(inputs.shape)} ({layout}){hint}."
        )


def check_latents(latents: jax.Array, batch: int, width: int | None, affine: bool) -> None:
    """The call's second argument: latents ``(B, latent_dim)`` for the affine, or the styles ``(B, C_in)``."""
    what = "(batch, latent_dim)" if affine else "(batch, C_in): the styles, as `affine` is False"
    _checks.check_float_dtype("latents", latents)
    if latents.ndim != 2 or latents.shape[0] != batch or (width is not None and latents.shape[1] != width):
        expected = f"({batch}, {width if width is not None else 'latent_dim'})"
        raise ValueError(f"`latents` must have shape {expected} {what}, got shape {tuple(latents.shape)}.")
