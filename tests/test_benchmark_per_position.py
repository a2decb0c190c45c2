"""benchmarks/per_position.py: its grid (the issue's shapes), a ``--quick`` run on small cases of both families into
a temporary folder (the competitors are checked against each other by the benchmark before it times them), and its
report's verdicts on the issue's targets (the training step at most 1.0x the fastest PyTorch competitor's time,
with less peak memory than fairseq's unfold path or the naive involution)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# The benchmarks import their siblings as top-level modules (they run as scripts from benchmarks/).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _harness as harness
import per_position as bench


def test_grid_is_the_issue_s_shapes() -> None:
    sequences = [case for case in bench.CASES if isinstance(case, bench.SequenceCase)]
    dynamic = [case for case in sequences if case.layer == bench.DYNAMIC]
    assert {(case.batch, case.channels, case.heads) for case in sequences} == {(32, 512, 16)}
    assert sorted((case.length, case.kernel_size, case.causal) for case in dynamic) == sorted(
        (length, kernel_size, causal) for length in (64, 256) for kernel_size in (3, 7, 15, 31) for causal in (0, 1)
    )
    assert len(sequences) - len(dynamic) == 4
    assert [(case.kernel_size, case.padding_l) for case in dynamic[-2:]] == [(31, 15), (31, 30)]  # encoder, decoder
    stages = [(case.channels, case.size) for case in bench.CASES if isinstance(case, bench.InvolutionCase)]
    assert stages == [(64, 56), (128, 28), (256, 14), (512, 7)]
    assert len({case.name for case in bench.CASES}) == len(bench.CASES)


def test_quick_run_writes_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "QUICK_CASES", bench.QUICK_CASES[:1])  # a DynamicConv1dTBC, the main target
    assert bench.main(["--quick", "--rounds", "1", "--out", str(tmp_path)]) == 0
    family = bench.LIGHTCONV
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{family.stem}.{ext}" for ext in ("json", "md", "png")]
    payload = json.loads((tmp_path / f"{family.stem}.json").read_text())
    assert payload["benchmark"] == "per_position_lightconv"
    assert payload["metadata"]["quick"] is True
    (case,) = payload["cases"]
    assert case["family"] == family.name
    assert set(case["ratios"]) == {bench.BAND, bench.UNFOLD, bench.FASTEST}
    for mode in bench.MODES:
        assert {name: record["status"] for name, record in case["results"][mode].items()} == dict.fromkeys(
            family.competitors, "ok"
        )
        assert case["fastest"][mode] in family.torch_names
        assert bench.ratio_of(case, mode) == case["ratios"][case["fastest"][mode]][mode][bench.SUBJECT]
        for name in family.competitors:
            assert case["memory"][name][mode]["peak_bytes"] > 0
    assert set(case["results"]["train"][bench.SUBJECT]["grad_rel_errors"]) == {"input", "weight_linear.weight"}
    assert set(case["paired_ratios"]["train"]) == {bench.SUBJECT}
    markdown = (tmp_path / f"{family.stem}.md").read_text()
    assert "train / fastest (target 1x)" in markdown
    assert "## Peak memory beyond the inputs and weights" in markdown


def test_involution_competitors_agree_across_layouts() -> None:
    """jdynconv (NHWC) against the naive involution (NCHW) on the quick case: output and every gradient, as the
    benchmark checks them before timing."""
    case = bench.QUICK_CASES[-1]
    data = bench.arrays(case, seed=0)
    module = bench.involution_module(case, data, seed=0)
    memory: dict[str, dict[str, int]] = {}
    settings = harness.Settings(rounds=1, min_sample_s=0.0)
    reference, subject = bench.competitors(module, bench.INVOLUTION, data, memory, "train")
    expected, result = harness.prepare(reference, "train", None, settings, bench.CHECK)
    checked, _ = harness.prepare(subject, "train", result, settings, bench.CHECK)
    assert expected.status == "ok"
    assert checked.status == "ok", checked.note
    assert checked.grad_rel_errors is not None
    assert set(checked.grad_rel_errors) == {
        "input",
        "conv1.conv.weight",
        "conv1.bn.weight",
        "conv1.bn.bias",
        "conv2.conv.weight",
        "conv2.conv.bias",
    }
    assert memory[bench.NAIVE]["train"] > 0


def sequence_record(train: float, train_mib: float) -> dict:
    """A DynamicConv1dTBC record as the benchmark writes it: jdynconv's time over the fastest fairseq path (fwd
    0.9x) and peak memory (fwd 1 MiB against the unfold path's 2 MiB; train ``train_mib`` against 4 MiB)."""
    case = bench.sequence_case(bench.DYNAMIC, 256, 31, True)
    memory = {
        bench.SUBJECT: {"fwd": 1, "train": train_mib},
        bench.BAND: {"fwd": 8, "train": 8},
        bench.UNFOLD: {"fwd": 2, "train": 4},
    }
    return {
        "family": "lightconv",
        **{field: getattr(case, field) for field in bench.SequenceCase.__dataclass_fields__},
        "ratios": {
            bench.BAND: {"fwd": {bench.SUBJECT: 0.5}, "train": {bench.SUBJECT: 0.7}},
            bench.UNFOLD: {"fwd": {bench.SUBJECT: 0.9}, "train": {bench.SUBJECT: train}},
            bench.FASTEST: {"fwd": {bench.SUBJECT: 0.9}, "train": {bench.SUBJECT: train}},
        },
        "fastest": {"fwd": bench.UNFOLD, "train": bench.UNFOLD},
        "paired_ratios": {},
        "results": {"fwd": {}, "train": {}},
        "memory": {
            name: {mode: {"peak_bytes": size * 2**20} for mode, size in sizes.items()} for name, sizes in memory.items()
        },
    }


def test_report_marks_time_and_memory_misses() -> None:
    met, slow, large = sequence_record(0.8, 3), sequence_record(1.2, 3), sequence_record(0.8, 4)
    assert bench.misses([met]) == []
    assert bench.misses([slow]) == ["Dyn T256 K31 dec train time 1.2x"]
    assert bench.misses([large]) == ["Dyn T256 K31 dec train peak memory 1x"]
    table = bench.ratio_table([met, slow], bench.LIGHTCONV)
    # train / fastest, fwd / fastest, train / band, train memory / unfold 3/4, fwd memory / unfold 1/2
    for cell in ("0.8x ok", "1.2x MISS", "0.9x", "0.7x", "0.75x", "0.5x"):
        assert cell in table
    assert "Every target met." in bench.summary([met])
    memory = bench.memory_table([met], bench.LIGHTCONV)
    assert "| Dyn T256 K31 dec |   fwd |" in memory
    assert "0.125x" in memory  # fwd memory / band, 1/8
