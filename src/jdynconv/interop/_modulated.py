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

import math
from typing import Any

import numpy as np

from jdynconv import _checks, _modulated, _resample
from jdynconv import linen as jdc_linen
from jdynconv import nnx as jdc_nnx
from jdynconv.interop._convert import Converter, FlaxShapes, TorchShapes, register
from jdynconv.interop._from_torch import TorchModule, TorchPort, register_torch_layer, require, state_dict_of
from jdynconv.interop._rules import (
    LINEAR_LAYOUT,
    SCALAR_LAYOUT,
    VECTOR_LAYOUT,
    Dim,
    DimLike,
    Permutation,
    Rule,
    Target,
    check_sizes,
    to_numpy,
)


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
      features: the module's ``features`` (C_out).
      in_features: C_in.
      latent_features: the affine's input width.
      kernel_size: one size per spatial dim.
      channels_first: the kernel is kept in PyTorch's layout (``data_format="channels_first"``).
      use_bias: the module's ``use_bias``.
      affine: the module's ``affine``.
      use_noise: the module's ``use_noise``.
      noise_shape: the module's ``noise_shape``.
      resample_filter: the ``resample_filter`` buffer to expect and export, or None (ToRGBLayer has none).
      torch_prefix: the PyTorch module's path in a bigger model, e.g. ``"synthesis.b8.conv0."``.
    """
    check_sizes(features=features, in_features=in_features, latent_features=latent_features, kernel_size=kernel_size)
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


# --- from_torch: StyleGAN2's SynthesisLayer and ToRGBLayer --------------------------------------------------


def nvidia_padding(padding: Any) -> tuple[tuple[int, int], ...]:
    """NVIDIA's 2-D padding (``p``, ``[px, py]`` or ``[x0, x1, y0, y1]``: x, the width, first) as ``(low, high)``
    per spatial dim in jdynconv's order, height first: ``((y0, y1), (x0, x1))``."""
    if isinstance(padding, int | np.integer):
        return ((int(padding), int(padding)),) * 2
    values = [int(p) for p in padding]
    if len(values) == 2:
        px, py = values
        return ((py, py), (px, px))
    if len(values) == 4:
        x0, x1, y0, y1 = values
        return ((y0, y1), (x0, x1))
    raise ValueError(f"`padding` must be an int, [px, py] or [x0, x1, y0, y1] (NVIDIA's forms), got {padding!r}.")


def taps_of_buffer(buffer: np.ndarray) -> tuple[Any, ...]:
    """The ``resample_filter`` attribute that reproduces NVIDIA's ``resample_filter`` buffer: the default
    ``[1, 3, 3, 1]`` when the buffer is its filter, else the 1-D taps of a separable 2-D buffer (its normalised
    row sums), the taps of a 1-D buffer, or the 2-D filter itself (as nested tuples)."""
    buffer = np.asarray(buffer, np.float64)
    if buffer.ndim == 1:
        row = buffer / buffer.sum()
    else:
        row = buffer.sum(axis=1) / buffer.sum()
        if buffer.shape[0] != buffer.shape[1] or not np.allclose(np.outer(row, row), buffer / buffer.sum(), atol=1e-7):
            return tuple(tuple(float(v) for v in line) for line in buffer)
    default = np.asarray(_modulated.DEFAULT_RESAMPLE_FILTER) / sum(_modulated.DEFAULT_RESAMPLE_FILTER)
    if row.shape == default.shape and np.allclose(row, default, rtol=1e-6, atol=0):
        return tuple(_modulated.DEFAULT_RESAMPLE_FILTER)
    return tuple(float(v) for v in row)


def _affine_settings(module: TorchModule, layer: str) -> dict[str, Any]:
    """NVIDIA's ``FullyConnectedLayer`` as the layer's affine: linear, with a bias, its learning-rate multiplier."""
    affine = module.affine
    if getattr(affine, "activation", "linear") != "linear" or getattr(affine, "bias", None) is None:
        raise ValueError(f"{layer}'s affine must be linear with a bias (NVIDIA's), as ModulatedConv's.")
    latent = int(affine.weight.shape[1])
    lr_multiplier = float(getattr(affine, "lr_multiplier", affine.bias_gain))
    expected = (lr_multiplier / math.sqrt(latent), lr_multiplier)
    if not np.allclose((float(affine.weight_gain), float(affine.bias_gain)), expected, rtol=1e-6):
        raise ValueError(
            f"{layer}'s affine has weight_gain {affine.weight_gain} and bias_gain {affine.bias_gain}; ModulatedConv's "
            f"are lr_multiplier / sqrt(in_features) and lr_multiplier, {expected}."
        )
    return {"lr_multiplier": lr_multiplier}


def _activation_settings(activation: str, layer: str) -> str:
    if activation not in ("lrelu", "linear"):
        raise ValueError(f"{layer} has activation {activation!r}; ModulatedConv has 'lrelu' and 'linear'.")
    return activation


def _synthesis_port(module: TorchModule) -> TorchPort:
    """NVIDIA's ``SynthesisLayer``: demodulated, ``up``-sampled with its ``resample_filter`` buffer, NVIDIA's
    ``padding``, noise (``noise_const``'s shape), activation and its gain, ``conv_clamp``, the affine's gains."""
    layer = "SynthesisLayer"
    require(
        module,
        layer,
        "weight",
        "bias",
        "affine.weight",
        "affine.weight_gain",
        "affine.bias_gain",
        "up",
        "padding",
        "use_noise",
        "activation",
        "act_gain",
        "conv_clamp",
        "resample_filter",
    )
    features, in_channels, *kernel_size = (int(d) for d in module.weight.shape)
    use_noise = bool(module.use_noise)
    noise_const = getattr(module, "noise_const", None) if use_noise else None
    attributes = {
        "features": features,
        "kernel_size": tuple(kernel_size),
        "up": int(module.up),
        "down": int(getattr(module, "down", 1)),
        "padding": nvidia_padding(module.padding),
        "demodulate": True,
        "use_noise": use_noise,
        "noise_shape": None if noise_const is None else tuple(int(d) for d in noise_const.shape),
        "use_bias": module.bias is not None,
        "activation": _activation_settings(module.activation, layer),
        "activation_gain": float(module.act_gain),
        "clamp": None if module.conv_clamp is None else float(module.conv_clamp),
        "resample_filter": taps_of_buffer(to_numpy(module.resample_filter)),
        **_affine_settings(module, layer),
    }
    nnx_attributes = {"in_features": in_channels, "latent_features": int(module.affine.weight.shape[1])}
    return TorchPort(jdc_linen.ModulatedConv, jdc_nnx.ModulatedConv, attributes, nnx_attributes, state_dict_of(module))


def _to_rgb_port(module: TorchModule) -> TorchPort:
    """NVIDIA's ``ToRGBLayer``: not demodulated, its ``weight_gain`` on the styles, no padding, linear with gain 1,
    ``conv_clamp``, the affine's gains."""
    layer = "ToRGBLayer"
    require(module, layer, "weight", "bias", "affine.weight", "affine.weight_gain", "affine.bias_gain", "weight_gain")
    features, in_channels, *kernel_size = (int(d) for d in module.weight.shape)
    conv_clamp = getattr(module, "conv_clamp", None)
    attributes = {
        "features": features,
        "kernel_size": tuple(kernel_size),
        "padding": 0,
        "demodulate": False,
        "style_gain": float(module.weight_gain),
        "use_bias": module.bias is not None,
        "activation": "linear",
        "activation_gain": 1.0,
        "clamp": None if conv_clamp is None else float(conv_clamp),
        **_affine_settings(module, layer),
    }
    nnx_attributes = {"in_features": in_channels, "latent_features": int(module.affine.weight.shape[1])}
    return TorchPort(jdc_linen.ModulatedConv, jdc_nnx.ModulatedConv, attributes, nnx_attributes, state_dict_of(module))


register_torch_layer("SynthesisLayer", _synthesis_port)
register_torch_layer("ToRGBLayer", _to_rgb_port)
