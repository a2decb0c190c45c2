"""The package's own surface: ``jdynconv.linen``, ``.nnx`` and ``.interop`` as lazy attributes; the installed copy
under test."""

from __future__ import annotations

import importlib.metadata
import json
import os
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


REPO_ROOT = Path(__file__).resolve().parents[1]


def test_tests_run_against_the_installed_package() -> None:
    """An editable install runs the checkout's ``src/jdynconv``; any other install runs its own copy in
    site-packages, never the checkout's (the ``src/`` layout keeps it off ``sys.path``), with ``py.typed``
    and the version the metadata says. Under ``JDYNCONV_EXPECT_WHEEL`` (set by ``.ci/run``) the install
    must be that wheel file."""
    import jdynconv

    dist = importlib.metadata.distribution("jdynconv")
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    package_dir = Path(jdynconv.__file__).resolve().parent
    assert jdynconv.__version__ == dist.version
    if direct_url.get("dir_info", {}).get("editable", False):
        assert package_dir == REPO_ROOT / "src" / "jdynconv"
        assert "JDYNCONV_EXPECT_WHEEL" not in os.environ, "expected the wheel, found an editable install"
    else:
        # The venv may live inside the checkout (CI's does), so the test is against the sources' folder.
        sources = REPO_ROOT / "src"
        assert sources not in package_dir.parents, f"tests import the checkout's sources {package_dir}"
        assert package_dir == Path(dist.locate_file("jdynconv")).resolve()
        assert (package_dir / "py.typed").is_file()
    if "JDYNCONV_EXPECT_WHEEL" in os.environ:
        wheel = Path(os.environ["JDYNCONV_EXPECT_WHEEL"]).resolve()
        assert direct_url["url"] == wheel.as_uri()
        assert wheel.name.startswith(f"jdynconv-{dist.version}-")
