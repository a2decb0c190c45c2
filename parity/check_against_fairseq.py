"""Compare ``parity/lightconv_reference.py`` with fairseq's own LightConv / DynamicConv modules, on a copy you supply.

jdynconv's per-position-kernel parity tests hold jdynconv to ``lightconv_reference.py``; this script holds that
reference to facebookresearch/fairseq's ``fairseq/modules/lightweight_convolution.py`` and
``fairseq/modules/dynamic_convolution.py``. It is not part of the test suite (no ``test_`` prefix; CI does not run
it). It takes a directory holding the ``fairseq`` package (a checkout, or the unpacked PyPI wheel or sdist) or a git
directory (a bare clone, a ``.git`` or a mirror; the files are then read with ``git show REV:path``).

fairseq itself does not import here: ``fairseq/__init__.py`` pulls in hydra, omegaconf and the whole model zoo, and
on Python 3.11 fails in ``fairseq/dataclass/configs.py`` (``ValueError: mutable default <class
'fairseq.dataclass.configs.CommonConfig'> for field common is not allowed: use default_factory``, fairseq 0.12.2 from
PyPI with hydra-core 1.0.7 and omegaconf 2.0.6). So the script copies the six files these two modules need,
unchanged, into a temporary package ``fairseq`` whose ``__init__.py`` and ``modules/__init__.py`` are empty:
``utils.py``, ``incremental_decoding_utils.py``, ``modules/fairseq_dropout.py``, ``modules/unfold.py``,
``modules/lightweight_convolution.py``, ``modules/dynamic_convolution.py``. They need only torch at import.
``LightweightConv1dTBC``, ``DynamicConv1dTBC`` and everything they call are then the original's code, on CPU.

How to run it::

    pip download fairseq==0.12.2 --no-deps --only-binary :all: --python-version 3.8 \\
        --platform manylinux2014_x86_64 -d /tmp/fairseq-wheel
    python -m zipfile -e /tmp/fairseq-wheel/fairseq-0.12.2-*.whl /tmp/fairseq-0.12.2
    .venv/bin/python parity/check_against_fairseq.py /tmp/fairseq-0.12.2

(or ``git clone https://github.com/facebookresearch/fairseq /tmp/fairseq`` and pass ``/tmp/fairseq``.)

What is compared:

* The source: ``unfold1d``, ``LightweightConv1dTBC``, ``Linear``, ``DynamicConv1dTBC``, and the incremental-state
  helpers ``FairseqIncrementalState``, ``with_incremental_state``, ``softmax``, ``get_incremental_state``,
  ``set_incremental_state``, as ASTs (formatting, comments and type annotations aside: fairseq annotated
  ``unfold1d``'s arguments after 0.12.2), after renaming our one edit, ``MaskedDropout``, to ``FairseqDropout``.
  ``MaskedDropout`` without a mask against ``FairseqDropout`` by behaviour (p 0 / 0.3, train / eval,
  ``apply_during_inference``, same seed).

And in float64, forward and the gradients of ``sum(y * g)`` for a random cotangent ``g`` w.r.t. the input, the
query and every parameter. The original is built first, every parameter redrawn at random (fairseq zero-initialises
the biases), and its state dict loaded into ours strictly (names, order and shapes must match):

* ``LightweightConv1dTBC``: kernel 1/2/3/4/7/31 x left padding (causal K - 1, centre K // 2, 0, 1, and the
  out-of-range K and -1) x heads 1/2/8 x weight_softmax x bias x T 1/3/8/40 x path (expanded / unfolded), in train
  mode with weight dropout p = 0 or eval mode with p = 0.1 (cycling);
* ``DynamicConv1dTBC``: the same kernels, paddings and T x heads 1/2 x weight_softmax x renorm_padding x path
  (``unfold`` None: fairseq's default, expanded up to T = 512; False; True), with in_proj / query_size 5 / bias /
  conv_bias cycling through the cases, plus every in_proj x query x bias x conv_bias on two configurations;
* incremental decoding of both, one step at a time over T = 6 steps (kernel 1/2/3/4/7/31, every padding, heads,
  weight_softmax, renorm_padding, in_proj, query, biases), with ``reorder_incremental_state`` applied after step 3:
  each step's output, the buffer after each step, and the gradients of the summed outputs;
* weight dropout p = 0.3 in train mode without a mask: the same ``torch.manual_seed`` gives the same draw.

Where the original raises (an out-of-range padding on the expanded path, renorm_padding on the unfolded path
without incremental state, in_proj with a query), ours must raise the same exception and message.

Tolerance: ``1e-12`` of the largest magnitude of the original's value; the two run the same operations in the same
order, so the differences are expected to be exactly 0. Exit status 1 if any comparison fails, else 0.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib
import itertools
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightconv_reference as ours

FILES = (
    "fairseq/utils.py", "fairseq/incremental_decoding_utils.py", "fairseq/modules/fairseq_dropout.py",
    "fairseq/modules/unfold.py", "fairseq/modules/lightweight_convolution.py",
    "fairseq/modules/dynamic_convolution.py",
)  # fmt: skip
TOL = 1e-12
KERNELS = (1, 2, 3, 4, 7, 31)
LENGTHS = (1, 3, 8, 40)


def _git(git_dir: Path, *args: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True, text=True
    ).stdout  # fmt: skip


def _read_sources(source: Path, rev: str) -> tuple[dict[str, str], str]:
    """The six files and where they came from (a commit, or the distribution's version)."""
    if (source / FILES[-1]).is_file():  # a checkout or an unpacked wheel / sdist
        sources = {name: (source / name).read_text() for name in FILES}
        try:
            commit = subprocess.run(
                ["git", "-C", str(source), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(source), "status", "--porcelain", "--", *FILES],
                check=True, capture_output=True, text=True,
            ).stdout.strip()  # fmt: skip
            if dirty:
                commit += " (with local changes)"
        except (OSError, subprocess.CalledProcessError):
            infos = sorted(source.glob("fairseq-*.dist-info")) + sorted(source.glob("PKG-INFO"))
            commit = f"not a git checkout ({infos[0].name if infos else 'unknown version'})"
        return sources, commit
    commit = _git(source, "rev-parse", f"{rev}^{{commit}}").strip()  # a git directory
    return {name: _git(source, "show", f"{commit}:{name}") for name in FILES}, commit


def load_original(source: Path, rev: str = "HEAD") -> tuple[Any, Any, Any, dict[str, str], str]:
    """fairseq's ``lightweight_convolution``, ``dynamic_convolution`` and ``fairseq_dropout`` modules, as a package
    ``fairseq`` with empty ``__init__``s (see the docstring)."""
    sources, commit = _read_sources(source, rev)
    tmp = Path(tempfile.mkdtemp(prefix="fairseq_lightconv_"))
    for name in ("fairseq/__init__.py", "fairseq/modules/__init__.py"):
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text("")
    for name, text in sources.items():
        (tmp / name).write_text(text)
    saved = {name: module for name, module in sys.modules.items() if name == "fairseq" or name.startswith("fairseq.")}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(tmp))
    try:
        light = importlib.import_module("fairseq.modules.lightweight_convolution")
        dynamic = importlib.import_module("fairseq.modules.dynamic_convolution")
        dropout = importlib.import_module("fairseq.modules.fairseq_dropout")
    finally:
        sys.path.remove(str(tmp))
        for name in [name for name in sys.modules if name == "fairseq" or name.startswith("fairseq.")]:
            del sys.modules[name]
        sys.modules.update(saved)
    shutil.rmtree(tmp, ignore_errors=True)
    return light, dynamic, dropout, sources, commit


class Tally:
    def __init__(self) -> None:
        self.comparisons = 0
        self.failures: list[str] = []
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.cases_run = 0
        self.cases_raised = 0

    def compare(self, name: str, actual: torch.Tensor | None, expected: torch.Tensor | None) -> None:
        self.comparisons += 1
        if expected is None or actual is None:
            if expected is not actual:
                self.failures.append(f"{name}: one is None ({actual is None}, {expected is None})")
            return
        if actual.shape != expected.shape or actual.dtype != expected.dtype:
            self.failures.append(f"{name}: {actual.shape}/{actual.dtype} vs {expected.shape}/{expected.dtype}")
            return
        diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
        self.max_abs = max(self.max_abs, diff)
        self.max_rel = max(self.max_rel, diff / scale)
        if not diff <= TOL * scale:
            self.failures.append(f"{name}: max abs diff {diff:.3e} (scale {scale:.3e})")


def _run(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    try:
        return fn(), None
    except Exception as error:  # compared with the other side's error
        return None, error


def _same_error(tally: Tally, name: str, theirs: BaseException | None, mine: BaseException | None) -> bool:
    """True if both raised (and the errors agree; a disagreement is a failure), False if neither did."""
    tally.comparisons += 1
    if theirs is None and mine is None:
        return False
    if theirs is None or mine is None or type(theirs) is not type(mine) or str(theirs) != str(mine):
        tally.failures.append(f"{name}: original raised {theirs!r}, ours {mine!r}")
        return True
    tally.cases_raised += 1
    return True


def _paddings(kernel: int) -> list[int]:
    """Causal, centre, 0 and 1 (those in range), then the out-of-range K and -1."""
    inside = sorted({kernel - 1, kernel // 2, 0, min(1, kernel - 1)})
    return [*inside, kernel, -1]


def _pair(original_cls: Any, mine_cls: Any, kw: dict[str, Any], seed: int, tally: Tally, name: str) -> Any:
    """The original built and randomised, ours with its state dict loaded strictly; None if the keys differ."""
    torch.manual_seed(seed)
    original = original_cls(**kw).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in original.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64))
    mine = mine_cls(**kw).double()
    tally.comparisons += 1
    keys_theirs = [(key, tuple(value.shape)) for key, value in original.state_dict().items()]
    keys_mine = [(key, tuple(value.shape)) for key, value in mine.state_dict().items()]
    if keys_theirs != keys_mine:
        tally.failures.append(f"{name}: state dict keys differ: {keys_theirs} vs {keys_mine}")
        return None
    mine.load_state_dict(original.state_dict(), strict=True)
    return original, mine


def _forward_case(
    original_cls: Any, mine_cls: Any, kw: dict[str, Any], call_kw: dict[str, Any], t_len: int, train: bool,
    query_size: int | None, seed: int, tally: Tally,
) -> None:  # fmt: skip
    name = f"{mine_cls.__name__} T={t_len} train={train} " + ",".join(
        f"{key}={value}" for key, value in {**kw, **call_kw, "query": query_size}.items()
    )
    pair = _pair(original_cls, mine_cls, kw, seed, tally, name)
    if pair is None:
        return
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(t_len, 2, kw["input_size"], dtype=torch.float64, generator=generator)
    query = None if query_size is None else torch.randn(t_len, 2, query_size, dtype=torch.float64, generator=generator)
    results = []
    for module in pair:
        module.train(train)
        leaves = [x.clone().requires_grad_(True)] + ([] if query is None else [query.clone().requires_grad_(True)])

        def call(module: torch.nn.Module = module, leaves: list[torch.Tensor] = leaves) -> Any:
            extra = {} if query is None else {"query": leaves[1]}
            y = module(leaves[0], **extra, **call_kw)
            (
                y * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 2), dtype=y.dtype)
            ).sum().backward()
            return y.detach(), [leaf.grad for leaf in leaves], {key: p.grad for key, p in module.named_parameters()}

        results.append(_run(call))
    (theirs, their_error), (mine, my_error) = results
    if _same_error(tally, name, their_error, my_error):
        return
    tally.cases_run += 1
    tally.compare(name + " output", mine[0], theirs[0])
    for label, a, b in zip(("x", "query")[: len(theirs[1])], mine[1], theirs[1], strict=True):
        tally.compare(f"{name} grad {label}", a, b)
    for key, grad in theirs[2].items():
        tally.compare(f"{name} grad {key}", mine[2][key], grad)


def check_light(light: Any, tally: Tally) -> None:
    index = 0
    for k, h, sm, bias, t_len, unfold in itertools.product(
        KERNELS, (1, 2, 8), (False, True), (False, True), LENGTHS, (False, True)
    ):
        for pad in _paddings(k):
            train = index % 2 == 0  # train mode with p = 0, or eval mode with p = 0.1: no dropout either way
            kw = dict(
                input_size=8, kernel_size=k, padding_l=pad, num_heads=h, weight_dropout=0.0 if train else 0.1,
                weight_softmax=sm, bias=bias,
            )  # fmt: skip
            _forward_case(
                light.LightweightConv1dTBC,
                ours.LightweightConv1dTBC,
                kw,
                {"unfold": unfold},
                t_len,
                train,
                None,
                index,
                tally,
            )
            index += 1


def check_dynamic(dynamic: Any, tally: Tally) -> None:
    extras = [  # in_proj, query_size, bias, conv_bias
        (False, None, False, False), (False, None, True, True), (True, None, True, False), (False, 5, True, True),
        (True, None, False, True), (False, 5, False, False),
    ]  # fmt: skip
    index = 0
    for k, h, sm, renorm, t_len, unfold in itertools.product(
        KERNELS, (1, 2), (False, True), (False, True), LENGTHS, (None, False, True)
    ):
        for pad in _paddings(k):
            in_proj, query_size, bias, conv_bias = extras[index % len(extras)]
            train = index % 2 == 0
            kw = dict(
                input_size=8, kernel_size=k, padding_l=pad, num_heads=h, weight_dropout=0.0 if train else 0.1,
                weight_softmax=sm, renorm_padding=renorm, bias=bias, conv_bias=conv_bias, query_size=query_size,
                in_proj=in_proj,
            )  # fmt: skip
            _forward_case(
                dynamic.DynamicConv1dTBC,
                ours.DynamicConv1dTBC,
                kw,
                {"unfold": unfold},
                t_len,
                train,
                query_size,
                index,
                tally,
            )
            index += 1
    for (k, pad, t_len), in_proj, query_size, bias, conv_bias, unfold in itertools.product(
        ((3, 1, 8), (7, 6, 3)), (False, True), (None, 5), (False, True), (False, True), (False, True)
    ):
        kw = dict(
            input_size=8, kernel_size=k, padding_l=pad, num_heads=2, weight_softmax=True, bias=bias,
            conv_bias=conv_bias, query_size=query_size, in_proj=in_proj,
        )  # fmt: skip
        # in_proj with a query raises the same AssertionError in both
        _forward_case(
            dynamic.DynamicConv1dTBC,
            ours.DynamicConv1dTBC,
            kw,
            {"unfold": unfold},
            t_len,
            True,
            query_size,
            index,
            tally,
        )
        index += 1


def _incremental_case(
    original_cls: Any, mine_cls: Any, kw: dict[str, Any], query_size: int | None, seed: int, tally: Tally
) -> None:
    name = f"incremental {mine_cls.__name__} " + ",".join(f"{k}={v}" for k, v in {**kw, "query": query_size}.items())
    pair = _pair(original_cls, mine_cls, kw, seed, tally, name)
    if pair is None:
        return
    steps, batch = 6, 3
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(steps, batch, kw["input_size"], dtype=torch.float64, generator=generator)
    query = (
        None if query_size is None else torch.randn(steps, batch, query_size, dtype=torch.float64, generator=generator)
    )
    order = torch.tensor([2, 0, 1])
    results = []
    for module in pair:
        module.eval()
        leaves = [x.clone().requires_grad_(True)] + ([] if query is None else [query.clone().requires_grad_(True)])

        def call(module: torch.nn.Module = module, leaves: list[torch.Tensor] = leaves) -> Any:
            state: dict[str, Any] = {}
            outputs, buffers = [], []
            for t in range(steps):
                extra = {} if query is None else {"query": leaves[1][t : t + 1]}
                outputs.append(module(leaves[0][t : t + 1], incremental_state=state, **extra))
                if t == 2:
                    module.reorder_incremental_state(state, order)
                buffers.append([value.detach().clone() for value in state.values()])
            total = sum((y * (t + 1)).sum() for t, y in enumerate(outputs))
            total.backward()
            grads = [leaf.grad for leaf in leaves]
            return [y.detach() for y in outputs], buffers, grads, {k: p.grad for k, p in module.named_parameters()}

        results.append(_run(call))
    (theirs, their_error), (mine, my_error) = results
    if _same_error(tally, name, their_error, my_error):
        return
    tally.cases_run += 1
    for t in range(steps):
        tally.compare(f"{name} step {t} output", mine[0][t], theirs[0][t])
        tally.comparisons += 1
        if len(mine[1][t]) != len(theirs[1][t]):
            tally.failures.append(f"{name} step {t}: {len(mine[1][t])} vs {len(theirs[1][t])} buffers")
            continue
        for a, b in zip(mine[1][t], theirs[1][t], strict=True):
            tally.compare(f"{name} step {t} buffer", a, b)
    for label, a, b in zip(("x", "query")[: len(theirs[2])], mine[2], theirs[2], strict=True):
        tally.compare(f"{name} grad {label}", a, b)
    for key, grad in theirs[3].items():
        tally.compare(f"{name} grad {key}", mine[3][key], grad)


def check_incremental(light: Any, dynamic: Any, tally: Tally) -> None:
    index = 0
    for k, h, sm in itertools.product(KERNELS, (1, 2), (False, True)):
        for pad in _paddings(k)[:-2]:
            kw = dict(input_size=8, kernel_size=k, padding_l=pad, num_heads=h, weight_softmax=sm, bias=index % 2 == 0)
            _incremental_case(light.LightweightConv1dTBC, ours.LightweightConv1dTBC, kw, None, index, tally)
            index += 1
            for renorm, (in_proj, query_size) in itertools.product(
                (False, True), ((False, None), (True, None), (False, 5))
            ):
                kw = dict(
                    input_size=8, kernel_size=k, padding_l=pad, num_heads=h, weight_softmax=sm,
                    renorm_padding=renorm, bias=index % 2 == 0, conv_bias=index % 3 == 0, query_size=query_size,
                    in_proj=in_proj,
                )  # fmt: skip
                _incremental_case(dynamic.DynamicConv1dTBC, ours.DynamicConv1dTBC, kw, query_size, index, tally)
                index += 1


def check_dropout(light: Any, dynamic: Any, dropout: Any, tally: Tally) -> None:
    """Without a mask, ``MaskedDropout`` is ``FairseqDropout``: the same seed draws the same mask."""
    x = torch.randn(40, 30, dtype=torch.float64)
    for p, train, during in itertools.product((0.0, 0.3), (False, True), (False, True)):
        original, mine = dropout.FairseqDropout(p), ours.MaskedDropout(p)
        results = []
        for module in (original, mine):
            module.train(train)
            module.apply_during_inference = during
            torch.manual_seed(0)
            results.append(module(x.clone()))
        tally.cases_run += 1
        tally.compare(f"dropout p={p} train={train} apply_during_inference={during}", results[1], results[0])
    for unfold in (False, True):  # the modules in train mode with p = 0.3
        for original_cls, mine_cls, kw in (
            (light.LightweightConv1dTBC, ours.LightweightConv1dTBC, {}),
            (dynamic.DynamicConv1dTBC, ours.DynamicConv1dTBC, {"weight_softmax": True}),
        ):
            kw = dict(input_size=8, kernel_size=4, padding_l=3, num_heads=2, weight_dropout=0.3, **kw)
            name = f"dropout {mine_cls.__name__} unfold={unfold}"
            pair = _pair(original_cls, mine_cls, kw, 7, tally, name)
            if pair is None:
                continue
            x = torch.randn(6, 2, 8, dtype=torch.float64)
            outputs = []
            for module in pair:
                torch.manual_seed(1)
                outputs.append(module.train()(x, unfold=unfold))
            tally.cases_run += 1
            tally.compare(name, outputs[1].detach(), outputs[0].detach())


DEFINITIONS = (
    "softmax", "get_incremental_state", "set_incremental_state", "FairseqIncrementalState", "with_incremental_state",
    "unfold1d", "LightweightConv1dTBC", "Linear", "DynamicConv1dTBC",
)  # fmt: skip


class _Normalise(ast.NodeTransformer):
    """Annotations dropped; ``MaskedDropout`` (our one edit) renamed to ``FairseqDropout``."""

    def visit_arg(self, node: ast.arg) -> ast.arg:
        node.annotation = None
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        self.generic_visit(node)
        node.returns = None
        return node

    def visit_Name(self, node: ast.Name) -> ast.Name:
        if node.id == "MaskedDropout":
            node.id = "FairseqDropout"
        return node


def check_source(sources: dict[str, str]) -> list[str]:
    """Each definition of ours, as an AST, against the original's; returns the differences."""
    theirs = _Normalise().visit(ast.parse("\n".join(sources.values())))
    mine = _Normalise().visit(ast.parse(Path(ours.__file__).read_text()))

    def definitions(tree: ast.Module) -> dict[str, str]:
        return {n.name: ast.unparse(n) for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}

    their_defs, my_defs = definitions(theirs), definitions(mine)
    return [f"{name}: the statements differ" for name in DEFINITIONS if their_defs.get(name) != my_defs.get(name)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fairseq", type=Path, help="a directory holding the fairseq package, or a fairseq git dir")
    parser.add_argument("--rev", default="HEAD", help="the revision to read from a git directory (default HEAD)")
    parser.add_argument("--write", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    light, dynamic, dropout, sources, commit = load_original(args.fairseq, args.rev)
    start = datetime.datetime.now(datetime.UTC)
    lines = [
        "parity/check_against_fairseq.py: parity/lightconv_reference.py vs fairseq's LightweightConv1dTBC and "
        "DynamicConv1dTBC",
        f"date (UTC): {start:%Y-%m-%d %H:%M:%S}",
        f"fairseq source: {args.fairseq} ({commit})",
        "files: " + ", ".join(FILES),
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, float64, CPU",
        f"tolerance: {TOL:g} x max(1, max |original|) per comparison",
        "",
    ]
    problems = check_source(sources)
    all_ok = not problems
    lines += [
        f"source: {len(DEFINITIONS)} definitions compared as ASTs (annotations aside; ours with MaskedDropout "
        f"renamed FairseqDropout): {len(problems)} differ"
    ]
    lines += [f"  FAIL {problem}" for problem in problems]
    for label, check in (
        ("LightweightConv1dTBC", lambda t: check_light(light, t)),
        ("DynamicConv1dTBC", lambda t: check_dynamic(dynamic, t)),
        ("incremental decoding", lambda t: check_incremental(light, dynamic, t)),
        ("weight dropout (no mask, same seed)", lambda t: check_dropout(light, dynamic, dropout, t)),
    ):
        tally = Tally()
        check(tally)
        ok = not tally.failures
        all_ok &= ok
        lines += [
            f"{label}: {tally.cases_run} cases ran in both, {tally.cases_raised} raised the same error in both;",
            f"  {tally.comparisons} comparisons, {len(tally.failures)} failed; "
            f"max abs difference {tally.max_abs:.3e}, max relative (to max(1, |original|)) {tally.max_rel:.3e}",
        ]
        lines += [f"  FAIL {failure}" for failure in tally.failures[:20]]
    seconds = (datetime.datetime.now(datetime.UTC) - start).total_seconds()
    lines += ["", f"result: {'PASS' if all_ok else 'FAIL'} ({seconds:.1f} s)"]
    report = "\n".join(lines)
    print(report)
    if args.write is not None:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join([".venv/bin/python", "parity/check_against_fairseq.py", *(argv or sys.argv[1:])])
        rerun = [
            "",
            f"command (from the repository root): {command}",
            "to rerun on a fresh clone:",
            "    git clone https://github.com/facebookresearch/fairseq /tmp/fairseq",
            f"    git -C /tmp/fairseq checkout {commit.split()[0] if ' ' not in commit.strip() else 'HEAD'}",
            "    .venv/bin/python parity/check_against_fairseq.py /tmp/fairseq",
            "or on fairseq 0.12.2 from PyPI (the same code for these modules; a wheel, so nothing is built):",
            "    pip download fairseq==0.12.2 --no-deps --only-binary :all: --python-version 3.8 \\",
            "        --platform manylinux2014_x86_64 -d /tmp/fairseq-wheel",
            "    python -m zipfile -e /tmp/fairseq-wheel/fairseq-0.12.2-*.whl /tmp/fairseq-0.12.2",
            "    .venv/bin/python parity/check_against_fairseq.py /tmp/fairseq-0.12.2",
        ]
        args.write.write_text(report + "\n" + "\n".join(rerun) + "\n")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
