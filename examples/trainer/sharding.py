"""Data parallelism: one mesh axis over the devices, parameters replicated, the batch split.

Under ``jax.jit`` the step is written for the global batch; XLA partitions it from the input
shardings and inserts the all-reduces, so BatchNorm's statistics and the loss's mean are over the
global batch, exactly as on one device. Multi-host: call ``jax.distributed.initialize()`` first, and
``jax.devices()`` then lists every host's devices (each host feeds its slice of the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
Tree = TypeVar("Tree")


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``"data"`` over ``devices`` (default: every device of every host)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("`devices` must name at least one device, got an empty sequence.")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, batch statistics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_split(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis is split over the ``"data"`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree: Tree, mesh: Mesh) -> Tree:
    """Place every array of ``tree`` on every device of ``mesh``."""
    return jax.device_put(tree, replicated(mesh))
