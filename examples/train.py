"""Train a small CNN built from jdynconv layers on noisy oriented gratings (10 classes, made in-process).

The model (``examples/trainer/model.py``): a BranchMixConv block (the seed's k-branch Conv -> BatchNorm
-> LeakyReLU mixing), then two DynamicConv stages whose softmax temperature is annealed 30 -> 1 by the
step. A ``jax.jit``-compiled optax step (linen) or ``nnx.jit`` + ``nnx.Optimizer`` (NNX), BatchNorm
statistics carried as state, the batch split over every device (``jax.devices()``), periodic held-out
evaluation, a tqdm progress bar, orbax checkpoints, and a loss/accuracy plot.

    python examples/train.py                       # linen, defaults: well under 2 minutes on 2 CPU cores
    python examples/train.py --api nnx
    python examples/train.py --ckpt-dir runs/ckpt --steps 600          # checkpoint every 100 steps
    python examples/train.py --ckpt-dir runs/ckpt --steps 600 --resume # continue from the latest one

Multi-host: start the same command once per process with ``--num-processes``, ``--process-id`` and the
first process's ``--coordinator-address`` (``jax.distributed.initialize``); the batch is split over every
process's devices, and process 0 writes the outputs. Two processes on one machine, two CPU devices each:

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python examples/train.py --coordinator-address \
        localhost:12355 --num-processes 2 --process-id 0 &
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python examples/train.py --coordinator-address \
        localhost:12355 --num-processes 2 --process-id 1

Writes ``<out-dir>/train_<api>.png`` (curves) and ``<out-dir>/train_<api>.json`` (history and summary).
"""

# ruff: noqa: E402
from __future__ import annotations

import time

# Taken before the heavy imports (jax, flax, orbax): "command_seconds" counts them. Hence E402 below.
STARTED = time.perf_counter()

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from trainer.checkpoints import CheckpointError
from trainer.loop import APIS, DEFAULT_CKPT_EVERY, ConfigError, FitResult, TrainConfig, fit
from trainer.plot import plot_history


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api", choices=APIS, default=defaults.api, help="Flax API (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="global batch (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="initialisation and data seed (default: %(default)s)"
    )
    parser.add_argument(
        "--learning-rate", type=float, default=defaults.learning_rate, help="peak AdamW rate (default: %(default)s)"
    )
    parser.add_argument(
        "--eval-every", type=int, default=defaults.eval_every, help="steps between evaluations (default: %(default)s)"
    )
    parser.add_argument(
        "--eval-size", type=int, default=defaults.eval_size, help="held-out images (default: %(default)s)"
    )
    parser.add_argument("--ckpt-dir", default=None, help="save orbax checkpoints here (default: no checkpoints)")
    parser.add_argument(
        "--ckpt-every", type=int, default=None, help=f"steps between checkpoints (default: {DEFAULT_CKPT_EVERY})"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --ckpt-dir")
    parser.add_argument(
        "--out-dir", type=Path, default=Path("runs"), help="where the plot and history go (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    distributed = parser.add_argument_group("multi-host (jax.distributed.initialize)")
    distributed.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    distributed.add_argument("--num-processes", type=int, default=None, help="processes in the run")
    distributed.add_argument("--process-id", type=int, default=None, help="this process's index, 0 to N - 1")
    args = parser.parse_args(argv)
    given = [args.coordinator_address is not None, args.num_processes is not None, args.process_id is not None]
    if any(given) and not all(given):
        parser.error("multi-host needs all of --coordinator-address, --num-processes and --process-id")
    return args


def is_first_process() -> bool:
    """Whether this is process 0, which alone shows progress and writes files (every process trains)."""
    return jax.process_index() == 0


def summary(result: FitResult, config: TrainConfig) -> dict[str, Any]:
    trained = result.steps - result.start_step
    return {
        "api": config.api,
        "steps": result.steps,
        "resumed_from": result.start_step,
        "devices": result.num_devices,
        "batch_size": config.batch_size,
        "final_eval_accuracy": result.final_accuracy,
        # The training loop, first-step compilation, evaluations and checkpoint saves included.
        "loop_seconds": round(result.seconds, 2),
        "images_per_second": round(trained * config.batch_size / result.seconds, 1) if trained > 0 else None,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.coordinator_address is not None:
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    config = TrainConfig(
        api=args.api,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        learning_rate=args.learning_rate,
        eval_every=args.eval_every,
        eval_size=args.eval_size,
        ckpt_dir=args.ckpt_dir,
        ckpt_every=args.ckpt_every,
        resume=args.resume,
    )
    try:
        result = fit(config, progress=not args.no_progress and is_first_process())
    except ConfigError as err:
        sys.exit(f"error: --{err.field.replace('_', '-')} {err.message}")
    except CheckpointError as err:
        sys.exit(f"error: {err}")
    report = summary(result, config)
    if not is_first_process():
        return report
    plot = plot_history(
        result.history, args.out_dir / f"train_{config.api}.png", title=f"examples/train.py --api {config.api}"
    )
    # Start-up (imports, initialisation, compilation), training, evaluation and the plot.
    report["command_seconds"] = round(time.perf_counter() - STARTED, 2)
    (args.out_dir / f"train_{config.api}.json").write_text(json.dumps({**report, "history": result.history}, indent=1))
    print(
        f"{config.api}: held-out accuracy {report['final_eval_accuracy']:.1%} after {result.steps} steps "
        f"(chance 10%), training loop {report['loop_seconds']} s, whole command {report['command_seconds']} s, "
        f"on {result.num_devices} device(s); curves: {plot}"
    )
    return report


if __name__ == "__main__":
    main()
