"""benchmarks/summary.py: ratio tables recomputed from the committed JSON medians, README block updates.

The expected ratios are recomputed here from the raw ``median_ms`` values in the JSON (never copied from
the reports), so a regenerated results folder keeps these tests meaningful. No torch needed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import summary

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "docs" / "results"
# The files the summary reads: each benchmark's main grid (per_sample_conv's depthwise grid has its own report).
RESULT_FILES = sorted(
    path
    for path in RESULTS_DIR.glob("*.json")
    if json.loads(path.read_text())["metadata"].get("grid", "main") == "main"
)
START, END = summary.START_MARKER, summary.END_MARKER


def load(benchmark: str) -> tuple[str, dict[str, Any]]:
    """(device, payload) of the first committed result of ``benchmark``."""
    for path in RESULT_FILES:
        payload = json.loads(path.read_text())
        if payload["benchmark"] == benchmark:
            return path.stem.removeprefix(f"{benchmark}_"), payload
    pytest.skip(f"no committed {benchmark} result")


def section(text: str, benchmark: str, device: str) -> str:
    """The summary's section for one benchmark and device (from its heading to the next one)."""
    title = {
        "per_sample_conv": "Per-sample convolution",
        "branch_mix": "BranchMixConv",
        "kernel_mixing": "Kernel mixing",
        "xla_floor": "XLA's floor",
    }[benchmark]
    parts = [part for part in text.split("\n### ") if part.startswith(title) and f"({device})\n" in part]
    assert len(parts) == 1, f"expected one {benchmark} ({device}) section"
    return parts[0]


def table_rows(text: str) -> list[list[str]]:
    """Cells of every markdown table row in ``text`` (header and rule rows included)."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|")
    ]


def row_starting(text: str, *cells: str) -> list[str]:
    matches = [row for row in table_rows(text) if row[: len(cells)] == list(cells)]
    assert len(matches) == 1, f"expected one row starting with {cells}, found {len(matches)}"
    return matches[0]


def median(results: Mapping[str, Any], name: str) -> float:
    record = results[name]
    assert record["status"] == "ok", f"{name} was not timed"
    return record["median_ms"]


def committed_summary() -> str:
    return summary.render_summary(RESULTS_DIR)


# --- Formatting -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "estimated", "expected"),
    [
        (0.7862, False, "0.79x"),
        (1.4, False, "1.40x"),
        (15.63, False, "15.6x"),
        (279.6, True, "~280x"),
        (0.04812, False, "0.048x"),
        (None, False, "-"),
    ],
)
def test_format_ratio(ratio: float | None, estimated: bool, expected: str) -> None:
    assert summary.format_ratio(ratio, estimated=estimated) == expected


# --- The committed results ------------------------------------------------------------------------------


def test_committed_results_exist() -> None:
    assert {json.loads(path.read_text())["benchmark"] for path in RESULT_FILES} == set(summary.SECTIONS)


@pytest.mark.parametrize("path", RESULT_FILES, ids=[path.stem for path in RESULT_FILES])
def test_header_and_links_per_result(path: Path) -> None:
    payload = json.loads(path.read_text())
    metadata = payload["metadata"]
    device = path.stem.removeprefix(f"{payload['benchmark']}_")
    text = section(committed_summary(), payload["benchmark"], device)
    header = text.splitlines()[2]
    for expected in (f"{metadata['cpu_count']} logical cores", f"jax {metadata['jax']}", f"torch {metadata['torch']}"):
        assert expected in header
    assert metadata["date"][:10] in header
    # Links relative to the repository root (the README's folder), the image in markdown image syntax.
    assert f"](docs/results/{path.stem}.md)" in text
    assert re.search(rf"!\[[^\]]*\]\(docs/results/{re.escape(path.stem)}\.png\)", text)


def test_per_sample_conv_ratios_from_medians() -> None:
    device, payload = load("per_sample_conv")
    text = section(committed_summary(), "per_sample_conv", device)
    for shape in payload["shapes"]:
        row = row_starting(text, f"{shape['name']}: {shape['description']}")
        expected = []
        for mode in ("fwd", "fwd+bwd"):
            results = shape["results"][mode]
            torch_ms = [r["median_ms"] for n, r in results.items() if n.startswith("torch ") and r["status"] == "ok"]
            expected.append(summary.format_ratio(median(results, "jdynconv auto") / min(torch_ms)))
        backward = shape["results"]["fwd+bwd"]
        vmap = backward["jdynconv vmap"]
        if vmap["status"] == "ok":
            naive = summary.format_ratio(vmap["median_ms"] / median(backward, "jdynconv auto"))
        else:  # skipped as too slow: the estimate, marked
            assert vmap["status"] == "skipped"
            estimate_ms = vmap["estimated_call_s"] * 1e3
            naive = summary.format_ratio(estimate_ms / median(backward, "jdynconv auto"), estimated=True)
        assert [row[1], row[2], row[4]] == [*expected, naive]


def test_xla_floor_ratios_from_medians() -> None:
    device, payload = load("xla_floor")
    text = section(committed_summary(), "xla_floor", device)
    for shape in payload["shapes"]:
        row = row_starting(text, f"{shape['name']}: {shape['description']}")
        floor_over_torch, auto_over_floor = [], []
        for mode in ("fwd", "fwd+bwd"):
            results = shape["results"][mode]
            programs = ("XLA shared conv NCHW", "XLA shared conv NHWC", "XLA one matmul")
            floor = min(median(results, name) for name in programs)
            floor_over_torch.append(summary.format_ratio(floor / median(results, "torch grouped (per-sample)")))
            auto_over_floor.append(summary.format_ratio(median(results, "jdynconv auto (per-sample)") / floor))
        forward = shape["results"]["fwd"]
        core = min(median(forward, name) for name in ("XLA per-sample matmuls", "XLA batched matmul"))
        core_over_torch = summary.format_ratio(core / median(forward, "torch grouped (per-sample)"))
        assert row[1:] == [*floor_over_torch, core_over_torch, *auto_over_floor]


def test_per_sample_conv_marks_estimates() -> None:
    device, payload = load("per_sample_conv")
    text = section(committed_summary(), "per_sample_conv", device)
    skipped = [s for s in payload["shapes"] if s["results"]["fwd+bwd"]["jdynconv vmap"]["status"] == "skipped"]
    estimated_cells = [row[4] for row in table_rows(text) if row[4].startswith("~")]
    assert len(estimated_cells) == len(skipped)
    assert ("~: vmap was too slow to time" in text) == bool(skipped)


def test_branch_mix_ratios_from_medians() -> None:
    device, payload = load("branch_mix")
    text = section(committed_summary(), "branch_mix", device)
    for case in payload["cases"]:
        for mode, label in (("fwd", "fwd (eval)"), ("train", "train step")):
            results = case["results"][mode]
            seed, fused = median(results, "torch seed"), median(results, "torch fused")
            expected = [
                median(results, "jdynconv") / seed,
                median(results, "jdynconv") / fused,
                median(results, "jdynconv fused") / seed,
                median(results, "jdynconv remat") / seed,
                median(results, "jax naive loop") / seed,
            ]
            row = row_starting(text, str(case["num_branches"]), label)
            assert row[2:] == [summary.format_ratio(r) for r in expected]


def test_branch_mix_study_table() -> None:
    device, payload = load("branch_mix")
    text = section(committed_summary(), "branch_mix", device)
    ks = sorted({row["k"] for row in payload["study"]})
    header = row_starting(text, "training step: jdynconv / method=fused / remat / naive loop")
    assert header[1:] == [f"k = {k}" for k in ks]
    equations = row_starting(text, "jaxpr equations (nested)")
    for column, k in enumerate(ks, 1):
        by_variant = {row["variant"]: row["jaxpr_equations"] for row in payload["study"] if row["k"] == k}
        variants = ("jdynconv", "jdynconv fused", "jdynconv remat", "jax naive loop")
        assert equations[column] == " / ".join(str(by_variant[v]) for v in variants)


def test_kernel_mixing_ratios_from_medians() -> None:
    device, payload = load("kernel_mixing")
    text = section(committed_summary(), "kernel_mixing", device)
    for case in payload["cases"]:
        fwd, train, conv = (case["results"][mode] for mode in ("fwd", "train", "conv"))
        expected = [
            median(fwd, "jdynconv auto") / median(fwd, "torch reference"),
            median(train, "jdynconv auto") / median(train, "torch reference"),
            median(train, "jdynconv mix_outputs") / median(train, "torch reference"),
            median(conv, "jdynconv auto") / median(conv, "torch reference"),
        ]
        rest = []
        for name in ("jdynconv auto", "torch reference"):
            # Paired per round: the samples are in round order, one call each.
            assert train[name]["inner_calls"] == conv[name]["inner_calls"] == 1
            differences = np.subtract(train[name]["samples_ms"], conv[name]["samples_ms"])
            rest.append("{:.0f} [{:.0f}, {:.0f}]".format(*np.percentile(differences, [50, 25, 75])))
        row = row_starting(text, case["layer"], str(case["num_experts"]))
        assert row[2] == case["auto_mixing"]
        assert row[3:7] == [summary.format_ratio(r) for r in expected]
        assert row[7] == " / ".join(rest)


# --- Synthetic results ----------------------------------------------------------------------------------


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    path.write_text(json.dumps(payload))
    return path


def test_unknown_benchmark_names_the_file(tmp_path: Path) -> None:
    shutil.copy(RESULT_FILES[0], tmp_path)
    write_json(tmp_path / "mystery_cpu.json", {"benchmark": "mystery", "metadata": {}})
    with pytest.raises(ValueError, match=r"mystery_cpu\.json.*'mystery'"):
        summary.render_summary(tmp_path)


def test_other_grids_are_left_out(tmp_path: Path) -> None:
    """per_sample_conv's depthwise grid has a report of its own, not a row in the summary's table."""
    main = next(path for path in RESULT_FILES if path.name == "per_sample_conv_cpu.json")
    shutil.copy(main, tmp_path)
    payload = json.loads(main.read_text())
    payload["metadata"]["grid"] = "depthwise"
    payload["shapes"][0]["name"] = "other-grid-shape"
    write_json(tmp_path / "per_sample_conv_depthwise_cpu.json", payload)
    text = summary.render_summary(tmp_path)
    assert "other-grid-shape" not in text
    assert "depthwise_cpu" not in text
    assert "Per-sample convolution" in text  # the main grid's table is there


def test_file_without_benchmark_names_the_file(tmp_path: Path) -> None:
    write_json(tmp_path / "notes.json", {"hello": 1})
    with pytest.raises(ValueError, match=r"notes\.json"):
        summary.render_summary(tmp_path)


def test_unknown_benchmark_selection_is_named() -> None:
    with pytest.raises(ValueError, match=r"benchmarks: expected names among per_sample_conv.*got mystery"):
        summary.render_summary(RESULTS_DIR, benchmarks=("per_sample_conv", "mystery"))


def test_empty_results_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No benchmark results"):
        summary.render_summary(tmp_path)


def test_a_selected_benchmark_without_a_result_is_named(tmp_path: Path) -> None:
    """The README's block asks for per_sample_conv: without its result, an error naming the file, not an empty
    block."""
    shutil.copy(RESULTS_DIR / "branch_mix_cpu.json", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"No per_sample_conv result \(per_sample_conv_<device>\.json"):
        summary.render_summary(tmp_path, benchmarks=summary.README_BENCHMARKS)
    assert "### BranchMixConv" in summary.render_summary(tmp_path)  # SUMMARY.md shows what there is


def test_gpu_quick_run_without_study_or_plot(tmp_path: Path) -> None:
    """A GPU smoke run: device from the file name, quick marked, a failed competitor shown, no study."""
    metadata = {
        "date": "2030-01-02T03:04:05+00:00",
        "cpu": "Some CPU",
        "cpu_count": 16,
        "jax": "9.9",
        "torch": "8.8",
        "jax_backend": "gpu",
        "device_kind": "NVIDIA H200",
        "torch_device": "cuda",
        "torch_cuda_device": "NVIDIA H200",
        "rounds": 3,
        "quick": True,
    }

    def ok(ms: float) -> dict[str, Any]:
        return {"status": "ok", "median_ms": ms}

    results = {
        "torch seed": ok(10.0),
        "torch fused": ok(5.0),
        "jdynconv": ok(4.0),
        "jdynconv fused": ok(6.0),
        "jdynconv remat": {"status": "wrong", "note": "wrong (rel. error 1e-2)"},
        "jax naive loop": ok(20.0),
    }
    case = {"name": "seed", "num_branches": 8, "results": {"fwd": results, "train": results}}
    write_json(tmp_path / "branch_mix_gpu.json", {"benchmark": "branch_mix", "metadata": metadata, "cases": [case]})
    text = summary.render_summary(tmp_path, link_base=tmp_path)
    assert "### BranchMixConv: jdynconv vs the seed's PyTorch model (gpu)" in text
    assert "GPU NVIDIA H200, host CPU Some CPU (16 logical cores)" in text
    assert "quick smoke run" in text
    assert row_starting(text, "8", "fwd (eval)")[2:] == ["0.40x", "0.80x", "0.60x", "wrong", "2.00x"]
    assert "jaxpr equations" not in text  # no study table without a study
    assert "](branch_mix_gpu.md)" not in text  # no links to files that are not there


# --- update_block ---------------------------------------------------------------------------------------


def test_update_block_replaces_only_the_block() -> None:
    text = f"# Title\n\nbefore\n{START}\nold line 1\nold line 2\n{END}\nafter\n"
    updated = summary.update_block(text, "new summary\n")
    assert updated == f"# Title\n\nbefore\n{START}\n\nnew summary\n\n{END}\nafter\n"
    assert summary.update_block(updated, "new summary\n") == updated  # idempotent


def test_update_block_with_empty_block() -> None:
    assert summary.update_block(f"{START}\n{END}", "x") == f"{START}\n\nx\n\n{END}"


@pytest.mark.parametrize(
    "text",
    [
        "no markers at all\n",
        f"{START}\nonly the start\n",
        f"only the end\n{END}\n",
        f"{END}\nreversed\n{START}\n",
        f"{START}\n{START}\n{END}\n",
        f"inline {START} is not a marker line\n{END}\n",
    ],
    ids=["none", "no-end", "no-start", "reversed", "duplicate", "inline"],
)
def test_update_block_rejects_bad_markers(text: str) -> None:
    with pytest.raises(ValueError, match="benchmark-summary"):
        summary.update_block(text, "summary")


# --- Command line ---------------------------------------------------------------------------------------


def test_cli_writes_summary_and_readme_block(tmp_path: Path) -> None:
    results = tmp_path / "benchmarks" / "results"
    shutil.copytree(RESULTS_DIR, results, ignore=shutil.ignore_patterns("SUMMARY.md"))
    readme = tmp_path / "README.md"
    readme.write_text(f"# Project\n\n## Speed\n\n{START}\nstale\n{END}\n\n## Next\n")

    assert summary.main(["--results-dir", str(results), "--readme", str(readme)]) == 0

    written = (results / "SUMMARY.md").read_text()
    assert written.startswith("# Benchmark summary\n")
    assert "](per_sample_conv_cpu.md)" in written  # relative to SUMMARY.md's own folder
    readme_text = readme.read_text()
    assert "stale" not in readme_text
    assert readme_text.startswith("# Project\n\n## Speed\n\n")
    assert readme_text.endswith(f"{END}\n\n## Next\n")
    assert "](benchmarks/results/per_sample_conv_cpu.png)" in readme_text  # relative to the README's folder
    # The README's block has only the landing page's table; SUMMARY.md has every benchmark.
    assert "### Per-sample convolution" in readme_text
    assert "### BranchMixConv" not in readme_text
    assert "### BranchMixConv" in written


def test_cli_leaves_a_readme_without_markers_alone(tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(RESULTS_DIR, results, ignore=shutil.ignore_patterns("SUMMARY.md"))
    readme = tmp_path / "README.md"
    readme.write_text("# No markers\n")
    assert summary.main(["--results-dir", str(results), "--readme", str(readme)]) == 1
    assert readme.read_text() == "# No markers\n"
    assert not (results / "SUMMARY.md").exists()


def test_cli_fails_without_the_readme_s_result_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(RESULTS_DIR / "branch_mix_cpu.json", results)
    readme = tmp_path / "README.md"
    readme.write_text(f"# Project\n\n{START}\nold block\n{END}\n")
    assert summary.main(["--results-dir", str(results), "--readme", str(readme)]) == 1
    assert "summary: No per_sample_conv result (per_sample_conv_<device>.json" in capsys.readouterr().err
    assert readme.read_text() == f"# Project\n\n{START}\nold block\n{END}\n"
    assert not (results / "SUMMARY.md").exists()


def test_run_all_checks_the_readme_before_running_anything(tmp_path: Path) -> None:
    """Run as a script (its sibling imports resolve as documented); exits before importing any benchmark."""
    readme = tmp_path / "README.md"
    readme.write_text("# No markers\n")
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "benchmarks" / "run_all.py"),
            "--out-dir",
            str(tmp_path),
            "--readme",
            str(readme),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert completed.returncode == 2, completed.stderr
    assert "benchmark-summary" in completed.stderr
    assert not list(tmp_path.glob("*.json"))


def test_readme_and_summary_md_match_the_committed_results() -> None:
    """The README's tables and SUMMARY.md are what the committed JSON renders to (regenerate with
    ``python benchmarks/summary.py --readme README.md`` after new results)."""
    readme = (REPO_ROOT / "README.md").read_text()
    rendered = summary.render_summary(RESULTS_DIR, benchmarks=summary.README_BENCHMARKS)
    assert summary.update_block(readme, rendered) == readme
    summary_md = (RESULTS_DIR / "SUMMARY.md").read_text()
    assert summary_md == "# Benchmark summary\n\n" + summary.render_summary(RESULTS_DIR, link_base=RESULTS_DIR)
