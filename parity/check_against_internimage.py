"""Compare ``parity/dcnv3_reference.py`` with InternImage's own DCNv3 pure-PyTorch code, on a copy you supply.

jdynconv's DCNv3 parity tests hold jdynconv to ``dcnv3_reference.py``; this script holds that reference to
OpenGVLab/InternImage's ``classification/ops_dcnv3`` (``functions/dcnv3_func.py`` and ``modules/dcnv3.py``). It is
not part of the test suite (no ``test_`` prefix; CI does not run it). It takes either a checkout of InternImage or
its git directory (a bare clone, a ``.git`` or a mirror; the two files are then read with ``git show REV:path``),
copies the two files and their package ``__init__``s into a temporary package unchanged, and imports them with
stand-ins for the two imports the pure-PyTorch path never uses: the compiled CUDA extension ``DCNv3`` (an empty
module; only ``DCNv3Function.forward/backward`` touch it) and ``pkg_resources`` (``get_distribution('DCNv3')``
answers version ``1.1``, read once at import). ``DCNv3_pytorch`` and ``dcnv3_core_pytorch`` are then the
original's code, run on CPU.

How to run it::

    git clone https://github.com/OpenGVLab/InternImage /tmp/InternImage
    .venv/bin/python parity/check_against_internimage.py /tmp/InternImage

What is compared:

* The source: each of the eleven definitions ours writes out (``_get_reference_points`` ... ``DCNv3_pytorch``) is
  parsed and compared with the original's as an AST (formatting and comments aside), after dropping our one edit,
  ``indexing="ij"`` on ``torch.meshgrid`` (its default); ``_is_power_of_2``, whose message ours formats with an
  f-string, by its results and messages.

And in float64, forward and gradients of ``sum(y * g)`` for a random cotangent ``g``:

* ``dcnv3_core_pytorch`` with random offsets (a few pixels, so taps land between pixels and off the image) and
  random, unnormalised masks of the conv-arithmetic output size: kernel 3/5, stride 1/2, pad 0/1, dilation 1/2,
  group 1/4, offset_scale 0.5/1, remove_center 0/1 (128 cases), plus rectangular kernels and unequal
  stride/pad/dilation per axis; the output and the gradients w.r.t. input, offset and mask. An even kernel with
  ``remove_center`` must raise the same error in both.
* ``DCNv3_pytorch``: kernel 3/5, stride 1/2, pad 0/1/2/4, dilation 1/2, group 1/4, offset_scale 0.5/1,
  center_feature_scale off/on, remove_center off/on, on inputs of 7x8 and 2x3 (1024 cases; act_layer, norm_layer
  and dw_kernel_size cycle through GELU/ReLU/SiLU, LN/BN and None/3/5), plus every act x norm x dw_kernel_size x
  train/eval on two configs. The original is built first; every parameter is redrawn at random (the original
  zero-initialises offset and mask, so sampling would be the regular grid) and its state dict loaded into ours
  strictly (names, order and shapes must match). Where the original runs, the output, the gradients w.r.t. the
  input and every parameter, and BatchNorm's running statistics are compared; where it raises (the module
  computes offsets at the input's size and the core's reference points at the conv-arithmetic size, which
  disagree unless stride 1 and ``2 pad == dilation (k - 1)``), ours must raise the same exception and message.

Tolerance: ``1e-12`` of the largest magnitude of the original's value; the two run the same operations in the same
order, so the differences are expected to be exactly 0. Exit status 1 if any comparison fails, else 0.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import importlib
import itertools
import platform
import subprocess
import sys
import tempfile
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dcnv3_reference as ours

OPS_DIR = "classification/ops_dcnv3"
FILES = ("__init__.py", "functions/__init__.py", "functions/dcnv3_func.py", "modules/__init__.py", "modules/dcnv3.py")
PACKAGE = "internimage_ops_dcnv3"
TOL = 1e-12


def _git(git_dir: Path, *args: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True, text=True
    ).stdout  # fmt: skip


def _read_sources(source: Path, rev: str, ops_dir: str) -> tuple[dict[str, str], str]:
    """The files of ``ops_dir`` (``__init__.py`` of the package made empty if absent) and the commit they came from."""
    sources: dict[str, str] = {}
    if (source / ops_dir / "functions" / "dcnv3_func.py").is_file():  # a checkout
        for name in FILES:
            path = source / ops_dir / name
            sources[name] = path.read_text() if path.is_file() else ""
        try:
            commit = subprocess.run(
                ["git", "-C", str(source), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(source), "status", "--porcelain", "--", ops_dir],
                check=True, capture_output=True, text=True,
            ).stdout.strip()  # fmt: skip
            if dirty:
                commit += " (with local changes under " + ops_dir + ")"
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown (not a git checkout)"
        return sources, commit
    commit = _git(source, "rev-parse", f"{rev}^{{commit}}").strip()  # a git directory
    listed = set(_git(source, "ls-tree", "-r", "--name-only", commit, "--", ops_dir).split())
    for name in FILES:
        path = f"{ops_dir}/{name}"
        sources[name] = _git(source, "show", f"{commit}:{path}") if path in listed else ""
    return sources, commit


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the warnings the original's unchanged code raises on torch 2.x (meshgrid indexing, custom_fwd)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.meshgrid", category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*custom_(fwd|bwd)", category=FutureWarning)
        yield


def load_original(source: Path, rev: str = "HEAD", ops_dir: str = OPS_DIR) -> tuple[types.ModuleType, Any, str]:
    """Import InternImage's ``functions.dcnv3_func`` and ``modules.dcnv3`` with the CUDA extension stubbed out."""
    sources, commit = _read_sources(source, rev, ops_dir)
    tmp = Path(tempfile.mkdtemp(prefix="internimage_dcnv3_"))
    for name, text in sources.items():
        path = tmp / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    dcnv3_stub = types.ModuleType("DCNv3")  # the compiled extension: never called on the pure-PyTorch path

    def _no_cuda(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the DCNv3 CUDA extension is stubbed out by check_against_internimage.py")

    dcnv3_stub.dcnv3_forward = _no_cuda  # type: ignore[attr-defined]
    dcnv3_stub.dcnv3_backward = _no_cuda  # type: ignore[attr-defined]
    pkg_stub = types.ModuleType("pkg_resources")
    pkg_stub.get_distribution = lambda name: types.SimpleNamespace(version="1.1")  # type: ignore[attr-defined]
    saved = {name: sys.modules.get(name) for name in ("DCNv3", "pkg_resources")}
    sys.modules["DCNv3"], sys.modules["pkg_resources"] = dcnv3_stub, pkg_stub
    sys.path.insert(0, str(tmp))
    try:
        with _quiet():
            func = importlib.import_module(f"{PACKAGE}.functions.dcnv3_func")
            mod = importlib.import_module(f"{PACKAGE}.modules.dcnv3")
    finally:
        sys.path.remove(str(tmp))
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return func, mod, commit


class Tally:
    def __init__(self) -> None:
        self.comparisons = 0
        self.failures: list[str] = []
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.cases_run = 0
        self.cases_raised = 0
        self.cases_broadcast = 0

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
        with _quiet():
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


def _out_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def check_core(func: types.ModuleType, tally: Tally) -> None:
    group_channels, n, h, w = 4, 2, 9, 11
    cases: list[dict[str, Any]] = []
    for k, s, p, d, g, os_, rc in itertools.product((3, 5), (1, 2), (0, 1), (1, 2), (1, 4), (0.5, 1.0), (0, 1)):
        cases.append(dict(kh=k, kw=k, sh=s, sw=s, ph=p, pw=p, dh=d, dw=d, g=g, os=os_, rc=rc))
    cases += [
        dict(kh=3, kw=5, sh=1, sw=2, ph=0, pw=1, dh=2, dw=1, g=4, os=1.0, rc=0),
        dict(kh=5, kw=3, sh=2, sw=1, ph=1, pw=2, dh=1, dw=2, g=1, os=0.5, rc=0),
        dict(kh=1, kw=3, sh=1, sw=1, ph=2, pw=0, dh=1, dw=1, g=4, os=0.7, rc=0),
        dict(kh=4, kw=4, sh=1, sw=1, ph=1, pw=1, dh=1, dw=1, g=4, os=1.0, rc=0),
        dict(kh=4, kw=4, sh=1, sw=1, ph=1, pw=1, dh=1, dw=1, g=4, os=1.0, rc=1),  # must raise
        dict(kh=3, kw=5, sh=1, sw=1, ph=1, pw=1, dh=1, dw=1, g=4, os=1.0, rc=1),  # must raise
    ]
    for index, c in enumerate(cases):
        name = "core " + ",".join(f"{key}={value}" for key, value in c.items())
        torch.manual_seed(index)
        # F.pad pads W by pad_h and H by pad_w in the original (see dcnv3_reference.py): output size accordingly.
        h_out = _out_size(h, c["kh"], c["sh"], c["pw"], c["dh"])
        w_out = _out_size(w, c["kw"], c["sw"], c["ph"], c["dw"])
        taps = c["kh"] * c["kw"] - c["rc"]
        x = torch.randn(n, h, w, c["g"] * group_channels, dtype=torch.float64)
        offset = 2.0 * torch.randn(n, h_out, w_out, c["g"] * taps * 2, dtype=torch.float64)
        mask = torch.randn(n, h_out, w_out, c["g"] * taps, dtype=torch.float64)
        results = []
        for impl in (func.dcnv3_core_pytorch, ours.dcnv3_core_pytorch):
            leaves = [t.clone().requires_grad_(True) for t in (x, offset, mask)]

            def call(
                impl: Callable[..., torch.Tensor] = impl,
                leaves: list[torch.Tensor] = leaves,
                c: dict[str, Any] = c,
                index: int = index,
            ) -> Any:
                y = impl(
                    *leaves, c["kh"], c["kw"], c["sh"], c["sw"], c["ph"], c["pw"], c["dh"], c["dw"],
                    c["g"], group_channels, c["os"], c["rc"],
                )  # fmt: skip
                torch.manual_seed(10_000 + index)
                (y * torch.randn_like(y)).sum().backward()
                return y.detach(), [leaf.grad for leaf in leaves]

            results.append(_run(call))
        (theirs, their_error), (mine, my_error) = results
        if _same_error(tally, name, their_error, my_error):
            continue
        tally.cases_run += 1
        tally.compare(name + " output", mine[0], theirs[0])
        for label, a, b in zip(("input", "offset", "mask"), mine[1], theirs[1], strict=True):
            tally.compare(f"{name} grad {label}", a, b)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter and buffer: offsets of a few pixels, non-uniform masks, non-trivial norms and scales."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if name.startswith("offset"):
                param.copy_(noise * (0.5 if name.endswith("weight") else 1.5))
            elif name.startswith("dw_conv.1") and name.endswith("weight"):  # the norm's scale
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.4 * noise)
        for name, buffer in module.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))


def _module_case(mod: Any, tally: Tally, index: int, size: tuple[int, int], train: bool, **kw: Any) -> None:
    name = f"module {size[0]}x{size[1]} train={train} " + ",".join(f"{key}={value}" for key, value in kw.items())
    torch.manual_seed(index)
    with _quiet():
        original = mod.DCNv3_pytorch(**kw)
    _randomise(original, index)
    original = original.double().train(train)
    mine = ours.DCNv3_pytorch(**kw).double().train(train)
    theirs_sd, mine_sd = original.state_dict(), mine.state_dict()
    tally.comparisons += 1
    keys_theirs = [(key, tuple(value.shape)) for key, value in theirs_sd.items()]
    keys_mine = [(key, tuple(value.shape)) for key, value in mine_sd.items()]
    if keys_theirs != keys_mine:
        tally.failures.append(f"{name}: state dict keys differ: {keys_theirs} vs {keys_mine}")
        return
    mine.load_state_dict(theirs_sd, strict=True)
    x = torch.randn(2, *size, kw["channels"], dtype=torch.float64)
    results = []
    for module in (original, mine):
        leaf = x.clone().requires_grad_(True)

        def call(module: torch.nn.Module = module, leaf: torch.Tensor = leaf) -> Any:
            y = module(leaf)
            torch.manual_seed(10_000 + index)
            (y * torch.randn_like(y)).sum().backward()
            return y.detach(), leaf.grad, {key: p.grad for key, p in module.named_parameters()}

        results.append(_run(call))
    (theirs, their_error), (ours_, my_error) = results
    if _same_error(tally, name, their_error, my_error):
        return
    tally.cases_run += 1
    k, s, p, d = kw["kernel_size"], kw["stride"], kw["pad"], kw["dilation"]
    if tuple(_out_size(n, k, s, p, d) for n in size) != size:  # the reference points broadcast over (H, W)
        tally.cases_broadcast += 1
    tally.compare(name + " output", ours_[0], theirs[0])
    tally.compare(name + " grad input", ours_[1], theirs[1])
    for key, grad in theirs[2].items():
        tally.compare(f"{name} grad {key}", ours_[2][key], grad)
    mine_buffers = dict(mine.named_buffers())
    for key, buffer in original.named_buffers():
        tally.compare(f"{name} buffer {key}", mine_buffers[key], buffer)


def check_module(mod: Any, tally: Tally) -> None:
    acts, norms, dws = ("GELU", "ReLU", "SiLU"), ("LN", "BN"), (None, 3, 5)
    channels, index = 16, 0
    grid = itertools.product(
        ((7, 8), (2, 3)), (3, 5), (1, 2), (0, 1, 2, 4), (1, 2), (1, 4), (0.5, 1.0), (False, True), (False, True)
    )
    for size, k, s, p, d, g, os_, cfs, rc in grid:
        kw = dict(
            channels=channels, kernel_size=k, dw_kernel_size=dws[index % 3], stride=s, pad=p, dilation=d, group=g,
            offset_scale=os_, act_layer=acts[index % 3], norm_layer=norms[(index // 3) % 2],
            center_feature_scale=cfs, remove_center=rc,
        )  # fmt: skip
        _module_case(mod, tally, index, size, True, **kw)
        index += 1
    for base in (dict(kernel_size=3, pad=1, dilation=1, group=4), dict(kernel_size=5, pad=4, dilation=2, group=2)):
        for act, norm, dw, train, cfs, rc in itertools.product(
            acts, norms, dws, (True, False), (False, True), (False, True)
        ):
            kw = dict(
                channels=channels, dw_kernel_size=dw, stride=1, offset_scale=1.0, act_layer=act, norm_layer=norm,
                center_feature_scale=cfs, remove_center=rc, **base,
            )  # fmt: skip
            _module_case(mod, tally, index, (6, 5), train, **kw)
            index += 1


DEFINITIONS = (
    "_get_reference_points", "_generate_dilation_grids", "remove_center_sampling_locations", "dcnv3_core_pytorch",
    "to_channels_first", "to_channels_last", "build_norm_layer", "build_act_layer", "_is_power_of_2",
    "CenterFeatureScaleModule", "DCNv3_pytorch",
)  # fmt: skip


class _DropMeshgridIndexing(ast.NodeTransformer):
    """Our one edit to the original's statements: ``torch.meshgrid(..., indexing="ij")`` (its default)."""

    def visit_Call(self, node: ast.Call) -> ast.Call:
        self.generic_visit(node)
        if ast.unparse(node.func) == "torch.meshgrid":
            node.keywords = [
                k for k in node.keywords if not (k.arg == "indexing" and ast.literal_eval(k.value) == "ij")
            ]
        return node


def check_source(func: types.ModuleType, mod: types.ModuleType) -> list[str]:
    """Each definition of ours, as an AST, against the original's; returns the differences."""
    theirs = ast.parse(Path(func.__file__).read_text() + "\n" + Path(mod.__file__).read_text())
    mine = _DropMeshgridIndexing().visit(ast.parse(Path(ours.__file__).read_text()))

    def definitions(tree: ast.Module) -> dict[str, str]:
        return {n.name: ast.unparse(n) for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}

    their_defs, my_defs = definitions(theirs), definitions(mine)
    problems = []
    for name in DEFINITIONS:
        if name == "_is_power_of_2":  # ours formats its message with an f-string: compare behaviour
            for n in (-1, 0, 1, 6, 8, 2.0):
                results = [_run(lambda f=f, n=n: f(n)) for f in (mod._is_power_of_2, ours._is_power_of_2)]
                (a, error_a), (b, error_b) = results
                if a != b or repr(error_a) != repr(error_b):
                    problems.append(f"_is_power_of_2({n!r}): {a!r}/{error_a!r} vs {b!r}/{error_b!r}")
        elif their_defs.get(name) != my_defs.get(name):
            problems.append(f"{name}: the statements differ")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("internimage", type=Path, help="an InternImage checkout, or its git directory")
    parser.add_argument("--rev", default="HEAD", help="the revision to read from a git directory (default HEAD)")
    parser.add_argument("--ops-dir", default=OPS_DIR, help=f"the ops_dcnv3 copy to compare with (default {OPS_DIR})")
    parser.add_argument("--write", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    func, mod, commit = load_original(args.internimage, args.rev, args.ops_dir)
    start = datetime.datetime.now(datetime.UTC)
    lines = [
        "parity/check_against_internimage.py: parity/dcnv3_reference.py vs InternImage's pure-PyTorch DCNv3",
        f"date (UTC): {start:%Y-%m-%d %H:%M:%S}",
        f"InternImage commit: {commit}",
        f"files: {args.ops_dir}/functions/dcnv3_func.py, {args.ops_dir}/modules/dcnv3.py",
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, float64, CPU",
        f"tolerance: {TOL:g} x max(1, max |original|) per comparison",
        "",
    ]
    problems = check_source(func, mod)
    all_ok = not problems
    lines += [
        f"source: {len(DEFINITIONS)} definitions compared as ASTs (ours without meshgrid's indexing='ij'; "
        f"_is_power_of_2 by its results and messages): {len(problems)} differ"
    ]
    lines += [f"  FAIL {problem}" for problem in problems]
    for label, check, target in (("dcnv3_core_pytorch", check_core, func), ("DCNv3_pytorch", check_module, mod)):
        tally = Tally()
        check(target, tally)
        ok = not tally.failures
        all_ok &= ok
        lines += [
            f"{label}: {tally.cases_run} cases ran in both"
            + (
                f" ({tally.cases_broadcast} of them with the reference points broadcast over another (H, W))"
                if check is check_module
                else ""
            )
            + ",",
            f"  {tally.cases_raised} cases raised the same error in both;",
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
        command = " ".join([".venv/bin/python", "parity/check_against_internimage.py", *(argv or sys.argv[1:])])
        rerun = [
            "",
            f"command (from the repository root): {command}",
            "to rerun on a fresh clone:",
            "    git clone https://github.com/OpenGVLab/InternImage /tmp/InternImage",
            f"    git -C /tmp/InternImage checkout {commit.split()[0]}",
            "    .venv/bin/python parity/check_against_internimage.py /tmp/InternImage",
        ]
        args.write.write_text(report + "\n" + "\n".join(rerun) + "\n")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
