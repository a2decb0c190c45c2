"""flax.nnx ModulatedConv (and its NoiseConst variable): the NNX twin of :class:`jdynconv.linen.ModulatedConv`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jdynconv import _checks, _modulated
from jdynconv.linen._common import Dtype, Initializer, zeros
from jdynconv.linen.modulated import standard_normal
from jdynconv.nnx._common import spatial_kernel_size


class NoiseConst(nnx.Variable):
    """A fixed noise image (NVIDIA's ``noise_const`` buffer): stored, never trained; linen keeps it in the
    ``constants`` collection."""

    linen_collection: ClassVar[str] = "constants"


class ModulatedConv(nnx.Module):
    """The NNX twin of :class:`jdynconv.linen.ModulatedConv` (see it for the maths and every attribute): the
    same variables under the same names (``noise_const`` a :class:`NoiseConst`).

    Every argument not described here is the linen layer's attribute of the same name.

    Args:
      in_features: input channels C_in.
      kernel_size: one int per spatial dim.
      latent_features: the latents' width for the affine (required when ``affine``).
      rngs: ``nnx.Rngs`` for the initialisers, and its ``noise`` stream for random noise.
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        kernel_size: Sequence[int],
        *,
        latent_features: int | None = None,
        up: int = 1,
        down: int = 1,
        padding: _checks.PaddingLike | None = None,
        demodulate: bool = True,
        affine: bool = True,
        style_gain: float = 1.0,
        use_noise: bool = False,
        noise_shape: Sequence[int] | None = None,
        use_bias: bool = True,
        activation: str = "lrelu",
        activation_gain: float | None = None,
        clamp: float | None = None,
        resample_filter: Sequence[float] = _modulated.DEFAULT_RESAMPLE_FILTER,
        flip_weight: bool | None = None,
        fused: bool | str = "auto",
        lr_multiplier: float = 1.0,
        data_format: str = "channels_last",
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: Any = None,
        method: str = "auto",
        kernel_init: Initializer = standard_normal,
        bias_init: Initializer = zeros,
        rngs: nnx.Rngs,
    ) -> None:
        if affine and latent_features is None:
            raise ValueError("`latent_features` is required with `affine` (the width of the latents).")
        self.in_features = in_features
        self.dtype = dtype
        self.use_noise = use_noise
        self.rngs = rngs if use_noise else None
        kernel_size = spatial_kernel_size(kernel_size)
        self.config = _modulated.LayerConfig.of(
            features=features,
            kernel_size=kernel_size,
            num_spatial=len(kernel_size),
            padding=padding,
            activation=activation,
            activation_gain=activation_gain,
            flip_weight=flip_weight,
            up=up,
            down=down,
            demodulate=demodulate,
            style_gain=style_gain,
            clamp=clamp,
            resample_filter=tuple(resample_filter),
            fused=fused,
            lr_multiplier=lr_multiplier,
            data_format=data_format,
            precision=precision,
            method=method,
        )
        shape = _modulated.kernel_shape(self.config, in_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (features,), param_dtype)) if use_bias else None
        if affine:
            normal = standard_normal(rngs.params(), (latent_features, in_features), param_dtype)
            self.affine_kernel = nnx.Param(normal / lr_multiplier)
            self.affine_bias = nnx.Param(jnp.ones((in_features,), param_dtype))
        else:
            self.affine_kernel = self.affine_bias = None
        self.noise_strength = nnx.Param(jnp.zeros((), param_dtype)) if use_noise else None
        const = None
        if use_noise and noise_shape is not None:
            const = NoiseConst(jax.random.normal(rngs.params(), tuple(noise_shape), param_dtype))
        self.noise_const = const

    def __call__(
        self,
        inputs: jax.Array,
        latents: jax.Array,
        *,
        noise: jax.Array | None = None,
        noise_mode: str = "random",
        gain: float | jax.Array = 1.0,
    ) -> jax.Array:
        """Applies the layer, as :meth:`jdynconv.linen.ModulatedConv.__call__`."""
        inputs = _checks.as_array("inputs", inputs)
        latents = _checks.as_array("latents", latents)
        config = self.config
        channels_first = config.data_format == "channels_first"
        _modulated.check_layer_inputs(config, inputs, self.in_features)
        affine = self.affine_kernel is not None
        width = self.affine_kernel.shape[0] if affine else self.in_features
        _modulated.check_latents(latents, inputs.shape[0], width, affine)
        if affine:
            styles = _modulated.affine_styles(
                latents, self.affine_kernel[...], self.affine_bias[...], config.lr_multiplier
            )
        else:
            styles = latents.astype(self.kernel.dtype)
        if not self.use_noise:
            draw = _modulated.no_noise(noise, noise_mode)
        else:
            const = self.noise_const[...] if self.noise_const is not None else None
            draw = _modulated.noise_source(
                noise, noise_mode, self.noise_strength[...], const, channels_first, lambda: self.rngs.noise()
            )
        bias = self.bias[...] if self.bias is not None else None
        inputs = inputs.astype(self.dtype or inputs.dtype)
        return _modulated.layer(config, inputs, self.kernel[...], styles, noise=draw, bias=bias, gain=gain)
