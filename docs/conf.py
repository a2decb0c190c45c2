"""Sphinx configuration: MyST Markdown pages, the API reference from the docstrings (autodoc, Google style
through napoleon), and every Python block run by the doctest builder.

Build (from the repository root, with the ``docs`` extra installed)::

    sphinx-build -W -b html docs docs/_build/html       # the site; warnings are errors
    sphinx-build -W -b doctest docs docs/_build/doctest # runs every code block, checks printed output
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import os
import re
import textwrap
from collections.abc import Callable
from typing import Any

# The examples are small and run once: XLA's backend optimisations cost more compile time than they save
# (the doctest build takes about half as long without them). Set before jax is first imported.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import flax.linen as nn
from docutils import nodes
from flax import nnx
from sphinx.application import Sphinx
from sphinx.domains.python import PyObject
from sphinx.ext.autodoc.typehints import record_typehints
from sphinx.ext.napoleon import GoogleDocstring
from sphinx.util import inspect as sphinx_inspect
from sphinx.util import logging

import jdynconv
import jdynconv.interop
import jdynconv.linen
import jdynconv.nnx

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
# Types in the argument list, one entry per argument: only for the arguments a docstring documents (a linen
# module's are its attributes, listed once under "Attributes"; an NNX layer's are completed from its linen
# twin by _nnx_arguments).
autodoc_typehints_description_target = "documented_params"
# Shown by name: jax.typing.ArrayLike expands to an eight-member union otherwise. (Only names that evaluate
# to themselves: napoleon evaluates the class annotations with these as locals, and falls back to the source's
# strings, private aliases included, when one does not.)
autodoc_type_aliases = {"ArrayLike": "jax.typing.ArrayLike"}
# Sphinx 9 unwraps the alias on its own but not inside a union, where it shows the placeholder's repr
# ("TypeAliasForwardRef('jax.typing.ArrayLike') | None", seen on the API pages): the placeholder reads as its name.
sphinx_inspect.TypeAliasForwardRef.__repr__ = lambda self: self.name  # type: ignore[method-assign]
# parent, name and scope: what every flax.linen module has, documented by Flax. __call__: the layer's
# arguments and the shape of what it returns. No "Bases:" line: it would name a private base (_ExpertBank).
autodoc_default_options = {
    "members": True,
    "undoc-members": False,
    "special-members": "__call__",
    "exclude-members": "parent, name, scope",
}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as a field list, one entry per attribute (see _skip_linen_fields)
# That field list is labelled "Variables" by Sphinx; in Flax "variables" are params and batch stats.
for _field in PyObject.doc_field_types:
    if _field.name == "variable":
        _field.label = "Attributes"

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


# Private paths that type annotations resolve to, and the public names a user writes.
_PUBLIC_NAMES = {
    "jax.jaxlib._jax.Array": "jax.Array",
    "flax.nnx.rnglib.Rngs": "flax.nnx.Rngs",
    "collections.abc.": "",
    "typing.": "",
    "Callable[[...], ": "Callable[..., ",
}


def _public(annotation: str) -> str:
    """``annotation`` with the private module paths the runtime types carry replaced by their public names
    (``jax.jaxlib._jax.Array`` -> ``jax.Array``); ``~`` (show the last name only) kept only where nothing
    private was replaced."""
    for private, public in _PUBLIC_NAMES.items():
        annotation = annotation.replace(f"~{private}", public).replace(private, public)
    return _PRIVATE_MODULE.sub(_exported_name, annotation)


# jdynconv.interop._rules.Rule: a name defined in a private module, re-exported by the package above it.
_PRIVATE_MODULE = re.compile(r"~?(jdynconv(?:\.[a-z]\w*)*)\._\w+\.(\w+)")


def _exported_name(match: re.Match[str]) -> str:
    package, name = match.groups()
    return f"{package}.{name}" if hasattr(importlib.import_module(package), name) else match.group(0)


def _default_text(value: Any, written: str | None) -> str:
    """A default as a signature shows it: its repr where that reads as code (``'SAME'``, ``(1.0, 3.0)``),
    else the source's spelling without private module prefixes (``default_kernel_init``, ``jnp.float32``,
    ``_gates.leaky_relu`` -> ``leaky_relu``) rather than ``<function ... at 0x...>``."""
    text = repr(value)
    if text.startswith("<") and written:
        return re.sub(r"\b_\w+\.", "", written)
    return text


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


def _function_source_defaults(func: Callable[..., Any]) -> dict[str, str]:
    """The default of each argument of ``func`` as written in its source."""
    try:
        source = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        return {}
    arguments = ast.parse(source).body[0].args  # type: ignore[attr-defined]
    positional = arguments.posonlyargs + arguments.args
    pairs = list(zip(positional[len(positional) - len(arguments.defaults) :], arguments.defaults, strict=True))
    pairs += [
        (arg, default) for arg, default in zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True) if default
    ]
    return {arg.arg: ast.get_source_segment(source, default) or "" for arg, default in pairs}


def _is_jdynconv_dataclass(obj: Any) -> bool:
    return inspect.isclass(obj) and dataclasses.is_dataclass(obj) and obj.__module__.startswith("jdynconv")


def _is_linen_module(obj: Any) -> bool:
    return _is_jdynconv_dataclass(obj) and issubclass(obj, nn.Module)


def _is_nnx_class(obj: Any) -> bool:
    """A class of ``jdynconv.nnx``: defined in one of its family modules (``jdynconv.nnx.kernel_mix``, ...)."""
    return inspect.isclass(obj) and obj.__module__.startswith("jdynconv.nnx.")


def _signature(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, signature: str | None, return_annotation: str | None
) -> tuple[str, str | None] | None:
    """Class signatures as a user calls them, and public type names in every recorded annotation.

    A flax.linen module's ``__init__`` is a generated dataclass one, whose signature shows defaults by their
    repr (``kernel_init=<function variance_scaling.<locals>.init>``) and ends in Flax's ``parent`` and
    ``name``: its fields, without those two, each default as the source writes it where the repr is not code.

    An NNX layer's class signature is its metaclass's ``__call__(*args, **kwargs)`` (Sphinx reads that before
    ``__init__``, and so does the type-hint recorder behind ``autodoc_typehints = "description"``): its
    ``__init__``'s arguments instead, and their types recorded in place of ``args``, ``kwargs`` and ``Any``.
    """
    annotations = app.env.current_document.autodoc_annotations
    result: tuple[str, str | None] | None = None
    if what == "class" and _is_linen_module(obj):
        written = _source_defaults(obj)
        parameters = []
        for field in dataclasses.fields(obj):
            if not field.init or field.name in {"parent", "name"}:
                continue
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                parameters.append(field.name)
            else:
                parameters.append(f"{field.name}={_default_text(field.default, written.get(field.name))}")
        result = f"({', '.join(parameters)})", return_annotation
    elif what == "class" and _is_nnx_class(obj):
        init = obj.__init__
        written = _function_source_defaults(init)
        parameters = list(inspect.signature(init).parameters.values())[1:]
        text = sphinx_inspect.stringify_signature(
            inspect.Signature(
                [
                    p
                    if p.default is p.empty
                    else p.replace(default=_Code(_default_text(p.default, written.get(p.name))))
                    for p in parameters
                ]
            ),
            show_annotation=False,
            show_return_annotation=False,
        )
        annotations.pop(name, None)
        record_typehints(app, what, name, init, options, "", "")
        annotations.get(name, {}).pop("return", None)
        result = text, None
    for argument, annotation in annotations.get(name, {}).items():
        annotations[name][argument] = _public(annotation)
    if result is None and return_annotation and _public(return_annotation) != return_annotation:
        result = signature or "", _public(return_annotation)  # a property's type
    return result


class _Code(str):
    """A default value shown as written (its repr is its text)."""

    def __repr__(self) -> str:
        return str(self)


_FIELD = re.compile(r"^:(param|type|ivar|vartype|returns|rtype) ?([\w*]*):(.*)$")


def _fields(lines: list[str]) -> tuple[list[str], dict[str, list[str]], int | None]:
    """``lines`` (napoleon's output) without its argument fields, the description of each argument (its
    ``:param:``, or ``:ivar:`` for an attribute, and their continuation lines; ``"return"``: the
    ``:returns:`` field) and where the first was."""
    rest: list[str] = []
    described: dict[str, list[str]] = {}
    first = None
    current: list[str] | None = None
    for line in lines:
        match = _FIELD.match(line)
        if match:
            first = len(rest) if first is None else first
            kind, argument, text = match.groups()
            if kind == "returns":
                current = described.setdefault("return", [text])
            else:
                current = described.setdefault(argument, [text]) if kind in {"param", "ivar"} else []
        elif current is not None and line.startswith(" "):
            current.append(line)
        else:
            current = None
            rest.append(line)
    return rest, described, first


def _twin_descriptions(app: Sphinx, what: str, obj: Any) -> dict[str, list[str]]:
    """The argument descriptions of the linen twin of an NNX class or of its ``__call__``."""
    if what == "class":
        twin = getattr(jdynconv.linen, obj.__name__, None)
    else:
        owner = getattr(jdynconv.linen, obj.__qualname__.split(".")[0], None)
        twin = getattr(owner, obj.__name__, None) if owner is not None else None
    if twin is None or not inspect.getdoc(twin):
        return {}
    lines = str(GoogleDocstring(inspect.getdoc(twin), app.config, app, what, "", twin)).splitlines()
    return _fields(lines)[1]


def _nnx_arguments(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """An NNX layer's docstring describes the arguments that differ from its linen twin's (``in_features``,
    ``rngs``, ...); every other one is the twin's attribute, or ``__call__`` argument, of the same name. Its
    entry is copied here, so that each argument is listed once, in the signature's order, with a description;
    an argument that neither describes is a warning (an error under ``-W``)."""
    if not name.startswith("jdynconv.nnx."):
        return
    if what == "class" and issubclass(obj, nnx.Module):
        function = obj.__init__
    elif what == "method" and name.endswith(".__call__"):
        function = obj
    else:
        return
    rest, described, first = _fields(lines)
    twin = _twin_descriptions(app, what, obj)
    fields: list[str] = []
    for argument in list(inspect.signature(function).parameters)[1:]:
        description = described.get(argument) or twin.get(argument)
        if description is None:
            _logger.warning("%s: argument %r is described neither here nor by the linen twin", name, argument)
            continue
        fields += [f":param {argument}:{description[0]}", *description[1:]]
    returns = described.get("return") or twin.get("return")
    if returns is not None:
        fields += [f":returns:{returns[0]}", *returns[1:]]
    at = len(rest) if first is None else first
    lines[:] = [*rest[:at], *fields, "", *rest[at:]]


def _public_types(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Public names in the types napoleon writes for attributes (``collections.abc.Callable[[jax.Array],
    jax.Array]``, not ``...[[jax.jaxlib._jax.Array], ...]``)."""
    lines[:] = [_public(line) if line.startswith((":vartype ", ":type ")) else line for line in lines]


def _skip_fields(app: Sphinx, what: str, name: str, obj: Any, skip: bool, options: Any) -> bool | None:
    """The dataclass fields of a linen module (or of interop's ``Converter``, ``Dim``, ...) are its attributes,
    listed once in its docstring's "Attributes" field list: not again as members (where a default function's
    docstring would stand for the field's)."""
    return True if what == "class" and name in _DATACLASS_FIELDS else None


_DATACLASS_FIELDS = {
    field.name
    for module in (jdynconv, jdynconv.linen, jdynconv.interop)
    for obj in vars(module).values()
    if _is_jdynconv_dataclass(obj)
    for field in dataclasses.fields(obj)
}


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("doctree-read", _python_blocks_must_run)
    app.connect("autodoc-process-signature", _signature)
    # After napoleon's own handler (registered before this file's), which turns Google sections into fields.
    app.connect("autodoc-process-docstring", _nnx_arguments, priority=600)
    app.connect("autodoc-process-docstring", _public_types, priority=600)
    app.connect("autodoc-skip-member", _skip_fields)
    return {"parallel_read_safe": True}
