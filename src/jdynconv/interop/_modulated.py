"""ModulatedConv <-> NVIDIA's ``SynthesisLayer`` / ``ToRGBLayer`` (stylegan2-ada-pytorch ``training/networks.py``).

The originals' names::

    weight (F, C_in, *K)             <-> kernel (*K, C_in, F)   ((F, C_in, *K) with "channels_first")
    bias (F,)                        <-> bias (F,)                                         with ``use_bias``
    affine.weight (C_in, latent)     <-> affine_kernel (latent, C_in)                      with ``affine``
    affine.bias (C_in,)              <-> affine_bias (C_in,)                               with ``affine``
    noise_strength ()                <-> noise_strength ()                                 with ``use_noise``
    noise_const (*noise_shape)       <-> constants noise_const          with ``use_noise`` and ``noise_shape``
    resample_filter (f, f)           <-> none: the layer's ``resample_filter``    SynthesisLayer (``demodulate``)

``resample_filter`` is a buffer of ``SynthesisLayer`` (demodulated), not of ``ToRGBLayer``: on load it must equal
the layer's own filter (``setup_filter``: normalised, 2-D outer product below 8 taps; a different one is an
error naming both), and that filter is what export writes.
"""

from __future__ import annotations

import numpy as np

from jdynconv import _checks, _modulated, _resample
from jdynconv import linen as jdc_linen
from jdynconv import nnx as jdc_nnx
from jdynconv.interop._convert import Converter, FlaxShapes, TorchShapes, register
from jdynconv.interop._rules import LINEAR_LAYOUT, SCALAR_LAYOUT, VECTOR_LAYOUT, Dim, DimLike, Permutation, Rule, Target


def nvidia_filter(resample_filter: object, num_spatial: int) -> np.ndarray:
    """The ``resample_filter`` buffer NVIDIA's ``setup_filter`` makes of ``resample_filter``: 1-D taps become
    their normalised outer product below 8 taps (separable from 8 on); an N-d filter is normalised."""
    taps = _resample.setup_filter(resample_filter, num_spatial=num_spatial)
    if taps.ndim == 1 and taps.size < 8 and num_spatial > 1:
        taps = np.einsum(",".join("abc"[:num_spatial]) + "->" + "abc"[:num_spatial], *([taps] * num_spatial))
    return taps.astype(np.float32)


def modulated_conv_rules(
    *,
    features: int,
    in_features: DimLike,
    latent_features: DimLike,
    kernel_size: tuple[DimLike, ...],
    channels_first: bool,
    use_bias: bool,
    affine: bool,
    use_noise: bool,
    noise_shape: tuple[int, ...] | None,
    resample_filter: np.ndarray | None,
    torch_prefix: str = "",
) -> list[Rule]:
    """The rules of one ModulatedConv whose PyTorch twin is NVIDIA's ``SynthesisLayer`` or ``ToRGBLayer``.

    Args:
      features, use_bias, affine, use_noise, noise_shape: the module's.
      in_features: C_in; latent_features: the affine's input width; kernel_size: one size per spatial dim.
      channels_first: the kernel is kept in PyTorch's layout (``data_format="channels_first"``).
      resample_filter: the ``resample_filter`` buffer to expect and export, or None (ToRGBLayer has none).
      torch_prefix: the PyTorch module's path in a bigger model, e.g. ``"synthesis.b8.conv0."``.
    """
    num_spatial = len(kernel_size)
    kernel_layout = Permutation(tuple(range(num_spatial + 2))) if channels_first else _conv_layout(num_spatial)
    rules = [
        Rule(
            f"{torch_prefix}weight", (features, in_features, *kernel_size), Target(("params", "kernel")), kernel_layout
        )
    ]
    if use_bias:
        rules.append(Rule(f"{torch_prefix}bias", (features,), Target(("params", "bias")), VECTOR_LAYOUT))
    if affine:
        rules += [
            Rule(
                f"{torch_prefix}affine.weight",
                (in_features, latent_features),
                Target(("params", "affine_kernel")),
                LINEAR_LAYOUT,
            ),
            Rule(f"{torch_prefix}affine.bias", (in_features,), Target(("params", "affine_bias")), VECTOR_LAYOUT),
        ]
    if use_noise:
        rules.append(Rule(f"{torch_prefix}noise_strength", (), Target(("params", "noise_strength")), SCALAR_LAYOUT))
        if noise_shape is not None:
            rules.append(
                Rule(
                    f"{torch_prefix}noise_const",
                    tuple(noise_shape),
                    Target(("constants", "noise_const")),
                    Permutation(tuple(range(len(noise_shape)))),
                )
            )
    if resample_filter is not None:
        rules.append(
            Rule(
                f"{torch_prefix}resample_filter",
                tuple(resample_filter.shape),
                None,
                Permutation(tuple(range(resample_filter.ndim))),
                default=resample_filter,
                check_value=True,
            )
        )
    return rules


def _conv_layout(num_spatial: int) -> Permutation:
    return Permutation((*range(2, 2 + num_spatial), 1, 0))


def _filter_buffer(demodulate: bool, resample_filter: object, num_spatial: int) -> np.ndarray | None:
    return nvidia_filter(resample_filter, num_spatial) if demodulate else None


# --- linen: C_in, the latent width and the rank come from the other side's shapes ----------------------


def _linen_rules(
    module: jdc_linen.ModulatedConv, in_features: DimLike, latent: DimLike, num_spatial: int | None
) -> list[Rule]:
    if _checks.is_int(module.kernel_size):
        rank = num_spatial or 2
        kernel_size: tuple[DimLike, ...] = (module.kernel_size,) * rank
    else:
        kernel_size = tuple(module.kernel_size)
        rank = len(kernel_size)
    return modulated_conv_rules(
        features=module.features,
        in_features=in_features,
        latent_features=latent,
        kernel_size=kernel_size,
        channels_first=module.data_format == "channels_first",
        use_bias=module.use_bias,
        affine=module.affine,
        use_noise=module.use_noise,
        noise_shape=None if module.noise_shape is None else tuple(module.noise_shape),
        resample_filter=_filter_buffer(module.demodulate, module.resample_filter, rank),
    )


def _linen_torch_rules(module: jdc_linen.ModulatedConv, shapes: TorchShapes) -> list[Rule]:
    """C_in and the rank from ``weight (F, C_in, *K)``, the latent width from ``affine.weight``."""
    weight = shapes.get("weight")
    affine = shapes.get("affine.weight")
    in_features: DimLike = weight[1] if weight is not None and len(weight) >= 3 else Dim("C_in")
    latent: DimLike = affine[1] if affine is not None and len(affine) == 2 else Dim("latent_features")
    return _linen_rules(module, in_features, latent, len(weight) - 2 if weight is not None else None)


def _linen_flax_rules(module: jdc_linen.ModulatedConv, shapes: FlaxShapes) -> list[Rule]:
    kernel = shapes.get(("params", "kernel"), ())
    affine = shapes.get(("params", "affine_kernel"))
    channels_first = module.data_format == "channels_first"
    in_features: DimLike = (kernel[1] if channels_first else kernel[-2]) if len(kernel) >= 3 else Dim("C_in")
    latent: DimLike = affine[0] if affine is not None else Dim("latent_features")
    return _linen_rules(module, in_features, latent, len(kernel) - 2 if kernel else None)


# --- NNX: the model knows every shape --------------------------------------------------------------------


def _nnx_rules(model: jdc_nnx.ModulatedConv, shapes: FlaxShapes) -> list[Rule]:
    config: _modulated.LayerConfig = model.config
    affine = shapes.get(("params", "affine_kernel"))
    noise = shapes.get(("constants", "noise_const"))
    return modulated_conv_rules(
        features=config.features,
        in_features=model.in_features,
        latent_features=affine[0] if affine is not None else Dim("latent_features"),
        kernel_size=config.kernel_size,
        channels_first=config.data_format == "channels_first",
        use_bias=("params", "bias") in shapes,
        affine=affine is not None,
        use_noise=("params", "noise_strength") in shapes,
        noise_shape=noise,
        resample_filter=_filter_buffer(config.demodulate, config.resample_filter, len(config.kernel_size)),
    )


register(jdc_linen.ModulatedConv, Converter(flax_rules=_linen_flax_rules, torch_rules=_linen_torch_rules))
register(jdc_nnx.ModulatedConv, Converter(flax_rules=_nnx_rules))
