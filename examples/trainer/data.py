"""A synthetic 10-class image dataset generated in-process: noisy oriented gratings.

Class ``c`` is a sinusoidal grating at orientation ``c * 18`` degrees (jittered by up to +-4.5 degrees)
with a random spatial frequency, phase and contrast, plus Gaussian pixel noise. Orientation is what
the classes differ in, so a model must learn oriented filters; the noise and the random frequency and
contrast keep it from being trivial. Batches are a pure function of ``(key, step)``, so a resumed run
sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NUM_CLASSES = 10
IMAGE_SIZE = 32
NOISE_STD = 1.6


def make_batch(key: jax.Array, batch_size: int, noise_std: float = NOISE_STD) -> tuple[jax.Array, jax.Array]:
    """``batch_size`` gratings: images ``(B, 32, 32, 1)`` float32 and labels ``(B,)`` int32."""
    label_key, jitter_key, freq_key, phase_key, contrast_key, noise_key = jax.random.split(key, 6)
    labels = jax.random.randint(label_key, (batch_size,), 0, NUM_CLASSES, dtype=jnp.int32)
    jitter = jax.random.uniform(jitter_key, (batch_size,), minval=-0.25, maxval=0.25)
    angle = (labels.astype(jnp.float32) + jitter) * jnp.float32(math.pi / NUM_CLASSES)
    frequency = jax.random.uniform(freq_key, (batch_size,), minval=0.08, maxval=0.2)  # cycles per pixel
    phase = jax.random.uniform(phase_key, (batch_size,), maxval=2 * math.pi)
    contrast = jax.random.uniform(contrast_key, (batch_size,), minval=0.4, maxval=1.0)

    coords = jnp.arange(IMAGE_SIZE, dtype=jnp.float32) - (IMAGE_SIZE - 1) / 2
    rows, cols = jnp.meshgrid(coords, coords, indexing="ij")
    # Broadcast per-sample scalars against the (H, W) grid explicitly (rank promotion may be strict).
    along = cols[None] * jnp.cos(angle)[:, None, None] + rows[None] * jnp.sin(angle)[:, None, None]
    wave = jnp.cos(2 * math.pi * frequency[:, None, None] * along + phase[:, None, None])
    noise = noise_std * jax.random.normal(noise_key, (batch_size, IMAGE_SIZE, IMAGE_SIZE))
    images = contrast[:, None, None] * wave + noise
    return images[..., None], labels


def batch_for_step(data_key: jax.Array, step: int | jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """The training batch of ``step``: a function of the data key and the step only."""
    return make_batch(jax.random.fold_in(data_key, step), batch_size)
