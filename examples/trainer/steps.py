"""What the linen and NNX training loops share: the optimizer, the loss, the trainer interface."""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax

Metrics = dict[str, jax.Array]


def make_optimizer(steps: int, learning_rate: float) -> optax.GradientTransformation:
    """AdamW with a linear warm-up (a tenth of the run) and a cosine decay to 5% over ``steps``."""
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1, got {steps}.")
    warmup = max(1, steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps=warmup, decay_steps=max(steps, warmup + 1), end_value=0.05 * learning_rate
    )
    return optax.adamw(schedule, weight_decay=1e-4)


def loss_and_metrics(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, Metrics]:
    """Mean softmax cross-entropy, and the batch's loss and accuracy as metrics."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
    return loss, {"loss": loss, "accuracy": accuracy}


class Trainer(Protocol):
    """A model with its optimizer state, placed on a mesh; the loop in ``loop.py`` drives it."""

    def train_step(self, images: jax.Array, labels: jax.Array, temperature: jax.Array) -> Metrics:
        """One optimizer step on a (sharded) batch in train mode; returns the batch's metrics."""
        ...

    def logits(self, images: jax.Array, temperature: jax.Array) -> jax.Array:
        """Eval-mode logits (BatchNorm running statistics)."""
        ...

    def state(self) -> dict[str, Any]:
        """Everything training needs to continue, as a pytree of arrays (what checkpoints hold)."""
        ...

    def load_state(self, state: dict[str, Any]) -> None:
        """Replace the training state with ``state`` (a pytree shaped like ``self.state()``)."""
        ...

    def variables(self) -> dict[str, Any]:
        """``{"params": ..., "batch_stats": ...}`` as nested dicts of arrays (to compare runs)."""
        ...
