"""jdynconv: input-dependent convolution for JAX and Flax.

Per-sample convolution (every batch element its own kernel), weighted branch mixing, and kernel
mixing, as pure functions over ``jax.lax`` with Flax modules on top.
"""

from jdynconv.functional import mix_kernels as mix_kernels
from jdynconv.functional import mix_outputs as mix_outputs
from jdynconv.functional import per_sample_conv as per_sample_conv

__version__ = "0.1.0"

__all__ = ["__version__", "mix_kernels", "mix_outputs", "per_sample_conv"]
