"""The example's classifier, in linen and in NNX: BranchMixConv, then two DynamicConv stages.

``(B, 32, 32, 1)`` -> BranchMixConv (k branches of Conv 3x3 stride 2 -> BatchNorm -> leaky_relu, gate
from the flattened image, as the seed) -> DynamicConv -> relu -> max-pool -> DynamicConv -> relu ->
global mean -> Dense -> ``(B, num_classes)`` logits. The first block has stride 2 because full-resolution
convs dominate the step's time on CPU, and no conv bias: BatchNorm subtracts it again (its gradient is
rounding noise, which Adam would scale up to full-size steps). ``temperature`` is the DynamicConv softmax
temperature, a (traced) call argument so one compiled step serves the whole annealing schedule.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from jdynconv import linen as jl
from jdynconv import nnx as jn

from .data import IMAGE_SIZE, NUM_CLASSES


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes shared by the linen and NNX models (and recorded in checkpoints)."""

    width: int = 16
    num_branches: int = 4
    num_experts: int = 4
    num_classes: int = NUM_CLASSES


def _pool(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (2, 2), strides=(2, 2))


class LinenClassifier(nn.Module):
    """The classifier in linen. Variables: ``params`` and ``batch_stats`` (BranchMixConv's BatchNorms)."""

    config: ModelConfig = ModelConfig()

    @nn.compact
    def __call__(self, images: jax.Array, *, temperature: float | jax.Array, train: bool) -> jax.Array:
        """``images (B, 32, 32, 1)`` -> logits ``(B, num_classes)``; ``train`` picks batch vs running statistics."""
        c = self.config
        x = jl.BranchMixConv(c.width, 3, c.num_branches, strides=2, padding=1, use_bias=False)(
            images, use_running_average=not train
        )
        x = nn.relu(jl.DynamicConv(2 * c.width, 3, c.num_experts)(x, temperature))
        x = _pool(x)
        x = nn.relu(jl.DynamicConv(4 * c.width, 3, c.num_experts)(x, temperature))
        return nn.Dense(c.num_classes)(jnp.mean(x, axis=(1, 2)))


class NnxClassifier(nnx.Module):
    """The same classifier in NNX; ``model.train()`` / ``model.eval()`` switch BatchNorm's statistics."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs) -> None:
        c = config
        self.mix = jn.BranchMixConv(
            1,
            c.width,
            (3, 3),
            c.num_branches,
            strides=2,
            padding=1,
            use_bias=False,
            input_shape=(IMAGE_SIZE,) * 2,
            rngs=rngs,
        )
        self.dynamic1 = jn.DynamicConv(c.width, 2 * c.width, (3, 3), c.num_experts, rngs=rngs)
        self.dynamic2 = jn.DynamicConv(2 * c.width, 4 * c.width, (3, 3), c.num_experts, rngs=rngs)
        self.head = nnx.Linear(4 * c.width, c.num_classes, rngs=rngs)

    def __call__(self, images: jax.Array, *, temperature: float | jax.Array) -> jax.Array:
        """``images (B, 32, 32, 1)`` -> logits ``(B, num_classes)``."""
        x = _pool(nnx.relu(self.dynamic1(self.mix(images), temperature)))
        x = nnx.relu(self.dynamic2(x, temperature))
        return self.head(jnp.mean(x, axis=(1, 2)))
