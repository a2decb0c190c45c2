"""The training loop: data, temperature schedule, steps, evaluation, progress bar, checkpoints."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

import jdynconv

from .checkpoints import CheckpointError, Checkpoints, open_for_resume
from .data import batch_for_step, make_batch
from .linen_trainer import LinenTrainer
from .model import ModelConfig
from .nnx_trainer import NnxTrainer
from .sharding import DATA_AXIS, batch_split, data_mesh
from .steps import Trainer, make_optimizer

APIS = ("linen", "nnx")
# The held-out set is the same whatever --seed, so accuracies of different runs compare.
EVAL_KEY = 2026
EVAL_CHUNK = 256  # images per evaluation call at most: bounded activation memory
LOG_EVERY = 10
DEFAULT_CKPT_EVERY = 100


class ConfigError(ValueError):
    """Settings the loop cannot run with; ``field`` is the setting (``examples/train.py``'s flag)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"`{field}` {message}")
        self.field = field
        self.message = message


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
    ckpt_every: int | None = None  # DEFAULT_CKPT_EVERY when checkpointing
    resume: bool = False
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)

    @property
    def eval_chunks(self) -> int:
        return -(-self.eval_size // EVAL_CHUNK)

    @property
    def checkpoint_interval(self) -> int:
        return DEFAULT_CKPT_EVERY if self.ckpt_every is None else self.ckpt_every

    def check(self, num_devices: int) -> None:
        """Clear errors for settings the loop cannot run with."""
        if self.api not in APIS:
            raise ConfigError("api", f"must be one of {APIS}, got {self.api!r}.")
        for name in ("steps", "batch_size", "eval_every", "eval_size", "checkpoint_interval"):
            if getattr(self, name) < 1:
                field = "ckpt_every" if name == "checkpoint_interval" else name
                raise ConfigError(field, f"must be >= 1, got {getattr(self, name)}.")
        # Batches are split evenly over the devices: a clear error here instead of XLA's.
        if self.batch_size % num_devices:
            raise ConfigError(
                "batch_size", f"must be a multiple of the number of devices ({num_devices}), got {self.batch_size}."
            )
        unit = self.eval_chunks * num_devices
        if self.eval_size % unit:
            raise ConfigError(
                "eval_size",
                f"must split into {self.eval_chunks} chunk(s) of at most {EVAL_CHUNK} images, each divisible by "
                f"the number of devices ({num_devices}): a multiple of {unit}, e.g. "
                f"{max(unit, self.eval_size - self.eval_size % unit)}; got {self.eval_size}.",
            )
        if not 0 < self.anneal_fraction <= 1:
            raise ConfigError("anneal_fraction", f"must be in (0, 1], got {self.anneal_fraction}.")
        if self.resume and self.ckpt_dir is None:
            raise ConfigError("resume", "needs `ckpt_dir`: the directory to resume from.")
        if self.ckpt_every is not None and self.ckpt_dir is None:
            raise ConfigError("ckpt_every", "needs `ckpt_dir`: without it nothing is saved.")

    def record(self) -> dict[str, Any]:
        """What a checkpoint records: the settings a resumed run must share (the length may change)."""
        fields = dataclasses.asdict(self)
        for name in ("steps", "eval_every", "eval_size", "ckpt_dir", "ckpt_every", "resume"):
            fields.pop(name)
        return fields


@dataclasses.dataclass
class FitResult:
    """What a run produced. ``history``: ``train`` rows ``[step, loss, accuracy, temperature]`` (means
    over ``LOG_EVERY`` steps, and up to every checkpoint) and ``eval`` rows ``[step, accuracy]`` on the
    held-out set. ``seconds``: the training loop's wall time, first-step compilation, evaluations and
    checkpoint saves included (start-up, initialisation and restoring are not)."""

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
    """Eval-mode accuracy over the held-out set ``(chunks, chunk, ...)``, one chunk per call.

    Indexing the unsharded chunk axis keeps each chunk split over the devices, so evaluation is
    data-parallel too.
    """
    correct = 0
    for chunk in range(images.shape[0]):
        logits = trainer.logits(images[chunk], temp)
        correct += int(jnp.sum(jnp.argmax(logits, axis=-1) == labels[chunk]))
    return correct / labels.size


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
    saved, ours = meta.get("config", {}), config.record()
    if saved != ours:
        differ = {name: (saved.get(name), ours.get(name)) for name in sorted(saved.keys() | ours.keys())}
        differ = {name: pair for name, pair in differ.items() if pair[0] != pair[1]}
        described = ", ".join(f"{name}: {old!r} there, {new!r} here" for name, (old, new) in differ.items())
        raise CheckpointError(
            f"checkpoint step {step} in {checkpoints.directory} was written by a run with different settings "
            f"({described})."
        )
    if step > config.steps:
        raise ConfigError(
            "steps",
            f"must be at least the checkpoint's step ({step}) to resume from {checkpoints.directory}, "
            f"got {config.steps}.",
        )
    trainer.load_state(checkpoints.read_state(step, trainer.state()))
    return checkpoints, step, meta["history"]


def fit(config: TrainConfig, *, devices: Sequence[jax.Device] | None = None, progress: bool = True) -> FitResult:
    """Train ``config.steps`` steps (from the latest checkpoint with ``resume``), data-parallel over ``devices``."""
    mesh = data_mesh(devices)
    config.check(mesh.devices.size)
    trainer = make_trainer(config, mesh)
    checkpoints, start_step, history = _open_checkpoints(config, trainer)

    try:
        return _train(config, trainer, mesh, checkpoints, start_step, history, progress)
    finally:
        if checkpoints is not None:
            checkpoints.close()


def eval_set(config: TrainConfig, mesh: jax.sharding.Mesh) -> tuple[jax.Array, jax.Array]:
    """The held-out set as ``(chunks, chunk, ...)`` arrays, every chunk split over the devices."""

    def generate() -> tuple[jax.Array, jax.Array]:
        images, labels = make_batch(jax.random.key(EVAL_KEY), config.eval_size)
        return images.reshape(config.eval_chunks, -1, *images.shape[1:]), labels.reshape(config.eval_chunks, -1)

    return jax.jit(generate, out_shardings=NamedSharding(mesh, PartitionSpec(None, DATA_AXIS)))()


def _train(
    config: TrainConfig,
    trainer: Trainer,
    mesh: jax.sharding.Mesh,
    checkpoints: Checkpoints | None,
    start_step: int,
    history: dict[str, list[list[float]]],
    progress: bool,
) -> FitResult:
    data_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    split = batch_split(mesh)
    # Batches are generated already split over the devices: each holds only its slice.
    next_batch = jax.jit(lambda step: batch_for_step(data_key, step, config.batch_size), out_shardings=split)
    eval_images, eval_labels = eval_set(config, mesh)

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
        save_now = checkpoints is not None and (done % config.checkpoint_interval == 0 or done == config.steps)
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
    if not history["eval"] or history["eval"][-1][0] != config.steps:
        # Resumed at the last step from a checkpoint saved between evaluations.
        history["eval"].append(
            [config.steps, evaluate(trainer, eval_images, eval_labels, temperature(config, config.steps - 1))]
        )
    return FitResult(trainer, history, start_step, config.steps, seconds, mesh.devices.size)
