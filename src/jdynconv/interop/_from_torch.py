"""A PyTorch layer -> the jdynconv layer that computes the same function, and its weights, in one call.

Each known PyTorch layer has a *builder*: a function that reads every setting off the torch module (kernel
size, stride, padding, dilation, groups, bias, BatchNorm epsilon and momentum, activations, temperature, ...)
and returns a :class:`TorchPort`: the jdynconv layer class, its constructor arguments and the module's state
dict. :func:`from_torch` builds the layer from it (linen or NNX) and loads the weights through the registered
converters. Builders are found by the torch module's class name (or a base class's), so users' own copies of
the originals, which live in their code rather than in an importable package, are recognised; the builder then
checks that the attributes and submodules it reads are there (duck typing). torch itself is never imported.

The families register their builders in their own files (``_branch_mix.py``, ``_kernel_mix.py``, ...) with
:func:`register_torch_layer`; families to come register the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np
from flax import nnx

from jdynconv.interop._convert import torch_to_linen, torch_to_nnx
from jdynconv.interop._rules import to_numpy

TorchModule = Any
"""A ``torch.nn.Module`` (never imported here: recognised by its class name and attributes)."""


@dataclasses.dataclass(frozen=True)
class TorchPort:
    """What a builder reads off a PyTorch module: the jdynconv layer to build and the weights to load into it.

    Attributes:
      linen_type: the layer's linen class (``jdynconv.linen.X`` or a subclass).
      nnx_type: the layer's NNX class (``jdynconv.nnx.X`` or a subclass).
      attributes: constructor keywords shared by both APIs (linen attributes and NNX keywords have the same
        names), e.g. ``features``, ``kernel_size`` (one int per spatial dim), ``padding`` (explicit pairs).
      nnx_attributes: keywords only the NNX constructor takes: ``in_features`` and, where needed,
        ``input_shape`` or ``latent_features``.
      state_dict: PyTorch key -> NumPy array, the state dict to load (the module's own, completed where
        jdynconv has a variable the torch module lacks).
      layout: the input layout of the returned layer, for error messages and docs: ``"channels_last"``, or
        ``"time_major"`` (fairseq's ``(T, B, C)``).
    """

    linen_type: type
    nnx_type: type
    attributes: Mapping[str, Any]
    nnx_attributes: Mapping[str, Any]
    state_dict: Mapping[str, np.ndarray]
    layout: str = "channels_last"


Builder = Callable[[TorchModule], TorchPort]

_BUILDERS: dict[str, Builder] = {}


def register_torch_layer(name: str, builder: Builder | str) -> None:
    """Makes :func:`from_torch` accept PyTorch modules whose class, or one of its base classes, is named ``name``.

    Args:
      name: a class name, e.g. ``"CondConv2d"`` (matched against ``type(module).__mro__``'s names, so
        subclasses of a known layer are recognised too).
      builder: ``builder(module) -> TorchPort``, reading every setting off the module and raising
        ``TypeError`` when an attribute it needs is missing; or the name of a known layer, to recognise
        another class name as that layer (``register_torch_layer("MyBlock", "SeedModel")``).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"`name` must be a class name (a non-empty str), got {name!r}.")
    if isinstance(builder, str):
        if builder not in _BUILDERS:
            raise ValueError(f"`builder` {builder!r} is not a known PyTorch layer; known: {known_torch_layers()}.")
        builder = _BUILDERS[builder]
    if not callable(builder):
        raise TypeError(f"`builder` must be a callable (module -> TorchPort) or a known layer's name, got {builder!r}.")
    _BUILDERS[name] = builder


def known_torch_layers() -> list[str]:
    """The class names :func:`from_torch` recognises, sorted."""
    return sorted(_BUILDERS)


def torch_port(module: TorchModule) -> TorchPort:
    """The :class:`TorchPort` of ``module``: the jdynconv layer and the state dict :func:`from_torch` builds."""
    for cls in type(module).__mro__:
        if cls.__name__ in _BUILDERS:
            return _BUILDERS[cls.__name__](module)
    raise TypeError(
        f"`module` must be a PyTorch layer jdynconv knows, got {type(module).__qualname__}. Known layers (by class "
        f"name): {', '.join(known_torch_layers())}. Register another with "
        "jdynconv.interop.register_torch_layer(name, builder)."
    )


def from_torch(
    module: TorchModule,
    *,
    api: Literal["linen", "nnx"] = "linen",
    rngs: nnx.Rngs | None = None,
    allow_non_finite: bool = False,
    **attributes: Any,
) -> Any:
    """The jdynconv layer that computes what the PyTorch ``module`` computes, with the module's weights.

    Every setting is read from the module: kernel size, stride, padding (PyTorch's integer padding becomes
    explicit ``(low, high)`` pairs, never ``"SAME"``), dilation, groups, bias, BatchNorm epsilon and momentum
    (PyTorch's ``m`` is Flax's ``1 - m``) with PyTorch's unbiased running variance, gate and attention sizes
    and activations, temperatures, StyleGAN2's filter, padding, gains, clamp and noise. A setting jdynconv
    cannot express is an error that names it.

    Every returned layer takes **channels-last** inputs, ``(B, *spatial, C)`` (``jnp.moveaxis(x, 1, -1)`` of
    PyTorch's ``(B, C, *spatial)``), and returns channels-last outputs; the weights are converted to match. fairseq's
    sequence layers become ``time_major`` layers: they take fairseq's ``(T, B, C)`` as it is.

    Args:
      module: a PyTorch layer of a known class (:func:`known_torch_layers`): the seed's ``BranchMixConv`` block
        (``SeedModel``), timm's ``CondConv2d``, ``Dynamic_conv{1,2,3}d`` (Chen et al.), OSVAI's ``ODConv2d``,
        StyleGAN2's ``SynthesisLayer`` and ``ToRGBLayer``, torchvision's ``DeformConv2d``, mmcv's
        ``DeformConv2d``, ``ModulatedDeformConv2d``, ``DeformConv2dPack`` and ``ModulatedDeformConv2dPack``,
        InternImage's ``DCNv3_pytorch`` and ``DCNv3``, d-li14's ``involution``, fairseq's ``LightweightConv1dTBC``
        and ``DynamicConv1dTBC`` (ported with ``time_major=True``: they take fairseq's ``(T, B, C)``).
      api: ``"linen"`` or ``"nnx"``.
      rngs: NNX only: the model's random streams (``ModulatedConv``'s noise draws from ``rngs.noise``); default
        ``nnx.Rngs(0)``.
      allow_non_finite: port weights with NaN or Inf entries (refused by default, naming the key).
      **attributes: further layer attributes the torch module does not determine (``dtype``, ``param_dtype``,
        ``precision``, ``method``, ``mixing``, ``ModulatedConv``'s ``data_format``, ...). Attributes read from
        the module cannot be overridden.

    Returns:
      ``api="linen"``: ``(layer, variables)``, for ``layer.apply(variables, x, ...)``; ``variables`` holds
      ``params`` and, where the layer has them, ``batch_stats`` and ``constants``.
      ``api="nnx"``: the NNX model, carrying its variables (weights loaded, in training mode as constructed:
      call ``model.eval()`` for inference).

    Raises:
      TypeError: ``module`` is not a known layer, lacks an attribute its builder reads, or ``attributes``
        repeats one read from the module.
      ValueError: a setting of the module that jdynconv cannot express (e.g. BatchNorm ``momentum=None``).
    """
    if api not in ("linen", "nnx"):
        raise ValueError(f'`api` must be "linen" or "nnx", got {api!r}.')
    port = torch_port(module)
    derived = set(port.attributes) | set(port.nnx_attributes)
    repeated = sorted(derived & set(attributes))
    if repeated:
        raise TypeError(
            f"from_torch reads {repeated} from the {type(module).__qualname__}; pass only attributes it does not "
            f"determine (it sets {sorted(derived)})."
        )
    if api == "linen":
        layer = port.linen_type(**port.attributes, **attributes)
        return layer, torch_to_linen(layer, port.state_dict, allow_non_finite=allow_non_finite)

    def build(streams: nnx.Rngs) -> nnx.Module:
        return port.nnx_type(**port.nnx_attributes, **port.attributes, **attributes, rngs=streams)

    # Abstract first, with streams of its own (a layer that forks the caller's streams, as nnx.Dropout does, must
    # not do so inside the abstract trace): the random initialisation the loaded weights replace is skipped. A
    # model that keeps state no weight fills (ModulatedConv's noise stream, a dropout stream) is built for real,
    # from the caller's streams.
    model = torch_to_nnx(nnx.eval_shape(lambda: build(nnx.Rngs(0))), port.state_dict, allow_non_finite=allow_non_finite)
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(model))):
        streams = rngs if rngs is not None else nnx.Rngs(0)
        model = torch_to_nnx(build(streams), port.state_dict, allow_non_finite=allow_non_finite)
    return model


# --- helpers the builders share --------------------------------------------------------------------------


def require(module: TorchModule, layer: str, *names: str) -> None:
    """Raises ``TypeError`` naming every attribute of ``names`` (dotted paths) that ``module`` lacks."""
    missing = [name for name in names if _lookup(module, name) is _MISSING]
    if missing:
        raise TypeError(
            f"{type(module).__qualname__} is recognised as {layer} by its class name, but lacks the attribute(s) "
            f"{missing} that from_torch reads."
        )


_MISSING = object()


def _lookup(module: TorchModule, dotted: str) -> Any:
    value = module
    for part in dotted.split("."):
        value = getattr(value, part, _MISSING)
        if value is _MISSING:
            return _MISSING
    return value


def class_name(module: TorchModule) -> str:
    return type(module).__name__


def state_dict_of(module: TorchModule) -> dict[str, np.ndarray]:
    """The module's state dict as NumPy arrays."""
    return {key: to_numpy(value) for key, value in module.state_dict().items()}


def ints(value: Any, rank: int, name: str) -> tuple[int, ...]:
    """A PyTorch int-or-tuple setting as one int per spatial dim."""
    if isinstance(value, int | np.integer):
        return (int(value),) * rank
    values = tuple(int(v) for v in value)
    if len(values) == 1:
        return values * rank
    if len(values) != rank:
        raise ValueError(f"`{name}` {value!r} has {len(values)} entries for {rank} spatial dims.")
    return values


def torch_padding(
    padding: Any, kernel_size: Sequence[int], dilation: Sequence[int], padding_mode: str = "zeros"
) -> tuple[tuple[int, int], ...]:
    """``nn.ConvNd``'s ``padding`` (int, tuple or ``"same"``/``"valid"``) as explicit ``(low, high)`` per dim.

    PyTorch pads symmetrically; ``"same"`` (stride 1 only) puts the odd pad at the end, as JAX's ``"SAME"``.
    Explicit pads keep the port exact at every stride and size, where ``"SAME"`` would not.
    """
    if padding_mode != "zeros":
        raise ValueError(f"`padding_mode` {padding_mode!r}: jdynconv pads with zeros only.")
    rank = len(kernel_size)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * rank
        if padding == "same":
            totals = [d * (k - 1) for k, d in zip(kernel_size, dilation, strict=True)]
            return tuple((total // 2, total - total // 2) for total in totals)
        raise ValueError(f"`padding` {padding!r} is not PyTorch's.")
    return tuple((p, p) for p in ints(padding, rank, "padding"))


def batch_norm_settings(norm: TorchModule, where: str) -> dict[str, Any]:
    """``nn.BatchNormNd`` -> jdynconv's ``momentum`` (Flax's ``1 - m``), ``epsilon`` and PyTorch's running variance."""
    require(norm, "BatchNorm", "eps", "momentum")
    if norm.momentum is None:
        raise ValueError(
            f"{where} has BatchNorm momentum=None (PyTorch's cumulative moving average): jdynconv's BatchNorm keeps "
            "an exponential moving average only; set a momentum on the PyTorch module first."
        )
    if not getattr(norm, "affine", True) or not getattr(norm, "track_running_stats", True):
        raise ValueError(f"{where}'s BatchNorm must have affine=True and track_running_stats=True.")
    return {"momentum": 1.0 - float(norm.momentum), "epsilon": float(norm.eps), "unbiased_running_var": True}


def fitting_ratio(width: int, in_features: int, default: float, width_of: Callable[[int, float], int]) -> float:
    """A ratio ``r`` with ``width_of(in_features, r) == width``: ``default`` if it fits, else one that does.

    The originals compute a hidden width from a ratio they do not store; the width is in the weights.
    """
    if width_of(in_features, default) == width:
        return default
    for candidate in ((width - 0.5) / in_features, (width + 0.5) / in_features, width / in_features):
        if candidate > 0 and width_of(in_features, candidate) == width:
            return candidate
    raise ValueError(f"no ratio gives the hidden width {width} for {in_features} input channels.")


def spatial_shape(size: int, rank: int) -> tuple[int, ...]:
    """A spatial shape of ``rank`` dims with ``size`` elements: square when ``size`` is a perfect power."""
    side = round(size ** (1 / rank))
    for candidate in (side - 1, side, side + 1):
        if candidate >= 1 and candidate**rank == size:
            return (candidate,) * rank
    return (*(1,) * (rank - 1), size)
