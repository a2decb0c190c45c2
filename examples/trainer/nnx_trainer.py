"""The NNX training step: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` updated in place under ``nnx.jit``."""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from .model import ModelConfig, NnxClassifier
from .sharding import replicate
from .steps import Metrics, loss_and_metrics


@nnx.jit
def _train_step(
    model: NnxClassifier, optimizer: nnx.Optimizer, images: jax.Array, labels: jax.Array, temperature: jax.Array
) -> Metrics:
    def loss_fn(model: NnxClassifier) -> tuple[jax.Array, Metrics]:
        return loss_and_metrics(model(images, temperature=temperature), labels)

    # Gradients of the nnx.Param variables only; BranchMixConv's BatchStat updates are written back
    # to the model by nnx.jit.
    grads, metrics = nnx.grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return metrics


@nnx.jit
def _logits(model: NnxClassifier, images: jax.Array, temperature: jax.Array) -> jax.Array:
    return model(images, temperature=temperature)


class NnxTrainer:
    """``NnxClassifier`` + ``nnx.Optimizer``, replicated over ``mesh``; see ``steps.Trainer``."""

    def __init__(self, config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, seed: int) -> None:
        self.model = NnxClassifier(config, rngs=nnx.Rngs(seed))
        self.optimizer = nnx.Optimizer(self.model, tx, wrt=nnx.Param)
        self._mesh = mesh
        self.load_state(self.state())  # places every variable on the mesh

    def train_step(self, images: jax.Array, labels: jax.Array, temperature: jax.Array) -> Metrics:
        self.model.train()  # batch statistics, running averages updated
        return _train_step(self.model, self.optimizer, images, labels, temperature)

    def logits(self, images: jax.Array, temperature: jax.Array) -> jax.Array:
        self.model.eval()  # running statistics
        return _logits(self.model, images, temperature)

    def state(self) -> dict[str, Any]:
        return {
            "model": nnx.to_pure_dict(nnx.state(self.model)),
            "optimizer": nnx.to_pure_dict(nnx.state(self.optimizer)),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        state = replicate(state, self._mesh)
        for name, node in (("model", self.model), ("optimizer", self.optimizer)):
            current = nnx.state(node)
            nnx.replace_by_pure_dict(current, state[name])
            nnx.update(node, current)

    def variables(self) -> dict[str, Any]:
        return {
            "params": nnx.to_pure_dict(nnx.state(self.model, nnx.Param)),
            "batch_stats": nnx.to_pure_dict(nnx.state(self.model, nnx.BatchStat)),
        }
