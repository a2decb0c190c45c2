"""Checkpoints with orbax-checkpoint: the training state plus a JSON record of the run.

Each checkpoint is a step directory under ``--ckpt-dir`` holding two orbax items: ``state`` (the
trainer's pytree of arrays) and ``meta`` (JSON: the run's configuration and its metric history, so a
resumed run's loss curve is whole). Saving is synchronous: the model is small, and a failed save should
stop the run at the step that failed rather than later.

Resuming from a directory that does not exist, holds no checkpoint, was written by a different
configuration, or cannot be read raises :class:`CheckpointError` with the directory and the reason,
instead of a traceback from deep inside orbax or tensorstore.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used as asked (missing, empty, mismatched or corrupt)."""


class Checkpoints:
    """Save steps into ``directory`` (keeping the latest ``keep``); restore the latest."""

    def __init__(self, directory: str | Path, keep: int = 3) -> None:
        self.directory = Path(directory).resolve()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} exists and is not a directory.")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Save ``state`` and ``meta`` as ``step`` (the caller decides when; orbax's own interval rule
        would also save the first step)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)

    def latest_or_error(self) -> int:
        """The newest checkpoint's step; :class:`CheckpointError` when there is none."""
        step = self.latest_step()
        if step is None:
            raise CheckpointError(
                f"checkpoint directory {self.directory} holds no checkpoint to resume from "
                "(expected step directories written by examples/train.py --ckpt-dir)."
            )
        return step

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON record saved with ``step`` (read alone: settings are checked before arrays load)."""
        return self._restore(step, ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def read_state(self, step: int, like: Any) -> Any:
        """The arrays saved with ``step``, with the structure, dtypes and shardings of ``like``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self._restore(step, ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state

    def _restore(self, step: int, args: ocp.args.Composite) -> Any:
        try:
            return self._manager.restore(step, args=args)
        except Exception as err:  # orbax/tensorstore raise many types; all mean "this step is unusable"
            older = [s for s in self._manager.all_steps() if s < step]
            hint = f"; delete {self.directory / str(step)} to resume from step {max(older)}" if older else ""
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} could not be read; it is corrupt, incomplete or "
                f"was written by a different model ({type(err).__name__}: {err}){hint}"
            ) from err

    def close(self) -> None:
        self._manager.close()


def open_for_resume(directory: str | Path) -> Checkpoints:
    """:class:`Checkpoints` over an existing ``directory``; a clear error when there is none."""
    path = Path(directory).resolve()
    if not path.is_dir():
        raise CheckpointError(f"cannot resume: checkpoint directory {path} does not exist.")
    return Checkpoints(path)
