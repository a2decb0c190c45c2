"""``examples/train.py`` end to end: it learns, writes its curves and history, and refuses bad flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_linen_run_learns_and_writes_curves(tmp_path: Path) -> None:
    report = train.main(["--steps", "200", "--eval-every", "100", "--out-dir", str(tmp_path), "--no-progress"])
    # 10 classes: chance is 0.1. A third of the default run already gets ~0.34 here; 0.2 leaves room
    # for other CPUs' rounding without accepting a model that did not learn.
    assert report["final_eval_accuracy"] >= 0.2
    saved = json.loads((tmp_path / "train_linen.json").read_text())
    assert saved["final_eval_accuracy"] == report["final_eval_accuracy"]
    losses = [row[1] for row in saved["history"]["train"]]
    assert [row[0] for row in saved["history"]["train"]] == list(range(10, 201, 10))
    assert losses[-1] < losses[0] - 0.1
    temperatures = [row[3] for row in saved["history"]["train"]]
    assert temperatures[0] > 25  # annealed 30 -> 1 over the first half
    assert temperatures[-1] == 1.0
    assert (tmp_path / "train_linen.png").read_bytes().startswith(PNG_SIGNATURE)


def test_nnx_run_writes_its_own_files(tmp_path: Path) -> None:
    # test_checkpoints' small run (6 steps of 8 images, 16 held out): what is checked here is what the
    # command writes, which no size changes, and its programs (step, evaluation, data) are that run's,
    # compiled once for both through the suite's compilation cache.
    flags = ["--steps", "6", "--batch-size", "8", "--eval-every", "3", "--eval-size", "16"]
    report = train.main(["--api", "nnx", *flags, "--out-dir", str(tmp_path), "--no-progress"])
    assert report["api"] == "nnx"
    assert report["devices"] == 1
    saved = json.loads((tmp_path / "train_nnx.json").read_text())
    assert [row[0] for row in saved["history"]["eval"]] == [3, 6]
    assert (tmp_path / "train_nnx.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0"], "error: --batch-size must be >= 1, got 0."),
        (["--steps", "-5"], "error: --steps must be >= 1, got -5."),
        (["--resume"], "error: --resume needs `ckpt_dir`: the directory to resume from."),
        (["--ckpt-every", "10"], "error: --ckpt-every needs `ckpt_dir`: without it nothing is saved."),
        (
            ["--eval-size", "1001"],
            "error: --eval-size must split into 4 chunk(s) of at most 256 images, each divisible by the number of "
            "devices (1): a multiple of 4, e.g. 1000; got 1001.",
        ),
    ],
)
def test_bad_flags_exit_with_a_message(flags: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.main([*flags, "--out-dir", str(tmp_path), "--no-progress"])
    assert str(exit_info.value) == message
