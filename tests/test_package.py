"""The package's own surface: ``jdynconv.linen``, ``.nnx`` and ``.interop`` as lazy attributes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _run(code: str) -> None:
    """``code`` in a fresh interpreter, so ``sys.modules`` starts without any jdynconv submodule."""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1], timeout=120)


def test_submodules_are_attributes_imported_on_first_use() -> None:
    _run(
        "import sys\n"
        "import jdynconv as jdc\n"
        "lazy = ('jdynconv.linen', 'jdynconv.nnx', 'jdynconv.interop', 'torch')\n"
        "assert not [name for name in lazy if name in sys.modules], [n for n in lazy if n in sys.modules]\n"
        "assert {'linen', 'nnx', 'interop'} <= set(dir(jdc))\n"
        "assert jdc.linen.BranchMixConv.__module__ == 'jdynconv.linen'\n"
        "assert jdc.nnx.DynamicConv.__module__ == 'jdynconv.nnx'\n"
        "assert callable(jdc.interop.torch_to_linen)\n"
        "assert 'torch' not in sys.modules, 'jdynconv.interop must import torch only when a tensor or file needs it'\n"
    )


def test_unknown_attribute_is_an_attribute_error() -> None:
    import jdynconv

    with pytest.raises(AttributeError, match=r"module 'jdynconv' has no attribute 'conv'"):
        _ = jdynconv.conv
