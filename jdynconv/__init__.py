"""jdynconv: input-dependent convolution for JAX and Flax.

Per-sample convolution (every batch element its own kernel), weighted branch mixing, and kernel
mixing (CondConv, Dynamic Convolution), as pure functions over ``jax.lax`` with Flax modules on top:
``jdynconv.linen`` and ``jdynconv.nnx`` (same names, same maths); ``jdynconv.interop`` moves weights
between PyTorch and Flax.
"""

from jdynconv._kernel_mix import temperature_schedule as temperature_schedule
from jdynconv.functional import mix_kernels as mix_kernels
from jdynconv.functional import mix_outputs as mix_outputs
from jdynconv.functional import per_sample_conv as per_sample_conv

__version__ = "0.1.0"

__all__ = ["__version__", "mix_kernels", "mix_outputs", "per_sample_conv", "temperature_schedule"]
