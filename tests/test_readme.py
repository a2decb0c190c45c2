"""Every ```python block in README.md runs as written (and its shape comments hold)."""

from __future__ import annotations

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
    namespace: dict[str, object] = {}
    exec(compile(block, str(README), "exec"), namespace)
    checked = 0
    for name, shape in SHAPE_COMMENT.findall(block):
        expected = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        assert namespace[name].shape == expected, f"{name}: {namespace[name].shape} != {expected}"
        checked += 1
    assert checked > 0
