"""Every ```python block in README.md runs as written (and its shape comments hold)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
SHAPE_COMMENT = re.compile(r"^(\w+) = .*#\s*(\([\d, ]+\))", flags=re.MULTILINE)


def test_readme_has_python_snippets() -> None:
    assert BLOCKS


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_snippet_runs_and_shapes_match_comments(block: str) -> None:
    if "import torch" in block:  # the porting example needs the torch extra (CI's main environment has it)
        pytest.importorskip("torch")
    namespace: dict[str, object] = {}
    exec(compile(block, str(README), "exec"), namespace)
    checked = 0
    for name, shape in SHAPE_COMMENT.findall(block):
        expected = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        assert namespace[name].shape == expected, f"{name}: {namespace[name].shape} != {expected}"
        checked += 1
    assert checked > 0


BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)
SETUP_PREFIX = "python3 -m venv .venv && "


def test_exactly_two_setup_commands_and_ci_runs_the_test_one() -> None:
    setup = [line for block in BASH_BLOCKS for line in block.splitlines() if line.startswith(SETUP_PREFIX)]
    assert len(setup) == 2
    main_example, test_command = setup
    assert main_example.endswith(".venv/bin/python examples/train.py")
    assert test_command.endswith(".venv/bin/python -m pytest -q -n 2")
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert test_command in ci
    # A failure of any command in the line fails CI: errexit stops only at the last command of an && list, so
    # the line runs in a subshell of its own, whose non-zero exit does stop the script.
    assert "set -euo pipefail" in ci
    line = ci.index(test_command)
    assert (ci[line - 1], ci[line + 1]) == ("(", ")")


def test_train_commands_use_flags_train_py_accepts() -> None:
    import train  # examples/ is on pytest's path

    commands = [line.split("#")[0].split() for block in BASH_BLOCKS for line in block.splitlines()]
    flag_sets = [words[words.index("examples/train.py") + 1 :] for words in commands if "examples/train.py" in words]
    assert len(flag_sets) >= 4
    for flags in flag_sets:
        train.parse_args(flags)  # argparse exits on an unknown flag or a bad value


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_training_table_matches_the_recorded_runs(api: str) -> None:
    """The README's default-run figures are the ones in docs/train_<api>.json (written by train.py)."""
    record = json.loads((README.parent / "docs" / f"train_{api}.json").read_text())
    assert (record["steps"], record["batch_size"], record["devices"], record["resumed_from"]) == (600, 64, 1, 0)
    row = next(line for line in README.read_text().splitlines() if line.startswith(f"| `{api}` |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == f"{record['final_eval_accuracy']:.1%}"
    assert cells[2] == f"{record['loop_seconds']:.1f} s ({record['images_per_second']:.0f} images/s)"
    assert cells[3] == f"{record['command_seconds']:.1f} s"
