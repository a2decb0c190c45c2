"""Strict JAX settings for every test: bugs that silent promotion or broadcasting hide fail loudly."""

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
