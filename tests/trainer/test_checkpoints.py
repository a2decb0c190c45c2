"""Checkpoints: a resumed run reproduces the uninterrupted run bit for bit; bad directories get clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import train
from trainer.checkpoints import CheckpointError
from trainer.loop import ConfigError, FitResult, TrainConfig, fit

from .conftest import leaves


def small_config(ckpt_dir: Path, api: str = "linen", **overrides: object) -> TrainConfig:
    settings = {"api": api, "steps": 6, "batch_size": 8, "eval_every": 3, "eval_size": 16, "ckpt_every": 3}
    return TrainConfig(ckpt_dir=str(ckpt_dir), **{**settings, **overrides})


def run(config: TrainConfig) -> FitResult:
    return fit(config, progress=False)


def uninterrupted_api(result: FitResult) -> str:
    return result.trainer.__class__.__name__.removesuffix("Trainer").lower()


@pytest.fixture(scope="module", params=["linen", "nnx"])
def finished_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FitResult]:
    """A 6-step run that saved checkpoints at steps 3 and 6."""
    ckpt_dir = tmp_path_factory.mktemp(f"ckpt_{request.param}")
    return ckpt_dir, run(small_config(ckpt_dir, request.param))


def copy_of(ckpt_dir: Path, tmp_path: Path) -> Path:
    """A copy of the module's finished run to damage or resume without touching the original."""
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt_dir, copy)
    return copy


def step_dirs(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if p.name.isdigit())


def test_checkpoints_are_saved_every_n_steps(finished_run: tuple[Path, FitResult]) -> None:
    ckpt_dir, _ = finished_run
    assert step_dirs(ckpt_dir) == ["3", "6"]


def test_resume_reproduces_the_uninterrupted_run_bitwise(finished_run: tuple[Path, FitResult], tmp_path: Path) -> None:
    """Drop the step-6 checkpoint (as if the run died after step 3), resume, compare every array."""
    ckpt_dir, uninterrupted = finished_run
    interrupted = copy_of(ckpt_dir, tmp_path)
    shutil.rmtree(interrupted / "6")
    api = uninterrupted_api(uninterrupted)
    resumed = run(small_config(interrupted, api, resume=True))

    assert resumed.start_step == 3
    expected, actual = leaves(uninterrupted.trainer.state()), leaves(resumed.trainer.state())
    assert sorted(actual) == sorted(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(actual[path], value, err_msg=path)  # bitwise, optimizer state included
    assert resumed.history == uninterrupted.history  # the curve continues where it stopped


def test_resume_of_a_finished_run_trains_nothing(finished_run: tuple[Path, FitResult], tmp_path: Path) -> None:
    ckpt_dir, uninterrupted = finished_run
    copy = copy_of(ckpt_dir, tmp_path)
    resumed = run(small_config(copy, uninterrupted_api(uninterrupted), resume=True))
    assert resumed.start_step == 6
    expected, actual = leaves(uninterrupted.trainer.state()), leaves(resumed.trainer.state())
    for path, value in expected.items():
        np.testing.assert_array_equal(actual[path], value, err_msg=path)


def test_resume_at_the_last_step_between_evaluations_evaluates(
    finished_run: tuple[Path, FitResult], tmp_path: Path
) -> None:
    """--steps 3 from the step-3 checkpoint of a run that evaluates every 6: nothing to train, one eval."""
    ckpt_dir, uninterrupted = finished_run
    copy = copy_of(ckpt_dir, tmp_path)
    shutil.rmtree(copy / "6")
    resumed = run(small_config(copy, uninterrupted_api(uninterrupted), steps=3, eval_every=6, resume=True))
    assert resumed.start_step == 3
    assert resumed.history["eval"][-1][0] == 3
    assert resumed.final_accuracy == uninterrupted.history["eval"][0][1]  # the step-3 model, evaluated again


def test_resume_with_fewer_steps_than_the_checkpoint(finished_run: tuple[Path, FitResult], tmp_path: Path) -> None:
    ckpt_dir, uninterrupted = finished_run
    copy = copy_of(ckpt_dir, tmp_path)
    with pytest.raises(ConfigError, match=r"`steps` must be at least the checkpoint's step \(6\).*got 3"):
        run(small_config(copy, uninterrupted_api(uninterrupted), steps=3, resume=True))


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"cannot resume: checkpoint directory .*nowhere does not exist"):
        run(small_config(tmp_path / "nowhere", resume=True))


def test_directory_without_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="holds no checkpoint to resume from"):
        run(small_config(tmp_path, resume=True))


def test_path_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        run(small_config(path))


@pytest.mark.parametrize("damage", ["truncate every file", "delete the state item"])
def test_corrupt_checkpoint(finished_run: tuple[Path, FitResult], tmp_path: Path, damage: str) -> None:
    ckpt_dir, uninterrupted = finished_run
    copy = copy_of(ckpt_dir, tmp_path)
    latest = copy / "6"
    if damage == "delete the state item":
        shutil.rmtree(latest / "state")
    else:
        for path in latest.rglob("*"):
            if path.is_file():
                path.write_bytes(b"\0garbage")
    api = uninterrupted_api(uninterrupted)
    with pytest.raises(CheckpointError, match=r"checkpoint step 6 in .* could not be read.*to resume from step 3$"):
        run(small_config(copy, api, resume=True))


def test_checkpoint_of_other_settings(finished_run: tuple[Path, FitResult], tmp_path: Path) -> None:
    ckpt_dir, _ = finished_run
    copy = copy_of(ckpt_dir, tmp_path)
    meta = next((copy / "6" / "meta").rglob("*"))
    text = meta.read_text()
    assert '"learning_rate": 0.003' in text
    meta.write_text(text.replace('"learning_rate": 0.003', '"learning_rate": 0.1'))
    api = "nnx" if '"api": "nnx"' in text else "linen"
    with pytest.raises(CheckpointError, match=r"different settings \(learning_rate: 0.1 there, 0.003 here\)\.$"):
        run(small_config(copy, api, resume=True))


def test_other_api_cannot_resume(finished_run: tuple[Path, FitResult], tmp_path: Path) -> None:
    ckpt_dir, uninterrupted = finished_run
    copy = copy_of(ckpt_dir, tmp_path)
    other = "nnx" if uninterrupted_api(uninterrupted) == "linen" else "linen"
    api = uninterrupted_api(uninterrupted)
    with pytest.raises(CheckpointError, match=rf"different settings \(api: '{api}' there, '{other}' here\)\.$"):
        run(small_config(copy, other, resume=True))


def test_existing_checkpoints_need_resume(finished_run: tuple[Path, FitResult]) -> None:
    ckpt_dir, _ = finished_run
    with pytest.raises(CheckpointError, match=r"already holds checkpoints \(latest step 6\); pass --resume"):
        run(small_config(ckpt_dir))


def test_resume_needs_a_directory() -> None:
    with pytest.raises(ConfigError, match="`resume` needs `ckpt_dir`"):
        fit(TrainConfig(resume=True), progress=False)


def test_command_line_reports_the_error_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--ckpt-dir", str(tmp_path / "missing"), "--resume", "--no-progress"])
    assert str(exit_info.value).startswith("error: cannot resume: checkpoint directory")
