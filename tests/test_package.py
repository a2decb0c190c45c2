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
        # Each layer keeps the module of its family as __module__ (not the package's), so that inspect.getsource
        # and typing.get_type_hints find it.
        "assert jdc.linen.BranchMixConv.__module__ == 'jdynconv.linen.branch_mix'\n"
        "assert jdc.nnx.DynamicConv.__module__ == 'jdynconv.nnx.kernel_mix'\n"
        "assert callable(jdc.interop.torch_to_linen)\n"
        "assert 'torch' not in sys.modules, 'jdynconv.interop must import torch only when a tensor or file needs it'\n"
    )


def test_import_loads_neither_flax_nor_optax_nor_torch() -> None:
    """``import jdynconv`` costs about what ``import jax`` does: the functional API and the families' maths need
    neither Flax (which loads optax and would double the import time; ``jdynconv.linen``/``.nnx`` import it on
    first use) nor torch. A check of ``sys.modules``, not of a time."""
    _run(
        "import sys\n"
        "import jdynconv\n"
        "heavy = [name for name in sys.modules if name.split('.')[0] in ('flax', 'optax', 'torch')]\n"
        "assert not heavy, f'import jdynconv imported {sorted(heavy)[:10]}'\n"
        "import jdynconv.linen\n"
        "assert 'flax.linen' in sys.modules  # the check above would see flax had it been imported\n"
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


@pytest.mark.parametrize("promotion", ["standard", "strict"])
@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16", "int32"])
def test_promote_dtype_is_flax_s(dtype: str | None, promotion: str) -> None:
    """jdynconv's copy of ``flax.nnx.nn.dtypes.promote_dtype`` (kept so that ``import jdynconv`` needs no Flax) gives
    Flax's dtypes and values, None entries included, and raises where Flax raises."""
    import re

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax.nnx.nn.dtypes import promote_dtype as flax_promote_dtype

    from jdynconv._dtypes import promote_dtype

    cases = [
        (jnp.ones(2, jnp.bfloat16), None, np.float64(2.5)),
        (jnp.arange(3, dtype=jnp.int8), 2),
        (jnp.ones(2, jnp.float16), jnp.ones(1, jnp.float32), None),
        (None, np.ones(2, np.float32)),
        (jnp.array([True, False]),),
    ]
    with jax.numpy_dtype_promotion(promotion):
        for args in cases:
            for inexact in (True, False):
                try:
                    expected = flax_promote_dtype(args, dtype=dtype, inexact=inexact)
                except (TypeError, ValueError) as error:
                    with pytest.raises(type(error), match=re.escape(str(error))):
                        promote_dtype(args, dtype=dtype, inexact=inexact)
                    continue
                got = promote_dtype(args, dtype=dtype, inexact=inexact)
                assert isinstance(got, tuple)
                assert len(got) == len(expected)
                for a, b in zip(got, expected, strict=True):
                    assert (a is None) == (b is None)
                    if b is not None:
                        assert a.dtype == b.dtype
                        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))
