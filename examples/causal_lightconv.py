"""A small causal sequence model of DynamicLightweightConv layers, trained with optax and decoded step by step.

The task: sequences of tokens where each token is the sum of the two before it, modulo the vocabulary (a seed pair
drawn at random). A causal model with a 3-tap receptive field per layer can learn it. Two blocks of
``DynamicLightweightConv`` (fairseq's ``DynamicConv1dTBC``: a kernel per time step predicted from the input,
softmax over the taps, causal) with a GLU input projection and a residual, as fairseq's ``lightconv`` decoder
layers, then a linear read-out.

After training, the model generates continuations of unseen seed pairs one token at a time with ``decode=True``
(each layer keeps its last K - 1 inputs in the ``cache`` collection, as Flax's attention does), and the logits of
the step-by-step pass are compared with the full causal pass over the same sequence.

Run: ``python examples/causal_lightconv.py [--steps 300]``.
"""

from __future__ import annotations

import argparse
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdynconv import linen as jdc_linen

VOCAB, WIDTH, HEADS, KERNEL, LENGTH = 16, 32, 4, 3, 24


def sequences(key: jax.Array, batch: int) -> jax.Array:
    """``(batch, LENGTH)`` int32: ``s[t] = (s[t - 1] + s[t - 2]) % VOCAB`` from a random pair."""
    seeds = jax.random.randint(key, (batch, 2), 0, VOCAB)
    tokens = [seeds[:, 0], seeds[:, 1]]
    for _ in range(LENGTH - 2):
        tokens.append((tokens[-1] + tokens[-2]) % VOCAB)
    return jnp.stack(tokens, axis=1)


class Block(nn.Module):
    """fairseq's lightconv layer, reduced: GLU projection, causal dynamic convolution, output projection,
    residual and LayerNorm."""

    @nn.compact
    def __call__(self, x: jax.Array, decode: bool = False) -> jax.Array:
        hidden = nn.glu(nn.Dense(2 * WIDTH)(x))
        hidden = jdc_linen.DynamicLightweightConv(
            KERNEL, num_heads=HEADS, padding="CAUSAL", weight_softmax=True, name="conv"
        )(hidden, deterministic=True, decode=decode)
        return nn.LayerNorm()(x + nn.Dense(WIDTH)(hidden))


class Model(nn.Module):
    @nn.compact
    def __call__(self, tokens: jax.Array, decode: bool = False) -> jax.Array:
        x = nn.Embed(VOCAB, WIDTH)(tokens)
        for _ in range(2):
            x = Block()(x, decode)
        return nn.Dense(VOCAB)(x)


def train(steps: int, seed: int = 0) -> tuple[Model, Any, list[float]]:
    model = Model()
    key, init_key = jax.random.split(jax.random.key(seed))
    params = model.init(init_key, sequences(key, 2))["params"]
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params: Any, opt_state: Any, tokens: jax.Array) -> tuple[Any, Any, jax.Array]:
        def loss_fn(params: Any) -> jax.Array:
            logits = model.apply({"params": params}, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        key, batch_key = jax.random.split(key)
        params, opt_state, loss = step(params, opt_state, sequences(batch_key, 64))
        losses.append(float(loss))
    return model, params, losses


def decode(model: Model, params: Any, prompt: jax.Array, new_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Greedy generation, one token per step with the layers' caches: the tokens and every step's logits."""
    cache = model.init(jax.random.key(0), prompt[:, :1], decode=True)["cache"]

    @jax.jit
    def step(cache: Any, token: jax.Array) -> tuple[jax.Array, Any]:
        logits, updates = model.apply({"params": params, "cache": cache}, token, decode=True, mutable=["cache"])
        return logits, updates["cache"]

    tokens, all_logits = [prompt[:, :1]], []
    for t in range(prompt.shape[1] + new_tokens - 1):
        logits, cache = step(cache, tokens[-1])
        all_logits.append(logits)
        following = prompt[:, t + 1 : t + 2] if t + 1 < prompt.shape[1] else jnp.argmax(logits, axis=-1)
        tokens.append(following.astype(jnp.int32))
    return jnp.concatenate(tokens, axis=1), jnp.concatenate(all_logits, axis=1)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    model, params, losses = train(args.steps)
    print(f"loss: {losses[0]:.3f} at step 1 -> {np.mean(losses[-20:]):.3f} (mean of the last 20 steps)")
    truth = sequences(jax.random.key(123), 8)
    generated, step_logits = decode(model, params, truth[:, :2], LENGTH - 2)
    accuracy = float(jnp.mean(generated[:, 2:] == truth[:, 2:]))
    full_logits = jax.jit(model.apply)({"params": params}, generated[:, :-1])
    gap = float(jnp.max(jnp.abs(step_logits - full_logits)))
    print(f"generated from 8 unseen seed pairs: {accuracy:.0%} of {LENGTH - 2} tokens each correct")
    print(f"step-by-step logits vs the full causal pass: max |difference| {gap:.2e}")
    return {"first_loss": losses[0], "final_loss": float(np.mean(losses[-20:])), "accuracy": accuracy, "gap": gap}


if __name__ == "__main__":
    main()
