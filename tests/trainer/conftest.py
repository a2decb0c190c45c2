"""Settings and helpers for the tests of ``examples/trainer`` (the training example's pieces)."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np
import pytest


@pytest.fixture(autouse=True, scope="package")
def standard_promotion() -> Iterator[None]:
    """optax's Adam computes ``1 - b1 ** count`` with an int32 count, which strict promotion refuses
    (optax 0.2.8), so the training loop runs under JAX's default promotion, as users run it.

    Package scope: module-scoped fixtures here train models, and they must see the setting too; it
    ends with this directory, so the rest of the suite stays strict."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def leaves(tree: object) -> dict[str, np.ndarray]:
    """Every array of ``tree`` by its path, on the host (for exact and approximate comparisons)."""
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
