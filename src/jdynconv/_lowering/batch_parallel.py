"""Batch parallelism under SPMD: a function whose samples are independent runs on each device's shard only.

Every per-sample lowering computes ``out[b]`` from the ``b``-th slice of its batched arguments alone, but
XLA's partitioner cannot see that through a loop over the batch (``lax.map``) or a batch folded into
feature groups (``vmap``, the grouped trick; openxla issue 47945): given a batch-sharded argument, it
gathers the whole batch onto every device and computes all of it there. :func:`map_batch_shards` says it
for the partitioner: it runs the function under ``jax.shard_map`` over the mesh axes that split the batch,
so each device sees only its own samples and no batch-shaped data moves. ``shard_map`` has rules for every
JAX transformation (its JVP, transpose and batching are ``shard_map`` s too), so the derivatives, forward
mode, higher orders and an outer ``vmap`` stay local as well, whatever the lowering inside.

Which mesh axes split the batch, read from the traced argument's type (``jax.typeof(x).sharding``):

* ``Explicit`` axes (``jax.sharding.AxisType.Explicit``, e.g. a mesh from ``jax.make_mesh`` or under
  ``jax.set_mesh``): the axes the batch dimension's type names; none means the batch is replicated.
* ``Auto`` axes (a ``jax.sharding.Mesh`` built directly, arguments placed with ``NamedSharding`` and
  ``jax.jit`` left to propagate): the type names the mesh but not the batch's sharding, so the batch is
  split over the mesh's ``Auto`` axes, in mesh order, as far as their sizes divide the batch: every device
  computes a distinct part of the batch. Arguments already split that way are only sliced locally.
* ``Manual`` axes (inside the caller's ``jax.shard_map``): the arrays are already the local shards.

With no mesh (one device, no sharding) the function runs as it is: the same program as without this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, PartitionSpec


def batch_axes(x: jax.Array) -> tuple[Any, tuple[str, ...]]:
    """The abstract mesh of ``x``'s type and the mesh axes to split its leading (batch) dimension over."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not x.ndim:
        return mesh, ()
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    if any(kind == AxisType.Explicit for kind in types.values()):
        named = sharding.spec[0] if sharding is not None and len(sharding.spec) else None
        named = () if named is None else (named,) if isinstance(named, str) else tuple(named)
        return mesh, tuple(name for name in named if types[name] == AxisType.Explicit)
    axes: list[str] = []
    for name, size in zip(mesh.axis_names, mesh.axis_sizes, strict=True):
        if types[name] == AxisType.Auto and size > 1 and x.shape[0] % (math.prod(_sizes(mesh, axes)) * size) == 0:
            axes.append(name)
    return mesh, tuple(axes)


def _sizes(mesh: Any, axes: Sequence[str]) -> list[int]:
    return [mesh.shape[name] for name in axes]


def map_batch_shards(fn: Callable[..., Any], batched: Sequence[jax.Array], replicated: Sequence[Any] = ()) -> Any:
    """``fn(*batched, *replicated)``, each device computing only its own samples.

    Args:
      fn: a function whose outputs (a pytree of arrays with a leading batch dimension) hold, at batch
        index ``b``, a function of the ``b``-th slices of ``batched`` and of ``replicated`` alone.
      batched: arrays with the same leading batch dimension, split over the mesh axes found by
        :func:`batch_axes` of the first one.
      replicated: a pytree of arrays every sample uses whole (parameters): every device gets all of it, and
        their derivatives are summed over the devices.

    Returns:
      ``fn``'s outputs, with the batch split as ``batched[0]``'s.
    """
    mesh, axes = batch_axes(batched[0])
    if not axes:
        return fn(*batched, *replicated)
    batch_spec = PartitionSpec(axes)
    explicit = mesh.axis_types[mesh.axis_names.index(axes[0])] == AxisType.Explicit
    if explicit:
        batched = [_resharded(x, batch_spec) for x in batched]
        replicated = jax.tree.map(lambda r: _resharded(r, PartitionSpec()), replicated)
    num_batched = len(batched)

    def local(*args: Any) -> Any:
        # Marked as differing between devices where they enter, so that the transpose sums their
        # cotangents over the devices once, here, rather than wherever a loop inside first uses them.
        shared = jax.tree.map(lambda r: jax.lax.pcast(r, axes, to="varying"), args[num_batched:])
        return fn(*args[:num_batched], *shared)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(*([batch_spec] * num_batched), *jax.tree.map(lambda _: PartitionSpec(), tuple(replicated))),
        out_specs=batch_spec,
        axis_names=frozenset(axes),
    )(*batched, *replicated)


def _resharded(x: jax.Array, spec: PartitionSpec) -> jax.Array:
    """``x`` resharded to ``spec`` over its mesh's ``Explicit`` axes where its type says otherwise."""
    current = jax.typeof(x).sharding.spec
    wanted = tuple(spec) + (None,) * (x.ndim - len(spec))
    return x if tuple(current) + (None,) * (x.ndim - len(current)) == wanted else jax.sharding.reshard(x, spec)
