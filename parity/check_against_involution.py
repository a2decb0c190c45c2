"""Compare ``parity/involution_reference.py`` with d-li14/involution's own naive involution, on a copy you supply.

jdynconv's involution parity tests hold jdynconv to ``involution_reference.py``; this script holds that reference to
d-li14/involution's ``cls/mmcls/models/utils/involution_naive.py`` (``det/mmdet/...`` and ``seg/mmseg/...`` hold
copies; the script checks that they are the same text). It is not part of the test suite (no ``test_`` prefix; CI
does not run it, and jdynconv's environment has no mmcv). It takes either a checkout of involution or its git
directory (a bare clone, a ``.git`` or a mirror; the file is then read with ``git show REV:path``), copies the file
unchanged into a temporary directory and imports it. The original's one import besides torch, ``from mmcv.cnn
import ConvModule``, is mmcv's real ``ConvModule``, so the interpreter needs mmcv: mmcv-lite (mmcv without the
compiled ops; ``ConvModule`` is plain PyTorch) with mmengine. ``involution`` and the ``ConvModule`` it builds are
then the original's and mmcv's code, run on CPU.

How to run it (a scratch environment; not jdynconv's ``.venv``)::

    git clone https://github.com/d-li14/involution /tmp/involution
    python3.11 -m venv /tmp/involution-venv
    /tmp/involution-venv/bin/pip install torch==2.13.0 mmcv-lite==2.2.0 mmengine==0.10.7
    /tmp/involution-venv/bin/python parity/check_against_involution.py /tmp/involution

What is compared:

* The source: ours ``involution`` class and the original's, as ASTs (formatting and comments aside), after undoing
  our three documented edits on our tree: the keyword arguments ``reduction_ratio=4, group_channels=16,
  pool_ceil_mode=False`` are dropped from ``__init__`` (they must be exactly these, with these defaults),
  ``self.group_channels = group_channels`` becomes the original's ``reduction_ratio = 4`` and ``self.group_channels
  = 16``, and ``ceil_mode=pool_ceil_mode`` is dropped from ``nn.AvgPool2d``. Our ``ConvModule`` is a stand-in,
  not mmcv's code: it is compared with mmcv's by behaviour (below), not by source.

And in float64, forward and the gradients of ``sum(y * g)`` for a random cotangent ``g`` w.r.t. the input and every
parameter, and the BatchNorm running statistics (``running_mean``, ``running_var``, ``num_batches_tracked``) after
the call, also where the call raised (a train-mode batch norm updates them before the ``view`` fails). Each module
pair is built under the same ``torch.manual_seed``: the state dicts must have the same names, order and shapes and,
with the original unpatched, the same initial values (the stand-in draws what mmcv's ``ConvModule`` draws); the
warnings raised while building must be the same. Then every parameter and the running statistics of the original
are redrawn at random and its state dict loaded into ours strictly. Where the original raises, at construction or in
``forward``, ours must raise the same exception type and message.

* ``involution`` as the original defines it (``reduction_ratio`` 4 and ``group_channels`` 16 hard-coded; ours with
  those defaults and ``pool_ceil_mode=False``; the original not patched): channels 8/16/24/32/64 (24 and 8 are not
  multiples of 16) x kernel 1/2/3/4/5/7 x stride 1/2/3 x (batch, H, W) (1, 1, 1), (2, 1, 1), (2, 2, 3), (2, 6, 6),
  (2, 9, 9), (2, 8, 12), (2, 7, 10), (2, 12, 18), (3, 15, 9) x train / eval (1620 cases).
* Other ``reduction_ratio`` / ``group_channels`` / ``pool_ceil_mode``, which the original cannot be asked for: the
  original's instance is patched after construction, its ``forward`` unchanged. Built as ``involution(channels,
  kernel_size, stride)``, it gets ``group_channels`` and ``groups = channels // group_channels`` set, ``conv1`` and
  ``conv2`` replaced by mmcv ``ConvModule``s built with the constructor's own arguments for the new
  ``reduction_ratio`` and ``groups`` (the module's ``ConvModule`` name, i.e. mmcv's), and, for ``pool_ceil_mode``,
  ``avgpool`` replaced by ``nn.AvgPool2d(stride, stride, ceil_mode=True)``. This tests our ``forward`` and the
  stand-in against the original's ``forward`` and mmcv at those values; it does not test the constructor (which is
  the patch). The initial values are not compared here (the patch draws again). reduction_ratio 1/2/4/8 x
  group_channels 1/4/8/16/32 x channels 32/64 x kernel 3/5 x stride 1/2 x pool_ceil_mode off/on x (2, 8, 8) and
  (2, 9, 7), train and eval alternating (640 cases).
* ``ConvModule``, the stand-in against ``mmcv.cnn.ConvModule``, for the arguments the stand-in takes: kernel 1/3 x
  stride 1/2 x padding 0/1 x dilation 1/2 x groups 1/2 x bias ``'auto'``/True/False x norm ``BN``/None x act
  ``ReLU``/None, train and eval alternating, plus the defaults (384 + 2 cases): as above, and ``with_norm``,
  ``with_activation``, ``norm_name`` and the type of ``norm``. mmcv warns ``Unnecessary conv bias before
  batch/instance norm`` for ``bias=True`` with ``BN``; the stand-in does not, and that one warning is left out of
  the comparison. The stand-in's ``NotImplementedError`` for other configs is not compared (mmcv supports them).

Tolerance: ``1e-12`` of the largest magnitude of the original's value; the two run the same operations in the same
order, so the differences are expected to be exactly 0. Exit status 1 if any comparison fails, else 0.
"""

from __future__ import annotations

import argparse
import ast
import collections
import datetime
import importlib.metadata
import importlib.util
import itertools
import platform
import re
import subprocess
import sys
import tempfile
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import involution_reference as ours

PATH = ours.INVOLUTION_PATH  # cls/mmcls/models/utils/involution_naive.py
COPIES = ("det/mmdet/models/utils/involution_naive.py", "seg/mmseg/models/utils/involution_naive.py")
TOL = 1e-12
BN_BIAS_WARNING = "Unnecessary conv bias before batch/instance norm"


def _git(git_dir: Path, *args: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True, text=True
    ).stdout  # fmt: skip


def _read_sources(source: Path, rev: str) -> tuple[dict[str, str | None], str]:
    """The file and its two copies (None where absent) and the commit they came from."""
    if (source / PATH).is_file():  # a checkout
        sources = {name: (source / name).read_text() if (source / name).is_file() else None for name in (PATH, *COPIES)}
        try:
            commit = subprocess.run(
                ["git", "-C", str(source), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(source), "status", "--porcelain", "--", PATH, *COPIES],
                check=True, capture_output=True, text=True,
            ).stdout.strip()  # fmt: skip
            if dirty:
                commit += " (with local changes)"
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown (not a git checkout)"
        return sources, commit
    commit = _git(source, "rev-parse", f"{rev}^{{commit}}").strip()  # a git directory
    listed = set(_git(source, "ls-tree", "-r", "--name-only", commit).split())
    sources = {name: _git(source, "show", f"{commit}:{name}") if name in listed else None for name in (PATH, *COPIES)}
    return sources, commit


def load_original(source: Path, rev: str = "HEAD") -> tuple[types.ModuleType, dict[str, str | None], str]:
    """Import the original ``involution_naive.py``, unchanged, as the module ``involution_naive_original``."""
    sources, commit = _read_sources(source, rev)
    text = sources[PATH]
    if text is None:
        raise SystemExit(f"{PATH} not found in {source}")
    with tempfile.TemporaryDirectory(prefix="involution_naive_") as tmp:
        path = Path(tmp) / "involution_naive_original.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location("involution_naive_original", path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except ModuleNotFoundError as error:
            raise SystemExit(f"{error}: the original needs mmcv (pip install mmcv-lite mmengine)") from error
    return module, sources, commit


class Tally:
    def __init__(self) -> None:
        self.comparisons = 0
        self.failures: list[str] = []
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.cases_run = 0
        self.cases_raised = 0
        self.errors: collections.Counter[str] = collections.Counter()

    def compare(self, name: str, actual: torch.Tensor | None, expected: torch.Tensor | None) -> None:
        self.comparisons += 1
        if expected is None or actual is None:
            if expected is not actual:
                self.failures.append(f"{name}: one is None ({actual is None}, {expected is None})")
            return
        if actual.shape != expected.shape or actual.dtype != expected.dtype:
            self.failures.append(f"{name}: {actual.shape}/{actual.dtype} vs {expected.shape}/{expected.dtype}")
            return
        if not expected.is_floating_point():  # num_batches_tracked
            if not torch.equal(actual, expected):
                self.failures.append(f"{name}: {actual.tolist()} vs {expected.tolist()}")
            return
        diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
        self.max_abs = max(self.max_abs, diff)
        self.max_rel = max(self.max_rel, diff / scale)
        if not diff <= TOL * scale:
            self.failures.append(f"{name}: max abs diff {diff:.3e} (scale {scale:.3e})")

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.comparisons += 1
        if not ok:
            self.failures.append(f"{name}: {detail}")


def _run(fn: Callable[[], Any]) -> tuple[Any, BaseException | None, list[str]]:
    """The result or the error, and the messages of the warnings raised (all recorded, none shown)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result, error = fn(), None
        except Exception as exc:  # compared with the other side's error
            result, error = None, exc
    return result, error, [str(w.message) for w in caught]


def _same_error(tally: Tally, name: str, theirs: BaseException | None, mine: BaseException | None) -> bool:
    """True if both raised (and the errors agree; a disagreement is a failure), False if neither did."""
    tally.comparisons += 1
    if theirs is None and mine is None:
        return False
    if theirs is None or mine is None or type(theirs) is not type(mine) or str(theirs) != str(mine):
        tally.failures.append(f"{name}: original raised {theirs!r}, ours {mine!r}")
        return True
    tally.cases_raised += 1
    tally.errors[f"{type(theirs).__name__}: {re.sub(r'[0-9]+', '#', str(theirs))}"] += 1
    return True


def _randomise(module: nn.Module, seed: int) -> None:
    """Redraw every parameter and the running statistics (float64): non-trivial norms, non-zero biases."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            param.copy_(1.0 + 0.2 * noise if name.endswith("bn.weight") else 0.4 * noise)
        for name, buffer in module.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator, dtype=buffer.dtype))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator, dtype=buffer.dtype))
            elif name.endswith("num_batches_tracked"):
                buffer.fill_(seed % 7)


def _case(
    tally: Tally, name: str, build_original: Callable[[], nn.Module], build_mine: Callable[[], nn.Module],
    shape: tuple[int, ...], train: bool, seed: int, compare_init: bool, ignore_warnings: tuple[str, ...] = (),
    attributes: tuple[str, ...] = (),
) -> None:  # fmt: skip
    torch.manual_seed(seed)
    original, their_error, their_warnings = _run(build_original)
    torch.manual_seed(seed)
    mine, my_error, my_warnings = _run(build_mine)
    if _same_error(tally, name + " (construction)", their_error, my_error):
        return
    their_warnings = [w for w in their_warnings if w not in ignore_warnings]
    tally.check(name + " construction warnings", their_warnings == my_warnings, f"{their_warnings} vs {my_warnings}")
    for attribute in attributes:
        a, b = getattr(mine, attribute), getattr(original, attribute)
        if isinstance(b, nn.Module):
            a, b = type(a).__name__, type(b).__name__
        tally.check(f"{name} attribute {attribute}", a == b, f"{a!r} vs {b!r}")
    theirs_sd, mine_sd = original.state_dict(), mine.state_dict()
    keys_theirs = [(key, tuple(value.shape), value.dtype) for key, value in theirs_sd.items()]
    keys_mine = [(key, tuple(value.shape), value.dtype) for key, value in mine_sd.items()]
    tally.check(name + " state dict keys", keys_theirs == keys_mine, f"{keys_theirs} vs {keys_mine}")
    if keys_theirs != keys_mine:
        return
    if compare_init:
        for key, value in theirs_sd.items():
            tally.compare(f"{name} initial {key}", mine_sd[key], value)
    original, mine = original.double(), mine.double()
    _randomise(original, seed)
    mine.load_state_dict(original.state_dict(), strict=True)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    results = []
    for module in (original, mine):
        module.train(train)
        leaf = x.clone().requires_grad_(True)

        def call(module: nn.Module = module, leaf: torch.Tensor = leaf) -> Any:
            y = module(leaf)
            cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 2), dtype=y.dtype)
            (y * cotangent).sum().backward()
            return y.detach(), leaf.grad, {key: p.grad for key, p in module.named_parameters()}

        results.append(_run(call))
    (theirs, their_error, their_warnings), (mine_, my_error, my_warnings) = results
    raised = _same_error(tally, name, their_error, my_error)
    tally.check(name + " forward warnings", their_warnings == my_warnings, f"{their_warnings} vs {my_warnings}")
    mine_buffers = dict(mine.named_buffers())
    for key, buffer in original.named_buffers():  # also after a raise: BN may have updated them first
        tally.compare(f"{name} buffer {key}", mine_buffers[key], buffer)
    if raised:
        return
    tally.cases_run += 1
    tally.compare(name + " output", mine_[0], theirs[0])
    tally.compare(name + " grad input", mine_[1], theirs[1])
    for key, grad in theirs[2].items():
        tally.compare(f"{name} grad {key}", mine_[2][key], grad)


def check_involution(original: types.ModuleType, tally: Tally) -> None:
    """The original as it is: reduction_ratio 4, group_channels 16, no ceil mode."""
    sizes = ((1, 1, 1), (2, 1, 1), (2, 2, 3), (2, 6, 6), (2, 9, 9), (2, 8, 12), (2, 7, 10), (2, 12, 18), (3, 15, 9))
    grid = itertools.product((8, 16, 24, 32, 64), (1, 2, 3, 4, 5, 7), (1, 2, 3), sizes, (True, False))
    for index, (channels, k, s, (b, h, w), train) in enumerate(grid):
        name = f"involution C={channels} K={k} s={s} {b}x{h}x{w} train={train}"
        _case(
            tally, name, lambda c=channels, k=k, s=s: original.involution(c, k, s),
            lambda c=channels, k=k, s=s: ours.involution(c, k, s), (b, channels, h, w), train, index, True,
        )  # fmt: skip


def _patched(original: types.ModuleType, c: int, k: int, s: int, r: int, gc: int, ceil: bool) -> nn.Module:
    """The original's instance with another reduction_ratio / group_channels / ceil mode (see the docstring)."""
    module = original.involution(c, k, s)
    module.group_channels = gc
    module.groups = module.channels // module.group_channels
    module.conv1 = original.ConvModule(
        in_channels=c, out_channels=c // r, kernel_size=1, conv_cfg=None, norm_cfg=dict(type="BN"),
        act_cfg=dict(type="ReLU"),
    )  # fmt: skip
    module.conv2 = original.ConvModule(
        in_channels=c // r, out_channels=k**2 * module.groups, kernel_size=1, stride=1, conv_cfg=None,
        norm_cfg=None, act_cfg=None,
    )  # fmt: skip
    if ceil and s > 1:
        module.avgpool = nn.AvgPool2d(s, s, ceil_mode=True)
    return module


def check_patched(original: types.ModuleType, tally: Tally) -> None:
    """Other reduction ratios, group channels and ceil mode: the original's instance patched after construction."""
    grid = itertools.product(
        (1, 2, 4, 8), (1, 4, 8, 16, 32), (32, 64), (3, 5), (1, 2), (False, True), ((2, 8, 8), (2, 9, 7))
    )
    for index, (r, gc, channels, k, s, ceil, (b, h, w)) in enumerate(grid):
        train = index % 2 == 0
        name = f"patched involution C={channels} K={k} s={s} r={r} gc={gc} ceil={ceil} {b}x{h}x{w} train={train}"
        _case(
            tally, name, lambda c=channels, k=k, s=s, r=r, gc=gc, ceil=ceil: _patched(original, c, k, s, r, gc, ceil),
            lambda c=channels, k=k, s=s, r=r, gc=gc, ceil=ceil: ours.involution(c, k, s, r, gc, ceil),
            (b, channels, h, w), train, 10_000 + index, False,
        )  # fmt: skip


def check_conv_module(original: types.ModuleType, tally: Tally) -> None:
    """The stand-in against mmcv's ConvModule (the original module's ``ConvModule`` name)."""
    attributes = ("with_norm", "with_activation", "norm_name", "norm")
    cases: list[dict[str, Any]] = []
    for k, s, p, d, g, bias, norm, act in itertools.product(
        (1, 3), (1, 2), (0, 1), (1, 2), (1, 2), ("auto", True, False), ({"type": "BN"}, None), ({"type": "ReLU"}, None)
    ):
        cases.append(dict(kernel_size=k, stride=s, padding=p, dilation=d, groups=g, bias=bias, norm_cfg=norm,
                          act_cfg=act))  # fmt: skip
    cases += [dict(kernel_size=1), dict(kernel_size=3, norm_cfg={"type": "BN"})]  # mmcv's defaults for the rest
    for index, kw in enumerate(cases):
        train = index % 2 == 0
        name = f"ConvModule train={train} " + ",".join(f"{key}={value}" for key, value in kw.items())
        _case(
            tally, name, lambda kw=kw: original.ConvModule(in_channels=6, out_channels=4, **kw),
            lambda kw=kw: ours.ConvModule(in_channels=6, out_channels=4, **kw), (2, 6, 7, 8), train, 20_000 + index,
            True, (BN_BIAS_WARNING,), attributes,
        )  # fmt: skip


class _UndoEdits(ast.NodeTransformer):
    """Our three documented edits undone on our tree (see the docstring)."""

    EXTRA = "(self, channels, kernel_size, stride, reduction_ratio=4, group_channels=16, pool_ceil_mode=False)"

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        self.generic_visit(node)
        if node.name != "__init__" or f"({ast.unparse(node.args)})" != self.EXTRA:
            return node
        node.args.args = node.args.args[:-3]
        node.args.defaults = node.args.defaults[:-3]
        body: list[ast.stmt] = []
        for statement in node.body:
            if ast.unparse(statement) == "self.group_channels = group_channels":
                body += ast.parse("reduction_ratio = 4\nself.group_channels = 16").body
            else:
                body.append(statement)
        node.body = body
        return node

    def visit_Call(self, node: ast.Call) -> ast.Call:
        self.generic_visit(node)
        if ast.unparse(node.func) == "nn.AvgPool2d":
            node.keywords = [k for k in node.keywords if ast.unparse(k) != "ceil_mode=pool_ceil_mode"]
        return node


def check_source(sources: dict[str, str | None]) -> list[str]:
    """Our ``involution`` as an AST against the original's; the copies against the file. Returns the differences."""
    problems = [f"{name}: not the same text as {PATH}" for name in COPIES if sources[name] != sources[PATH]]
    theirs = ast.parse(sources[PATH] or "")
    mine = _UndoEdits().visit(ast.parse(Path(ours.__file__).read_text()))

    def definition(tree: ast.Module) -> str | None:
        found = [ast.unparse(n) for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "involution"]
        return found[0] if len(found) == 1 else None

    if definition(theirs) is None or definition(theirs) != definition(mine):
        problems.append("involution: the statements differ")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("involution", type=Path, help="a d-li14/involution checkout, or its git directory")
    parser.add_argument("--rev", default="HEAD", help="the revision to read from a git directory (default HEAD)")
    parser.add_argument("--write", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    original, sources, commit = load_original(args.involution, args.rev)
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("mmcv-lite", "mmengine"))
    start = datetime.datetime.now(datetime.UTC)
    lines = [
        "parity/check_against_involution.py: parity/involution_reference.py vs d-li14/involution's naive involution",
        f"date (UTC): {start:%Y-%m-%d %H:%M:%S}",
        f"involution commit: {commit}",
        f"file: {PATH} (with mmcv.cnn.ConvModule from {versions})",
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, float64, CPU",
        f"tolerance: {TOL:g} x max(1, max |original|) per comparison",
        "",
    ]
    problems = check_source(sources)
    all_ok = not problems
    lines += [
        f"source: involution compared as ASTs (our three edits undone), {len(COPIES)} copies compared as text: "
        f"{len(problems)} differ"
    ]
    lines += [f"  FAIL {problem}" for problem in problems]
    for label, check in (
        ("involution (the original as it is; reduction_ratio 4, group_channels 16)", check_involution),
        ("involution (the original's instance patched: other reduction_ratio / group_channels / ceil)", check_patched),
        ("ConvModule (the stand-in vs mmcv.cnn.ConvModule)", check_conv_module),
    ):
        tally = Tally()
        check(original, tally)
        ok = not tally.failures
        all_ok &= ok
        lines += [
            f"{label}:",
            f"  {tally.cases_run} cases ran in both, {tally.cases_raised} raised the same error in both;",
            f"  {tally.comparisons} comparisons, {len(tally.failures)} failed; "
            f"max abs difference {tally.max_abs:.3e}, max relative (to max(1, |original|)) {tally.max_rel:.3e}",
        ]
        lines += [f"  raised ({count}x): {message}" for message, count in sorted(tally.errors.items())]
        lines += [f"  FAIL {failure}" for failure in tally.failures[:20]]
    seconds = (datetime.datetime.now(datetime.UTC) - start).total_seconds()
    lines += ["", f"result: {'PASS' if all_ok else 'FAIL'} ({seconds:.1f} s)"]
    report = "\n".join(lines)
    print(report)
    if args.write is not None:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join([sys.executable, "parity/check_against_involution.py", *(argv or sys.argv[1:])])
        rerun = [
            "",
            f"command (from the repository root): {command}",
            "to rerun on a fresh clone, in a scratch environment (not jdynconv's .venv):",
            "    git clone https://github.com/d-li14/involution /tmp/involution",
            f"    git -C /tmp/involution checkout {commit.split()[0]}",
            "    python3.11 -m venv /tmp/involution-venv",
            "    /tmp/involution-venv/bin/pip install torch==2.13.0 mmcv-lite==2.2.0 mmengine==0.10.7",
            "    /tmp/involution-venv/bin/python parity/check_against_involution.py /tmp/involution",
        ]
        args.write.write_text(report + "\n" + "\n".join(rerun) + "\n")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
