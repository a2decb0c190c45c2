"""benchmarks/_harness.py and _report.py: selection, checks against the reference, status marking, the JSON
records and the tables, against expectations worked out by hand. Competitors are plain Python calls (no JAX
or PyTorch work), so it runs in a second."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# The benchmarks import their siblings as top-level modules (they run as scripts from benchmarks/).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _harness as harness
import _report as report
import run_all
from _harness import Built, Check, Competitor, Prepared, Reference, Settings
from _timing import Stats


class Item:
    def __init__(self, name: str) -> None:
        self.name = name


ITEMS = (Item("seed"), Item("2d-a"), Item("2d-b"))
FAST = Settings(rounds=2, min_sample_s=1e-4)


# --- Selection and settings -----------------------------------------------------------------------------


def test_select_takes_names_and_indices_in_order_once() -> None:
    assert [(i, item.name) for i, item in harness.select(ITEMS, None)] == [(0, "seed"), (1, "2d-a"), (2, "2d-b")]
    chosen = harness.select(ITEMS, ["2d-b,0", "seed", "1"])
    assert [(i, item.name) for i, item in chosen] == [(2, "2d-b"), (0, "seed"), (1, "2d-a")]


def test_select_names_the_choices_of_an_unknown_token() -> None:
    with pytest.raises(SystemExit, match=r"Unknown shape '3'; choose indices or names among: 0=seed, 1=2d-a, 2=2d-b"):
        harness.select(ITEMS, ["3"], "shape")


def test_defaults_give_quick_settings_unless_rounds_are_given() -> None:
    defaults = harness.Defaults(rounds=15)
    full = defaults.settings(argparse.Namespace(quick=False, rounds=None))
    quick = defaults.settings(argparse.Namespace(quick=True, rounds=None), max_call_s=2.0)
    assert full == Settings(15, 0.02)
    assert quick == Settings(3, 0.005, 2.0)
    assert defaults.settings(argparse.Namespace(quick=True, rounds=5)).rounds == 5
    assert quick.metadata() == {"rounds": 3, "min_sample_ms": 5.0}


# --- Checks against the reference -----------------------------------------------------------------------


def test_relative_error_is_the_worst_array_scaled_by_the_reference() -> None:
    reference = (np.array([1.0, -4.0]), np.array([10.0]))
    # First pair: max|a - b| = 0.2, max|b| = 4 -> 0.05; second: 1 / 10 = 0.1.
    assert harness.relative_error((np.array([1.2, -4.0]), np.array([11.0])), reference) == pytest.approx(0.1)
    assert harness.relative_error((np.array([1.0, -4.0]),), reference[:1]) == 0.0
    assert harness.relative_error((np.zeros(3),), (np.zeros(2),)) == math.inf  # shapes differ
    assert harness.relative_error((np.zeros(2),), reference) == math.inf  # as many arrays as the reference


def test_relative_error_l2_is_the_norm_of_the_difference_over_the_reference_norm() -> None:
    reference = (np.array([3.0, 4.0, 0.0, 0.0]),)  # ||b|| = 5
    result = (np.array([3.0, 4.0, 0.0, 1.0]),)  # one entry off by 1: max 1 / 4, L2 1 / 5
    assert harness.relative_error(result, reference, "l2") == pytest.approx(0.2)
    assert harness.relative_error(result, reference) == pytest.approx(0.25)


def test_as_arrays_moves_channels_last_results_to_channels_first() -> None:
    nhwc = np.arange(24.0).reshape(1, 2, 3, 4)
    (nchw, loss) = harness.as_arrays((nhwc, 3.0), channels_last=True)
    assert nchw.shape == (1, 4, 2, 3)
    assert nchw[0, 3, 1, 2] == nhwc[0, 1, 2, 3]
    assert loss.shape == ()
    assert harness.as_arrays(nhwc)[0].shape == (1, 2, 3, 4)


def test_check_note_names_what_is_wrong() -> None:
    check = Check(tolerance=1e-4, grad_tolerance=1e-3, result_names={"fwd": "output"})
    assert harness.check_note(check, "fwd", 1e-4, None) is None  # at the tolerance: still right
    assert harness.check_note(check, "fwd", 2e-4, None) == "wrong output (rel. error 2.0e-04)"
    assert harness.check_note(check, "train", 2e-4, None) == "wrong (rel. error 2.0e-04)"
    assert harness.check_note(check, "fwd", math.nan, None) == "wrong output (rel. error nan)"
    grads = {"weight": 5e-4, "bias": 2e-3}
    assert harness.check_note(check, "train", 0.0, grads) == "wrong gradient of bias (rel. error 2.0e-03)"
    assert harness.check_note(check, "train", 0.0, {"weight": 5e-4}) is None


# --- Preparing one competitor ---------------------------------------------------------------------------


def constant(value: Any, gradients: dict[str, np.ndarray] | None = None) -> Competitor:
    return Competitor("c", lambda mode: Built(lambda: value, (lambda: gradients) if gradients else None))


def test_prepare_marks_an_agreeing_competitor_ok() -> None:
    reference = Reference((np.array([1.0, 2.0]),))
    entry, mine = harness.prepare(constant(np.array([1.0, 2.0])), "fwd", reference, FAST, Check())
    assert entry.status == "ok"
    assert entry.call is not None
    assert entry.inner >= 1
    assert entry.rel_error == 0.0
    assert mine is not None
    np.testing.assert_array_equal(mine.result[0], [1.0, 2.0])
    assert set(entry.record()) == {"status", "first_call_s", "warm_call_s", "rel_error"}


def test_prepare_marks_a_disagreeing_competitor_wrong_and_leaves_it_untimed() -> None:
    reference = Reference((np.array([1.0, 2.0]),))
    entry, _ = harness.prepare(constant(np.array([1.0, 2.1])), "fwd", reference, FAST, Check())
    assert (entry.status, entry.note, entry.call) == ("wrong", "wrong (rel. error 5.0e-02)", None)
    assert entry.rel_error == pytest.approx(0.05)


def test_prepare_checks_every_gradient() -> None:
    reference = Reference((np.array(1.0),), {"w": np.array([2.0, 4.0]), "b": np.array([1.0])})
    competitor = constant(np.array(1.0), {"w": np.array([2.0, 4.0]), "b": np.array([1.5])})
    entry, _ = harness.prepare(competitor, "train", reference, FAST, Check(result_names={"train": "loss"}))
    assert entry.status == "wrong"
    assert entry.note == "wrong gradient of b (rel. error 5.0e-01)"
    assert entry.grad_rel_errors == {"w": 0.0, "b": 0.5}
    missing = constant(np.array(1.0), {"w": np.array([2.0, 4.0])})  # no gradient for b: infinitely wrong
    assert harness.prepare(missing, "train", reference, FAST, Check())[0].grad_rel_errors == {"w": 0.0, "b": math.inf}


def test_prepare_skips_what_a_probe_finds_too_slow_without_building_it() -> None:
    def never(mode: str) -> Built:
        raise AssertionError("built")

    competitor = Competitor("slow", never, probe=lambda mode, limit_s: 7.0 if limit_s < 7.0 else None)
    entry, result = harness.prepare(competitor, "fwd", None, Settings(2, 1e-4, max_call_s=2.0), Check())
    assert (entry.status, entry.note, entry.estimated_call_s, result) == ("skipped", "skipped (>2 s/call)", 7.0, None)
    assert entry.record() == {"status": "skipped", "note": "skipped (>2 s/call)", "estimated_call_s": 7.0}
    assert entry.describe() == "skipped (>2 s/call): about 7 s/call"


def test_prepare_skips_a_capped_competitor_slower_than_the_limit() -> None:
    capped = Competitor("capped", lambda mode: Built(lambda: 1.0), capped=True)
    entry, _ = harness.prepare(capped, "fwd", None, Settings(2, 1e-4, max_call_s=0.0), Check())
    assert entry.status == "skipped"
    assert entry.estimated_call_s is not None
    uncapped = Competitor("uncapped", lambda mode: Built(lambda: 1.0))
    assert harness.prepare(uncapped, "fwd", None, Settings(2, 1e-4, max_call_s=0.0), Check())[0].status == "ok"


# --- A case ---------------------------------------------------------------------------------------------


def case_competitors(mode: str) -> list[Competitor]:
    def broken(mode: str) -> Built:
        raise ValueError("no such pass")

    return [
        Competitor("ref", lambda mode: Built(lambda: np.ones(3))),
        Competitor("same", lambda mode: Built(lambda: np.ones(3))),
        Competitor("off", lambda mode: Built(lambda: np.full(3, 2.0))),
        Competitor("broken", broken),
    ]


def test_run_case_times_the_ok_competitors_and_records_the_others() -> None:
    run = harness.run_case(0, "case", ("fwd", "train"), case_competitors, FAST, Check(), "same")
    assert list(run.results) == ["fwd", "train"]
    records = run.results["fwd"]
    assert {name: record["status"] for name, record in records.items()} == {
        "ref": "ok",
        "same": "ok",
        "off": "wrong",
        "broken": "error",
    }
    assert records["broken"] == {"status": "error", "note": "error (ValueError)"}
    assert records["off"]["note"] == "wrong (rel. error 1.0e+00)"
    assert len(records["same"]["samples_ms"]) == FAST.rounds
    assert {"median_ms", "p25_ms", "p75_ms", "inner_calls", "samples_ms"} <= set(records["same"])
    assert set(run.stats) == {(name, mode) for name in ("ref", "same") for mode in ("fwd", "train")}
    assert set(run.ratios("ref")["fwd"]) == {"same"}
    assert harness.not_timed([{"name": "c", "results": run.results}]) == [
        "c off [fwd]",
        "c broken [fwd]",
        "c off [train]",
        "c broken [train]",
    ]


def test_run_case_stops_when_the_reference_fails() -> None:
    def competitors(mode: str) -> list[Competitor]:
        return [Competitor("ref", lambda mode: Built(lambda: 1 / 0))]

    with pytest.raises(RuntimeError, match=r"The reference ref failed on case: error \(ZeroDivisionError\)"):
        harness.run_case(0, "case", ("fwd",), competitors, FAST, Check(), "ref")


def test_ratios_and_paired_ratios_over_a_baseline() -> None:
    run = harness.CaseRun(
        results={"fwd": {"base": {}, "a": {}, "b": {"status": "wrong"}}, "train": {"a": {}}},
        stats={
            ("base", "fwd"): Stats((1.0, 2.0), 1),
            ("a", "fwd"): Stats((4.0, 2.0), 1),
            ("a", "train"): Stats((1.0,), 1),
        },
    )
    # Medians: base 1.5, a 3.0. Round by round a / base: 4.0, 1.0 -> median 2.5, one round no slower.
    assert run.ratios("base") == {"fwd": {"a": 2.0}}
    assert run.ratios("base", keep_baseline=True) == {"fwd": {"base": 1.0, "a": 2.0}}
    paired = run.paired("base")
    assert list(paired) == ["fwd"]
    assert paired["fwd"]["a"]["median"] == pytest.approx(2.5)
    assert paired["fwd"]["a"]["at_most_one"] == 1


# --- Reports --------------------------------------------------------------------------------------------

CASE_RESULTS = [
    {
        "name": "k4",
        "results": {
            "fwd": {"x": {"status": "ok", "median_ms": 1.5}, "y": {"status": "skipped", "note": "skipped"}},
            "train": {"x": {"status": "ok", "median_ms": 250.0}},
        },
    }
]


def test_time_table_shows_medians_notes_and_gaps() -> None:
    assert report.time_table(CASE_RESULTS, ("fwd", "train"), ("x", "y")) == "\n".join(
        [
            "| case |  pass | x (ms) |  y (ms) |",
            "| ---- | ----: | -----: | ------: |",
            "| k4   |   fwd |    1.5 | skipped |",
            "|      | train |    250 |       - |",
        ]
    )


def test_timing_line_reads_the_settings_from_the_metadata() -> None:
    line = report.timing_line({"rounds": 3, "min_sample_ms": 5.0}, "compile times: median of 1")
    assert line == (
        "- float32, precision pinned to highest (no TF32); 3 interleaved rounds, medians; samples >= 5 ms; "
        "compile times: median of 1"
    )


def test_write_reports_writes_json_and_markdown(tmp_path: Path) -> None:
    paths = report.write_reports(tmp_path / "sub" / "bench_cpu", {"benchmark": "bench"}, "# Bench\n")
    assert [path.name for path in paths] == ["bench_cpu.json", "bench_cpu.md"]
    assert json.loads(paths[0].read_text()) == {"benchmark": "bench"}
    assert paths[1].read_text() == "# Bench\n"


def test_prepared_record_keeps_only_what_was_measured() -> None:
    entry = Prepared("wrong", "wrong (rel. error 1.0e+00)", first_call_s=0.5, rel_error=1.0)
    assert entry.record() == {
        "status": "wrong",
        "note": "wrong (rel. error 1.0e+00)",
        "first_call_s": 0.5,
        "rel_error": 1.0,
    }


# --- run_all: what it summarises ------------------------------------------------------------------------

RESULTS_DIR = Path(__file__).resolve().parents[1] / "docs" / "results"
MARKED_README = "# Project\n\n<!-- benchmark-summary:start -->\nold block\n<!-- benchmark-summary:end -->\n"


def run_all_without_benchmarks(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> tuple[int, list[str]]:
    """``run_all.main(argv)`` with every benchmark a no-op that succeeds (and writes nothing): its exit status
    and the benchmarks it would have run."""
    ran: list[str] = []

    def run_benchmark(run: run_all.Run, out_dir: Path, quick: bool) -> tuple[int, float]:
        ran.append(run.name)
        return 0, 0.0

    monkeypatch.setattr(run_all, "run_benchmark", run_benchmark)
    return run_all.main(argv), ran


def test_run_all_of_unsummarised_benchmarks_leaves_the_summary_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--only odconv`` into an empty folder: odconv's reports go to a subfolder the summary does not read, so
    there is nothing to summarise; it says so and rewrites neither SUMMARY.md nor the README's block."""
    readme = tmp_path / "README.md"
    readme.write_text(MARKED_README)
    argv = ["--only", "odconv", "--out-dir", str(tmp_path / "out"), "--readme", str(readme)]
    status, ran = run_all_without_benchmarks(monkeypatch, argv)
    assert (status, ran) == (0, ["odconv"])
    assert "no summary: odconv not among the summarised benchmarks" in capsys.readouterr().out
    assert readme.read_text() == MARKED_README
    assert not (tmp_path / "out" / "SUMMARY.md").exists()


def test_run_all_fails_when_the_readme_s_result_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's block shows per_sample_conv: with only branch_mix's result there, the run fails and names the
    missing file instead of emptying the block; nothing is written."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "branch_mix_cpu.json").write_text((RESULTS_DIR / "branch_mix_cpu.json").read_text())
    readme = tmp_path / "README.md"
    readme.write_text(MARKED_README)
    status, _ = run_all_without_benchmarks(
        monkeypatch, ["--only", "branch_mix", "--out-dir", str(out), "--readme", str(readme)]
    )
    assert status == 1
    assert "summary not written: No per_sample_conv result (per_sample_conv_<device>.json" in capsys.readouterr().err
    assert readme.read_text() == MARKED_README
    assert not (out / "SUMMARY.md").exists()
    # Without the README, SUMMARY.md tabulates what is there.
    status, _ = run_all_without_benchmarks(monkeypatch, ["--only", "branch_mix", "--out-dir", str(out), "--no-readme"])
    assert status == 0
    assert "### BranchMixConv" in (out / "SUMMARY.md").read_text()
