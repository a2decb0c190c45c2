"""The training loop: data, temperature schedule, steps, evaluation, progress bar, checkpoints."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import jdynconv

from .checkpoints import CheckpointError, Checkpoints, open_for_resume
from .data import batch_for_step, make_batch
from .linen_trainer import LinenTrainer
from .model import ModelConfig
from .nnx_trainer import NnxTrainer
from .sharding import batch_split, data_mesh
from .steps import Trainer, make_optimizer

APIS = ("linen", "nnx")
# The held-out set is the same whatever --seed, so accuracies of different runs compare.
EVAL_KEY = 2026
EVAL_CHUNK = 256
LOG_EVERY = 10


class ConfigError(ValueError):
    """Settings the loop cannot run with (named, with the value received)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One run's settings (``examples/train.py``'s flags)."""

    api: str = "linen"
    steps: int = 600
    batch_size: int = 64
    seed: int = 0
    learning_rate: float = 3e-3
    anneal_fraction: float = 0.5  # DynamicConv temperature goes 30 -> 1 over this fraction of the steps
    eval_every: int = 100
    eval_size: int = 1024
    ckpt_dir: str | None = None
    ckpt_every: int = 100
    resume: bool = False
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)

    def check(self, num_devices: int) -> None:
        """Clear errors for settings the loop cannot run with."""
        if self.api not in APIS:
            raise ConfigError(f"`api` must be one of {APIS}, got {self.api!r}.")
        for name in ("steps", "batch_size", "eval_every", "eval_size", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        # Batches are split evenly over the devices: a clear error here instead of XLA's.
        for name in ("batch_size", "eval_size"):
            if getattr(self, name) % num_devices:
                raise ConfigError(
                    f"`{name}` must be a multiple of the number of devices ({num_devices}) to split evenly, "
                    f"got {getattr(self, name)}."
                )
        if not 0 < self.anneal_fraction <= 1:
            raise ConfigError(f"`anneal_fraction` must be in (0, 1], got {self.anneal_fraction}.")
        if self.resume and self.ckpt_dir is None:
            raise ConfigError("`resume` needs `ckpt_dir`: the directory to resume from.")

    def record(self) -> dict[str, Any]:
        """What a checkpoint records: the settings a resumed run must share (the length may change)."""
        fields = dataclasses.asdict(self)
        for name in ("steps", "eval_every", "ckpt_dir", "ckpt_every", "resume"):
            fields.pop(name)
        return fields


@dataclasses.dataclass
class FitResult:
    """What a run produced. ``history``: ``train`` rows ``[step, loss, accuracy, temperature]`` (means
    over ``LOG_EVERY`` steps) and ``eval`` rows ``[step, accuracy]`` on the held-out set."""

    trainer: Trainer
    history: dict[str, list[list[float]]]
    start_step: int
    steps: int
    seconds: float
    num_devices: int

    @property
    def final_accuracy(self) -> float:
        return self.history["eval"][-1][1]


def make_trainer(config: TrainConfig, mesh: jax.sharding.Mesh) -> Trainer:
    tx = make_optimizer(config.steps, config.learning_rate)
    cls = LinenTrainer if config.api == "linen" else NnxTrainer
    return cls(config.model, tx, mesh, config.seed)


def temperature(config: TrainConfig, step: int) -> jax.Array:
    anneal_steps = max(1, round(config.steps * config.anneal_fraction))
    return jdynconv.temperature_schedule(step, anneal_steps=anneal_steps)


def evaluate(trainer: Trainer, images: jax.Array, labels: jax.Array, temp: jax.Array) -> float:
    """Eval-mode accuracy over the held-out set, in chunks (bounded activation memory)."""
    correct = 0
    for start in range(0, images.shape[0], EVAL_CHUNK):
        logits = trainer.logits(images[start : start + EVAL_CHUNK], temp)
        correct += int(jnp.sum(jnp.argmax(logits, axis=-1) == labels[start : start + EVAL_CHUNK]))
    return correct / images.shape[0]


def _open_checkpoints(config: TrainConfig, trainer: Trainer) -> tuple[Checkpoints | None, int, dict[str, Any]]:
    """The checkpoint manager, the step to start from and the history so far."""
    history: dict[str, list[list[float]]] = {"train": [], "eval": []}
    if config.ckpt_dir is None:
        return None, 0, history
    if not config.resume:
        checkpoints = Checkpoints(config.ckpt_dir)
        if (latest := checkpoints.latest_step()) is not None:
            raise CheckpointError(
                f"checkpoint directory {checkpoints.directory} already holds checkpoints (latest step {latest}); "
                "pass --resume to continue that run, or choose another --ckpt-dir."
            )
        return checkpoints, 0, history
    checkpoints = open_for_resume(config.ckpt_dir)
    step = checkpoints.latest_or_error()
    meta = checkpoints.read_meta(step)
    if meta.get("config") != config.record():
        raise CheckpointError(
            f"checkpoint step {step} in {checkpoints.directory} was written by a run with different settings: "
            f"{meta.get('config')} (this run: {config.record()})."
        )
    trainer.load_state(checkpoints.read_state(step, trainer.state()))
    return checkpoints, step, meta["history"]


def fit(config: TrainConfig, *, devices: Sequence[jax.Device] | None = None, progress: bool = True) -> FitResult:
    """Train ``config.steps`` steps (from the latest checkpoint with ``resume``), data-parallel over ``devices``."""
    mesh = data_mesh(devices)
    num_devices = mesh.devices.size
    config.check(num_devices)
    trainer = make_trainer(config, mesh)
    checkpoints, start_step, history = _open_checkpoints(config, trainer)

    data_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    split = batch_split(mesh)
    # The batch is generated already split over the devices: each holds only its slice.
    next_batch = jax.jit(lambda step: batch_for_step(data_key, step, config.batch_size), out_shardings=split)
    eval_images, eval_labels = jax.jit(
        lambda: make_batch(jax.random.key(EVAL_KEY), config.eval_size), out_shardings=split
    )()

    started = time.perf_counter()
    window: list[dict[str, jax.Array]] = []
    bar = tqdm(
        range(start_step, config.steps), initial=start_step, total=config.steps, disable=not progress, unit="step"
    )
    for step in bar:
        temp = temperature(config, step)
        metrics = trainer.train_step(*next_batch(step), temp)
        window.append(metrics)
        done = step + 1
        evaluate_now = done % config.eval_every == 0 or done == config.steps
        save_now = checkpoints is not None and (done % config.ckpt_every == 0 or done == config.steps)
        # Rows end at multiples of LOG_EVERY and wherever a checkpoint is saved, so a resumed run's
        # rows are exactly the uninterrupted run's.
        if done % LOG_EVERY == 0 or evaluate_now or save_now:
            loss, accuracy = (float(np.mean([m[name] for m in window])) for name in ("loss", "accuracy"))
            history["train"].append([done, loss, accuracy, float(temp)])
            window.clear()
            images_per_s = (bar.format_dict["rate"] or 0.0) * config.batch_size
            bar.set_postfix(
                loss=f"{loss:.3f}", acc=f"{accuracy:.2f}", T=f"{float(temp):.1f}", img_s=f"{images_per_s:.0f}"
            )
        if evaluate_now:
            history["eval"].append([done, evaluate(trainer, eval_images, eval_labels, temp)])
            bar.write(f"step {done}: eval accuracy {history['eval'][-1][1]:.3f}")
        if save_now:
            checkpoints.save(done, trainer.state(), {"config": config.record(), "history": history})
    seconds = time.perf_counter() - started
    bar.close()
    if checkpoints is not None:
        checkpoints.close()
    return FitResult(trainer, history, start_step, config.steps, seconds, num_devices)
