"""Sphinx configuration: MyST Markdown pages, the API reference from the docstrings (autodoc, Google style
through napoleon), and every Python block run by the doctest builder.

Build (from the repository root, with the ``docs`` extra installed)::

    sphinx-build -W -b html docs docs/_build/html       # the site; warnings are errors
    sphinx-build -W -b doctest docs docs/_build/doctest # runs every code block, checks printed output
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import textwrap
from typing import Any

# The examples are small and run once: XLA's backend optimisations cost more compile time than they save
# (the doctest build takes about half as long without them). Set before jax is first imported.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util import inspect as sphinx_inspect
from sphinx.util import logging

import jdynconv

project = "jdynconv"
author = "the jdynconv developers"
copyright = "2026, the jdynconv developers"
release = jdynconv.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3
# The benchmark reports (docs/results, a link to benchmarks/results) are generated with "#" then "###"
# headings; their level jump is the generators' layout, not a page error.
suppress_warnings = ["myst.header"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Shown by name: jax.typing.ArrayLike expands to an eight-member union otherwise.
autodoc_type_aliases = {"ArrayLike": "jax.typing.ArrayLike"}
# Sphinx 9 unwraps the alias on its own but not inside a union, where it shows the placeholder's repr
# ("TypeAliasForwardRef('jax.typing.ArrayLike') | None", seen on the API pages): the placeholder reads as its name.
sphinx_inspect.TypeAliasForwardRef.__repr__ = lambda self: self.name  # type: ignore[method-assign]
# parent, name and scope: what every flax.linen module has, documented by Flax.
autodoc_default_options = {
    "members": True,
    "undoc-members": False,
    "show-inheritance": False,
    "exclude-members": "parent, name, scope",
}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as a field list: autodoc documents the dataclass fields once

# Code blocks are ``{testcode}`` blocks, run in page order in one namespace a page; ``{testoutput}`` after
# one is compared with what it printed.
doctest_global_setup = "import jax\njax.config.update('jax_platforms', 'cpu')"
doctest_test_doctest_blocks = ""
highlight_language = "python3"

html_theme = "furo"
html_title = f"jdynconv {release}"
html_static_path: list[str] = []

_logger = logging.getLogger(__name__)


def _python_blocks_must_run(app: Sphinx, doctree: nodes.document) -> None:
    """A Python block that the doctest builder would not run is an error (under ``-W``): write it as
    ``{testcode}``, so every snippet on the site is executed."""
    for block in doctree.findall(nodes.literal_block):
        if block.get("language") in {"python", "python3", "py"} and "testnodetype" not in block:
            _logger.warning("a Python block that is not run: write it as {testcode}", location=block)


def _source_defaults(cls: type) -> dict[str, str]:
    """The default of each annotated class attribute as written in ``cls``'s source (and its jdynconv bases')."""
    defaults: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith("jdynconv"):
            continue
        source = textwrap.dedent(inspect.getsource(klass))
        for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                defaults[node.target.id] = ast.get_source_segment(source, node.value) or ""
    return defaults


def _linen_signature(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, signature: str | None, return_annotation: str | None
) -> tuple[str, str | None] | None:
    """A flax.linen module's ``__init__`` is a generated dataclass one, whose signature shows defaults by
    their repr (``kernel_init=<function variance_scaling.<locals>.init>``) and ends in Flax's ``parent``
    and ``name``: show each default as the source writes it (``kernel_init=default_kernel_init``), without
    the two fields every linen module has."""
    if what != "class" or not dataclasses.is_dataclass(obj) or not obj.__module__.startswith("jdynconv"):
        return None
    written = _source_defaults(obj)
    parameters = []
    for field in dataclasses.fields(obj):
        if not field.init or field.name in {"parent", "name"}:
            continue
        if field.name in written:
            parameters.append(f"{field.name}={written[field.name]}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            parameters.append(field.name)
        else:
            parameters.append(f"{field.name}={field.default!r}")
    return f"({', '.join(parameters)})", return_annotation


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("doctree-read", _python_blocks_must_run)
    app.connect("autodoc-process-signature", _linen_signature)
    return {"parallel_read_safe": True}
