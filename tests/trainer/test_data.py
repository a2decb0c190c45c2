"""The synthetic gratings: shapes, determinism by step, and that the label is the orientation."""

from __future__ import annotations

import math

import jax
import numpy as np
from trainer import data
from trainer.data import IMAGE_SIZE, NUM_CLASSES

# The generators as the training loop runs them: compiled, one program a batch size (called eagerly, each of
# their few dozen operations was compiled on its own).
make_batch = jax.jit(data.make_batch, static_argnums=1)
batch_for_step = jax.jit(data.batch_for_step, static_argnums=2)


def test_shapes_and_dtypes() -> None:
    images, labels = make_batch(jax.random.key(0), 16)
    assert images.shape == (16, IMAGE_SIZE, IMAGE_SIZE, 1)
    assert images.dtype == np.float32
    assert labels.shape == (16,)
    assert labels.dtype == np.int32
    assert set(np.asarray(labels).tolist()) <= set(range(NUM_CLASSES))


def test_batches_depend_on_key_and_step_only() -> None:
    key = jax.random.key(3)
    first, again, later = (batch_for_step(key, step, 8) for step in (5, 5, 6))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], later[0])


def test_every_class_appears_in_a_large_batch() -> None:
    _, labels = make_batch(jax.random.key(1), 2000)
    counts = np.bincount(np.asarray(labels), minlength=NUM_CLASSES)
    assert counts.min() > 2000 / NUM_CLASSES / 2


def test_noise_free_grating_orientation_is_the_label() -> None:
    """A float64 matched filter over a fine grid of angles and frequencies finds each noise-free
    image's grating at its class angle, up to the generator's jitter of +-0.25 class (4.5 degrees)."""
    images, labels = make_batch(jax.random.key(2), 16, noise_std=0.0)
    coords = np.arange(IMAGE_SIZE, dtype=np.float64) - (IMAGE_SIZE - 1) / 2
    rows, cols = np.meshgrid(coords, coords, indexing="ij")
    angles = np.deg2rad(np.arange(0.0, 180.0, 1.0))
    freqs = np.linspace(0.06, 0.22, 17)
    along = cols[None] * np.cos(angles)[:, None, None] + rows[None] * np.sin(angles)[:, None, None]
    filters = np.exp(-2j * math.pi * freqs[:, None, None, None] * along[None])  # (freq, angle, H, W)
    response = np.abs(np.einsum("fahw,bhw->bfa", filters, np.asarray(images[..., 0], np.float64)))
    for image_response, label in zip(response, np.asarray(labels), strict=True):
        _, best = np.unravel_index(np.argmax(image_response), image_response.shape)
        expected = label * math.pi / NUM_CLASSES
        error = abs(angles[best] - expected)
        error = min(error, math.pi - error)  # orientation is modulo 180 degrees
        # jitter (4.5 degrees) + the 1-degree grid + the peak's shift from the 32-pixel window.
        assert math.degrees(error) <= 6.0, (label, math.degrees(angles[best]))
