"""Port a small PyTorch network with several dynamic layers to a Flax linen model, and check it.

The PyTorch network: a conv stem, timm's ``CondConv2d`` (with its routing ``nn.Linear``), OSVAI's ``ODConv2d``
(stride 2), a Dynamic Convolution layer (temperature 4), global average pooling and a ``Linear`` head. The
PyTorch references are the parity suite's (``parity/``), which stand for the user's own copies.

1. :func:`jdynconv.interop.from_torch` builds each dynamic layer's jdynconv twin, every setting read from the
   torch module; the Flax model takes them as attributes.
2. The whole network's ``state_dict()`` is loaded in one go by prefix rules: each layer's registered rules
   (:func:`~jdynconv.interop.rules_for`) moved under its place (:func:`~jdynconv.interop.under`), plus the stem's
   and head's, into :func:`~jdynconv.interop.flax_from_torch`.
3. The logits are compared in eval mode, then the gradients of a loss with respect to every parameter, named
   back in PyTorch's terms by :func:`~jdynconv.interop.torch_names`.

Run from the repository root: ``python examples/port_model.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from jdynconv import interop

# The PyTorch references live in the repository's parity/ package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parity.kernel_mix_models import DynamicConvNd, RoutedCondConv2d
from parity.odconv_reference import ODConvNd

IN_CHANNELS, WIDTH, CLASSES = 3, 8, 10


class TorchNet(torch.nn.Module):
    """``(B, 3, H, W)`` -> logits ``(B, 10)``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(IN_CHANNELS, WIDTH, 3, padding=1)
        self.cond = RoutedCondConv2d(WIDTH, WIDTH, kernel_size=3, num_experts=3, bias=True)
        self.od = ODConvNd(WIDTH, 2 * WIDTH, 3, stride=2, padding=1, kernel_num=2)
        self.dynamic = DynamicConvNd(2 * WIDTH, 2 * WIDTH, (3, 3), padding=1, K=3, temperature=4.0)
        self.head = torch.nn.Linear(2 * WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.cond(x))
        x = F.relu(self.od(x))
        x = F.relu(self.dynamic(x))
        return self.head(x.mean(dim=(2, 3)))


class Net(nn.Module):
    """The Flax twin, channels last: ``(B, H, W, 3)`` -> ``(B, 10)``; the dynamic layers come from ``from_torch``."""

    cond: nn.Module
    od: nn.Module
    dynamic: nn.Module

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = nn.relu(nn.Conv(WIDTH, (3, 3), padding=((1, 1), (1, 1)), name="stem")(x))
        x = nn.relu(self.cond(x))
        x = nn.relu(self.od(x, use_running_average=not train))
        x = nn.relu(self.dynamic(x))
        return nn.Dense(CLASSES, name="head")(x.mean(axis=(1, 2)))


def port(torch_net: TorchNet) -> tuple[Net, dict[str, Any], list[interop.Rule]]:
    """The Flax model, its variables loaded from ``torch_net.state_dict()``, and the rules that did it."""
    layers = {name: interop.from_torch(getattr(torch_net, name)) for name in ("cond", "od", "dynamic")}
    net = Net(**{name: layer for name, (layer, _) in layers.items()})

    def param(*path: str) -> interop.Target:
        return interop.Target(("params", *path))

    rules = [
        *interop.conv_rules(
            "stem",
            kernel=param("stem", "kernel"),
            bias=param("stem", "bias"),
            features=WIDTH,
            in_features_per_group=IN_CHANNELS,
            kernel_size=(3, 3),
        ),
        *(
            rule
            for name, (layer, variables) in layers.items()
            for rule in interop.under(name, name, interop.rules_for(layer, variables))
        ),
        *interop.linear_rules(
            "head", kernel=param("head", "kernel"), bias=param("head", "bias"), in_features=2 * WIDTH, features=CLASSES
        ),
    ]
    variables = interop.flax_from_torch(rules, torch_net.state_dict(), dtype=lambda key: jnp.float32)
    return net, variables, rules


def run(batch: int = 4, size: int = 8, seed: int = 0) -> dict[str, float]:
    """Ports a freshly initialised ``TorchNet``; returns the largest differences and the reference scales."""
    torch.manual_seed(seed)
    torch_net = TorchNet().eval()
    with torch.no_grad():  # the heads' biases and BatchNorm off their initial constants
        for name, value in torch_net.named_parameters():
            if name.endswith("bias"):
                value.uniform_(-0.5, 0.5)
        torch_net.od.attention.bn.running_var.uniform_(0.5, 2.0)
    net, variables, rules = port(torch_net)

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, IN_CHANNELS, size, size)).astype(np.float32)
    target = rng.normal(size=(batch, CLASSES)).astype(np.float32)

    x_torch = torch.from_numpy(x)
    logits_torch = torch_net(x_torch)
    ((logits_torch - torch.from_numpy(target)) ** 2).mean().backward()
    expected_grads = {name: value.grad.numpy() for name, value in torch_net.named_parameters()}

    x_last = jnp.moveaxis(jnp.asarray(x), 1, -1)  # PyTorch's (B, C, H, W) -> channels last

    def loss(params: Any) -> tuple[jax.Array, jax.Array]:
        logits = net.apply({**variables, "params": params}, x_last)
        return jnp.mean((logits - target) ** 2), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    named_grads = interop.torch_names(rules, grads)
    expected_logits = logits_torch.detach().numpy()
    print(f"logits: max |jax - torch| = {np.abs(np.asarray(logits) - expected_logits).max():.2e}")
    results = {
        "logits_max_abs_diff": float(np.abs(np.asarray(logits) - expected_logits).max()),
        "logits_max_abs": float(np.abs(expected_logits).max()),
    }
    if named_grads.keys() != expected_grads.keys():
        raise AssertionError(f"gradient names differ: {sorted(named_grads.keys() ^ expected_grads.keys())}")
    for name, expected in expected_grads.items():
        diff = float(np.abs(named_grads[name] - expected).max())
        results[f"grad {name} max_abs_diff"] = diff
        results[f"grad {name} max_abs"] = float(np.abs(expected).max())
        print(f"d loss / d {name} {tuple(expected.shape)}: max |jax - torch| = {diff:.2e}")
    return results


if __name__ == "__main__":
    run()
