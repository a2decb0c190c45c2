"""flax.linen ModulatedConv: StyleGAN2's modulated convolution layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdynconv import _checks, _modulated
from jdynconv.linen._common import Dtype, Initializer, ones, zeros

# NVIDIA StyleGAN2's kernels and affine weights: standard normal (demodulation, or the affine's 1 / sqrt(fan_in)
# gain at run time, sets the scale).
standard_normal: Initializer = nn.initializers.normal(1.0)


class ModulatedConv(nn.Module):
    """StyleGAN2's modulated convolution layer (NVIDIA's ``SynthesisLayer``; ``ToRGBLayer`` with
    ``demodulate=False``, ``style_gain=1 / sqrt(C_in * prod(kernel_size))``, ``padding=0``, no noise, linear).

    ``styles = affine(latents)`` (NVIDIA's ``FullyConnectedLayer``, bias initialised to 1) unless ``affine``
    is False (then the call's second argument is the styles); ``out = act(modulated_conv(x, kernel,
    styles * style_gain) + noise * noise_strength + bias) * activation_gain * gain``, clamped at
    ``clamp * gain``. N-d (1-D/2-D/3-D) from the input's rank. See :func:`jdynconv.modulated_conv`.

    Variables: ``params``: ``kernel`` ``(*kernel_size, C_in, features)`` (``(features, C_in, *kernel_size)``
    for ``"channels_first"``), ``bias (features,)``, ``affine_kernel (latent_dim, C_in)``,
    ``affine_bias (C_in,)``, ``noise_strength ()``; ``constants``: ``noise_const`` (``noise_shape``) for
    ``noise_mode="const"``.

    Attributes:
      features: output channels C_out.
      kernel_size: int (same in every spatial dim) or one int per spatial dim.
      up: up-sampling factor, as :func:`jdynconv.modulated_conv`'s.
      down: down-sampling factor, as :func:`jdynconv.modulated_conv`'s.
      padding: as :func:`jdynconv.modulated_conv`'s; None is ``kernel_size // 2`` (NVIDIA's).
      demodulate: normalise each output channel's per-sample kernel, as :func:`jdynconv.modulated_conv`'s.
      affine: styles from a Dense of the latents (True) or passed in (False).
      style_gain: multiplies the styles (ToRGB's weight gain).
      use_noise: add ``noise_strength`` (initialised to 0) times noise.
      noise_shape: the output's spatial shape, for ``noise_mode="const"``; with it the layer has a
        ``constants`` collection, which every ``apply`` then needs (pass all of ``init``'s variables).
      use_bias: whether the layer adds a bias.
      activation: ``"lrelu"`` (slope 0.2) or ``"linear"``.
      activation_gain: multiplies the activation (None: sqrt(2) for lrelu, 1 for linear).
      clamp: clamps the output to ``[-clamp * gain, clamp * gain]`` (NVIDIA's ``conv_clamp``); None: no clamp.
      resample_filter: the FIR filter of ``up``/``down``, as :func:`jdynconv.modulated_conv`'s.
      flip_weight: as :func:`jdynconv.modulated_conv`'s; None is ``up == 1`` (NVIDIA's).
      fused: per-sample kernels (True), scaled activations around one shared conv (False) or ``"auto"``, as
        :func:`jdynconv.modulated_conv`'s.
      lr_multiplier: the affine's learning-rate multiplier.
      data_format: ``"channels_last"`` or ``"channels_first"`` (PyTorch's layout, for inputs and kernel).
      dtype: the convolution's dtype (the inputs are cast to it; None: the inputs'); the per-sample kernels are
        cast to it too, while styles, modulation and demodulation stay in ``param_dtype`` (NVIDIA's
        ``.to(x.dtype)`` scheme, not Flax's ``promote_dtype``).
      param_dtype: the parameters' dtype.
      precision: passed to the convs, as in ``jax.lax``.
      method: the :func:`jdynconv.per_sample_conv` lowering of the fused path.
      kernel_init: the kernel's initialiser (NVIDIA's: standard normal).
      bias_init: the bias's initialiser.
    """

    features: int
    kernel_size: int | Sequence[int]
    up: int = 1
    down: int = 1
    padding: _checks.PaddingLike | None = None
    demodulate: bool = True
    affine: bool = True
    style_gain: float = 1.0
    use_noise: bool = False
    noise_shape: Sequence[int] | None = None
    use_bias: bool = True
    activation: str = "lrelu"
    activation_gain: float | None = None
    clamp: float | None = None
    resample_filter: Sequence[float] = _modulated.DEFAULT_RESAMPLE_FILTER
    flip_weight: bool | None = None
    fused: bool | str = "auto"
    lr_multiplier: float = 1.0
    data_format: str = "channels_last"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    method: str = "auto"
    kernel_init: Initializer = standard_normal
    bias_init: Initializer = zeros

    def __post_init__(self) -> None:
        _modulated_config(self, _attribute_rank(self))  # at construction: every attribute error names the attribute
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        latents: jax.Array,
        *,
        noise: jax.Array | None = None,
        noise_mode: str = "random",
        gain: float | jax.Array = 1.0,
    ) -> jax.Array:
        """Applies the layer.

        Args:
          inputs: ``(B, *spatial, C_in)``, or ``(B, C_in, *spatial)`` for ``"channels_first"``.
          latents: ``(B, latent_dim)``; without ``affine``, the styles ``(B, C_in)``.
          noise: ``(B, *out_spatial, 1)`` in the output's layout, or the output's shape: replaces the draw
            from the ``"noise"`` rng stream in ``noise_mode="random"``.
          noise_mode: ``"random"``, ``"const"`` (adds ``noise_const``) or ``"none"`` (adds nothing).
          gain: multiplies the output (and the clamp), as NVIDIA's ``gain``.

        Returns:
          ``(B, *out_spatial, features)``, or ``(B, features, *out_spatial)`` for ``"channels_first"``.
        """
        inputs = _checks.as_array("inputs", inputs)
        latents = _checks.as_array("latents", latents)
        channels_first = self.data_format == "channels_first"
        built_for = self.get_variable("params", "kernel").shape if self.has_variable("params", "kernel") else None
        rank = inputs.ndim - 2 if _checks.is_int(self.kernel_size) else len(self.kernel_size)
        rank = len(built_for) - 2 if built_for is not None else rank
        config = _modulated_config(self, rank)
        in_features = None if built_for is None else built_for[1 if channels_first else -2]
        _modulated.check_layer_inputs(config, inputs, in_features)
        in_channels = inputs.shape[1 if channels_first else -1]
        width = in_channels
        if self.affine:
            built = self.has_variable("params", "affine_kernel")
            width = self.get_variable("params", "affine_kernel").shape[0] if built else None
        _modulated.check_latents(latents, inputs.shape[0], width, self.affine)
        kernel = self.param("kernel", self.kernel_init, _modulated.kernel_shape(config, in_channels), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        if self.affine:
            affine_kernel = self.param(
                "affine_kernel",
                _scaled(standard_normal, 1 / self.lr_multiplier),
                (latents.shape[-1], in_channels),
                self.param_dtype,
            )
            affine_bias = self.param("affine_bias", ones, (in_channels,), self.param_dtype)
            styles = _modulated.affine_styles(latents, affine_kernel, affine_bias, self.lr_multiplier)
        else:
            styles = latents.astype(self.param_dtype)
        if not self.use_noise:
            draw = _modulated.no_noise(noise, noise_mode)
        else:
            strength = self.param("noise_strength", zeros, (), self.param_dtype)
            const = None
            if self.noise_shape is not None:
                shape = tuple(self.noise_shape)
                key = self.make_rng("params") if self.is_initializing() else None
                const = self.variable("constants", "noise_const", jax.random.normal, key, shape, self.param_dtype).value
            draw = _modulated.noise_source(
                noise, noise_mode, strength, const, channels_first, lambda: self.make_rng("noise")
            )
        inputs = inputs.astype(self.dtype or inputs.dtype)
        return _modulated.layer(config, inputs, kernel, styles, noise=draw, bias=bias, gain=gain)


def _scaled(init: Initializer, factor: float) -> Initializer:
    def scaled_init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        return init(key, shape, dtype) * jnp.asarray(factor, dtype)

    return scaled_init


def _attribute_rank(module: ModulatedConv) -> int:
    """The number of spatial dims the attributes fix (by ``kernel_size``, ``padding`` or an N-d filter), or 1
    where none does: enough to check them before the inputs come."""
    for value in (module.kernel_size, module.padding):
        if isinstance(value, Sequence) and not isinstance(value, str) and 1 <= len(value) <= 3:
            return len(value)
    try:
        return max(1, min(3, np.ndim(module.resample_filter)))
    except (TypeError, ValueError):  # not an array: setup_filter says so, naming `resample_filter`
        return 1


def _modulated_config(module: ModulatedConv, num_spatial: int) -> _modulated.LayerConfig:
    return _modulated.LayerConfig.of(
        features=module.features,
        kernel_size=module.kernel_size,
        num_spatial=num_spatial,
        padding=module.padding,
        activation=module.activation,
        activation_gain=module.activation_gain,
        flip_weight=module.flip_weight,
        up=module.up,
        down=module.down,
        demodulate=module.demodulate,
        style_gain=module.style_gain,
        clamp=module.clamp,
        resample_filter=tuple(module.resample_filter),
        fused=module.fused,
        lr_multiplier=module.lr_multiplier,
        data_format=module.data_format,
        precision=module.precision,
        method=module.method,
    )
