"""Port a PyTorch model to jdynconv, prove it computes the same function, fine-tune it in JAX, export it back.

The model is the seed question's (seeds/000): k parallel ``Conv2d -> BatchNorm2d -> LeakyReLU`` branches
whose outputs are summed with per-sample weights that an MLP (``Flatten -> Linear -> LeakyReLU``) predicts.
In jdynconv that whole block is one layer, ``jdynconv.linen.BranchMixConv``. The program:

1. builds the PyTorch model as the seed writes it, runs two training-mode batches so its BatchNorm running
   statistics are not the trivial (0, 1), and switches it to eval mode;
2. saves its ``state_dict()`` as ``.pt`` (``torch.save``) and ``.safetensors``;
3. loads each file with ``jdynconv.interop.load_state_dict`` (no unpickling of arbitrary objects) and
   converts it with ``jdynconv.interop.torch_to_linen`` into ``BranchMixConv`` variables;
4. prints the largest output difference between PyTorch and JAX in eval mode (both files) and in train
   mode (outputs and the updated running statistics);
5. fine-tunes the JAX block for a few optax steps in a ``jax.jit``-compiled loop;
6. exports the fine-tuned variables with ``jdynconv.interop.linen_to_torch``, loads them into a fresh
   PyTorch model and prints the largest output difference again.

Run it (it needs the torch extra: ``pip install -c constraints.txt -e ".[torch]"``)::

    python examples/port_from_pytorch.py
    python examples/port_from_pytorch.py --steps 20 --out-dir /tmp/ported   # keeps the weight files

jdynconv layers are channels-last: PyTorch's ``(B, C, H, W)`` is ``(B, H, W, C)`` here, so inputs are
transposed on the way in and outputs on the way out.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.torch
import torch
from torch import nn

from jdynconv import interop
from jdynconv import linen as jdc_linen


class SeedModel(nn.Module):
    """The seed's PyTorch model, as written there: ``x (B, C, H, W) -> (B, F, H', W')``.

    A Python loop over the k branches, ``torch.stack``, a broadcast multiply and a sum over the branch
    axis. The attribute names (``mlp``, ``convs``) give the state-dict keys that jdynconv's interop
    expects: ``mlp.1.weight``, ``convs.{n}.0.weight``, ``convs.{n}.1.running_var``, ...
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_branches: int,
        kernel_size: int,
        padding: int,
        input_size: tuple[int, int],
    ) -> None:
        super().__init__()
        height, width = input_size
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * height * width, num_branches), nn.LeakyReLU())
        self.convs = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding),
                    nn.BatchNorm2d(out_channels),
                    nn.LeakyReLU(),
                )
                for _ in range(num_branches)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv_weights = self.mlp(x)
        conv_outputs = []
        for conv in self.convs:
            conv_outputs.append(conv(x))
        conv_outputs = torch.stack(conv_outputs, dim=1)
        linear_comb = conv_weights[:, :, None, None, None] * conv_outputs
        return linear_comb.sum(1)


@dataclasses.dataclass(frozen=True)
class Config:
    """The model's shapes and the fine-tuning run (small, so the program runs in seconds on a CPU)."""

    in_channels: int = 3
    out_channels: int = 16
    num_branches: int = 4
    kernel_size: int = 3
    padding: int = 1
    size: tuple[int, int] = (16, 16)
    batch: int = 8
    steps: int = 8
    learning_rate: float = 0.001
    seed: int = 0


def make_torch_model(config: Config) -> SeedModel:
    return SeedModel(
        config.in_channels, config.out_channels, config.num_branches, config.kernel_size, config.padding, config.size
    )


def make_block(config: Config) -> jdc_linen.BranchMixConv:
    """The jdynconv layer matching ``SeedModel``.

    Its defaults already are the seed's: gate = flatten (channel-major, as ``nn.Flatten``) -> Dense(k) ->
    leaky_relu(0.01), branch activation leaky_relu(0.01), BatchNorm momentum 0.9 (Flax's convention for
    PyTorch's 0.1) and epsilon 1e-5. The settings below are the ones that differ from its defaults.
    """
    return jdc_linen.BranchMixConv(
        features=config.out_channels,
        kernel_size=config.kernel_size,
        num_branches=config.num_branches,
        # PyTorch's symmetric int padding; "SAME" would differ for even kernels or strides > 1.
        padding=config.padding,
        # PyTorch stores the unbiased batch variance in running_var, Flax the biased one.
        unbiased_running_var=True,
        # On GPU, JAX would otherwise run float32 convs and matmuls in TF32 (~1e-3 relative error).
        precision=jax.lax.Precision.HIGHEST,
    )


def to_nhwc(x: np.ndarray) -> jax.Array:
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def to_nchw(y: jax.Array) -> np.ndarray:
    return np.asarray(y).transpose(0, 3, 1, 2)


def max_abs_diff(actual: Any, expected: Any) -> float:
    return float(np.max(np.abs(np.asarray(actual) - np.asarray(expected))))


def max_abs(array: Any) -> float:
    return float(np.max(np.abs(np.asarray(array))))


def report(name: str, actual: Any, expected: Any) -> float:
    """Prints the largest absolute difference next to the largest magnitude, which gives it its scale."""
    diff = max_abs_diff(actual, expected)
    print(f"  {name:<44} max |diff| {diff:.2e}   (max |reference| {max_abs(expected):.2e})")
    return diff


def torch_forward(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def torch_running_stats(model: SeedModel) -> tuple[np.ndarray, np.ndarray]:
    """Every branch's BatchNorm ``running_mean`` and ``running_var``, stacked as jdynconv's ``(k, F)``."""
    norms = [branch[1] for branch in model.convs]
    mean = np.stack([norm.running_mean.numpy() for norm in norms])
    var = np.stack([norm.running_var.numpy() for norm in norms])
    return mean, var


def save_weights(model: nn.Module, out_dir: Path) -> tuple[Path, Path]:
    """The two formats a PyTorch user is likely to hand over."""
    pt_path = out_dir / "seed_model.pt"
    safetensors_path = out_dir / "seed_model.safetensors"
    state_dict = model.state_dict()
    torch.save(state_dict, pt_path)
    safetensors.torch.save_file(state_dict, safetensors_path)
    return pt_path, safetensors_path


def fine_tune(
    block: jdc_linen.BranchMixConv,
    variables: Mapping[str, Any],
    x: jax.Array,
    target: jax.Array,
    config: Config,
) -> tuple[dict[str, Any], list[float]]:
    """A few SGD steps on a mean squared error, BatchNorm in train mode; returns the variables and losses."""
    # Plain SGD keeps every dtype float32: the parity tests run this program under strict dtype
    # promotion, which optax.adam's int32 step counter trips over (optax mixes it with Python floats).
    optimizer = optax.sgd(config.learning_rate)

    def loss_fn(params: Any, batch_stats: Any) -> tuple[jax.Array, Any]:
        y, updates = block.apply(
            {"params": params, "batch_stats": batch_stats}, x, use_running_average=False, mutable=["batch_stats"]
        )
        return jnp.mean(jnp.square(y - target)), updates["batch_stats"]

    @jax.jit
    def train_step(params: Any, batch_stats: Any, opt_state: Any) -> tuple[Any, Any, Any, jax.Array]:
        # The running statistics are outputs of the forward pass, not parameters: carried, not differentiated.
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = optimizer.init(params)
    losses = []
    for step in range(config.steps):
        params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state)
        losses.append(float(loss))
        print(f"  step {step + 1:>3}/{config.steps}: loss {losses[-1]:.6f}")
    return {"params": params, "batch_stats": batch_stats}, losses


def port(config: Config, out_dir: Path) -> dict[str, float]:
    """Runs the six steps of the module docstring; returns every measured difference and the losses."""
    results: dict[str, float] = {}
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    shape = (config.batch, config.in_channels, *config.size)
    x = rng.standard_normal(shape, dtype=np.float32)

    print("1. PyTorch model (the seed's, as written)")
    model = make_torch_model(config)
    model.train()
    with torch.no_grad():  # two training batches: running statistics that a wrong port would not reproduce
        for _ in range(2):
            model(torch.randn(shape))
    model.eval()
    print(f"  x {shape} -> y {tuple(torch_forward(model, x).shape)}, {config.num_branches} branches")

    print(f"2. Saving its state_dict() to {out_dir}")
    paths = save_weights(model, out_dir)
    for path in paths:
        print(f"  {path.name} ({path.stat().st_size} bytes)")

    print("3. Loading both files into jdynconv.linen.BranchMixConv")
    block = make_block(config)
    loaded = {path.suffix[1:]: interop.torch_to_linen(block, interop.load_state_dict(path)) for path in paths}
    variables = loaded["pt"]
    for collection, arrays in variables.items():
        print(f"  {collection}: " + ", ".join(f"{name} {array.shape}" for name, array in arrays.items()))
    # Both files hold the same float32 tensors, so the two conversions must agree bit for bit.
    format_diffs = jax.tree.map(max_abs_diff, loaded["pt"], loaded["safetensors"])
    results["formats_max_abs_diff"] = max(jax.tree.leaves(format_diffs))
    print(f"  .pt vs .safetensors variables: max |diff| {results['formats_max_abs_diff']:.1e}")

    print("4. PyTorch vs JAX, same weights, same input")
    x_nhwc = to_nhwc(x)
    expected = torch_forward(model, x)
    results["eval_output_max_abs"] = max_abs(expected)
    for suffix, file_variables in loaded.items():
        y = block.apply(file_variables, x_nhwc, use_running_average=True)
        results[f"eval_max_abs_diff_{suffix}"] = report(f"eval mode, weights from .{suffix}", to_nchw(y), expected)
    # A copy: a train-mode forward updates the running statistics, and the original stays the reference.
    train_model = copy.deepcopy(model).train()
    expected = torch_forward(train_model, x)
    y, updates = block.apply(variables, x_nhwc, use_running_average=False, mutable=["batch_stats"])
    results["train_output_max_abs"] = max_abs(expected)
    results["train_max_abs_diff"] = report("train mode (batch statistics)", to_nchw(y), expected)
    torch_mean, torch_var = torch_running_stats(train_model)
    stats = updates["batch_stats"]
    results["running_mean_max_abs_diff"] = report("running_mean after that step", stats["mean"], torch_mean)
    results["running_var_max_abs_diff"] = report("running_var after that step", stats["var"], torch_var)

    print(f"5. Fine-tuning in JAX: {config.steps} jit-compiled SGD steps, MSE against a random target")
    target = jnp.asarray(rng.standard_normal(y.shape, dtype=np.float32))
    tuned, losses = fine_tune(block, variables, x_nhwc, target, config)
    results["initial_loss"], results["final_loss"] = losses[0], losses[-1]

    print("6. Exporting back to PyTorch")
    state_dict = interop.linen_to_torch(block, tuned)
    fresh = make_torch_model(config)
    # strict=True: the export has every key of the seed's state_dict. num_batches_tracked has no Flax
    # counterpart and comes back as 0; PyTorch reads it only for BatchNorm(momentum=None), not used here.
    fresh.load_state_dict({key: torch.from_numpy(value) for key, value in state_dict.items()}, strict=True)
    fresh.eval()
    expected = torch_forward(fresh, x)
    y = block.apply(tuned, x_nhwc, use_running_average=True)
    results["export_output_max_abs"] = max_abs(expected)
    results["export_max_abs_diff"] = report("eval mode, fine-tuned JAX vs re-imported", to_nchw(y), expected)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Parses the flags, runs the port; returns the measured differences, output magnitudes and losses."""
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=defaults.steps, help="fine-tuning steps (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="torch and NumPy seed (default %(default)s)")
    parser.add_argument(
        "--learning-rate", type=float, default=defaults.learning_rate, help="SGD learning rate (default %(default)s)"
    )
    parser.add_argument("--out-dir", type=Path, help="where to write the weight files (default: a temporary dir)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    config = dataclasses.replace(defaults, steps=args.steps, seed=args.seed, learning_rate=args.learning_rate)
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        return port(config, args.out_dir)
    with tempfile.TemporaryDirectory(prefix="port_from_pytorch_") as tmp:
        return port(config, Path(tmp))


if __name__ == "__main__":
    main()
