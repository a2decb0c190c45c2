"""jdynconv: input-dependent convolution for JAX and Flax.

Per-sample convolution (every batch element its own kernel) and its transposed form, weighted branch
mixing, kernel mixing (CondConv, Dynamic Convolution), ODConv's four attentions and StyleGAN2's modulated
convolution, deformable convolution (``deform_conv``, ``dcnv3``) and per-position kernels (``per_position_conv``:
involution, fairseq's lightweight and dynamic convolutions), as pure functions over ``jax.lax`` with Flax
modules on top: ``jdynconv.linen`` and ``jdynconv.nnx`` (same names, same maths); ``jdynconv.interop`` moves
weights between PyTorch and Flax. The three submodules are attributes of the package too
(``jdynconv.linen.BranchMixConv``), imported on first use so ``import jdynconv`` stays light and never
imports torch.
"""

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from jdynconv._dcnv3 import dcnv3 as dcnv3
from jdynconv._deform import deform_conv as deform_conv
from jdynconv._kernel_mix import temperature_schedule as temperature_schedule
from jdynconv._modulated import modulated_conv as modulated_conv
from jdynconv._per_position import per_position_conv as per_position_conv
from jdynconv._transpose import per_sample_conv_transpose as per_sample_conv_transpose
from jdynconv.functional import mix_kernels as mix_kernels
from jdynconv.functional import mix_outputs as mix_outputs
from jdynconv.functional import per_sample_conv as per_sample_conv

__version__ = "0.2.0"

__all__ = [
    "__version__",
    "dcnv3",
    "deform_conv",
    "mix_kernels",
    "mix_outputs",
    "modulated_conv",
    "per_position_conv",
    "per_sample_conv",
    "per_sample_conv_transpose",
    "temperature_schedule",
]

_SUBMODULES = ("interop", "linen", "nnx")

if TYPE_CHECKING:
    from jdynconv import interop as interop
    from jdynconv import linen as linen
    from jdynconv import nnx as nnx


def __getattr__(name: str) -> ModuleType:
    """``jdynconv.linen``, ``jdynconv.nnx`` and ``jdynconv.interop``, imported on first access (PEP 562)."""
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES})
