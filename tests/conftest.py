"""Strict JAX settings for every test: bugs that silent promotion or broadcasting hide fail loudly.

Hypothesis draws new examples on every local run (that is how the lhs_dilation abort in
``canonical.shared_conv`` was found); under CI (``CI`` set) it replays a fixed derivation so a red
run can be reproduced exactly.
"""

import os

import jax
from hypothesis import settings

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
