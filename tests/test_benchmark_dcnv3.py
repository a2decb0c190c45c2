"""benchmarks/dcnv3.py's report without running it: the verdicts on the issue's targets (the training step at
most 0.5x DCNv3_pytorch's time, with lower peak memory) and the tables. The competitors themselves are
checked against each other by the benchmark before it times them (output and every gradient)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

# The benchmarks import their siblings as top-level modules (they run as scripts from benchmarks/).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import dcnv3 as bench

STAGE = bench.case(8, 64, 4, 56)


def case_record(train: float, train_mib: float) -> dict:
    """A record as the benchmark writes it: jdynconv's time ratios (fwd 0.9x) and peak memory (fwd 1 MiB against
    DCNv3_pytorch's 2 MiB; train ``train_mib`` against 4 MiB)."""
    memory = {bench.SUBJECT: {"fwd": 1, "train": train_mib}, bench.REFERENCE: {"fwd": 2, "train": 4}}
    return {
        **dataclasses.asdict(STAGE),
        "ratios": {"fwd": {bench.SUBJECT: 0.9}, "train": {bench.SUBJECT: train}},
        "paired_ratios": {},
        "results": {"fwd": {}, "train": {}},
        "memory": {
            name: {mode: {"peak_bytes": size * 2**20} for mode, size in sizes.items()} for name, sizes in memory.items()
        },
    }


def test_stage_shapes_are_internimage_t_at_224() -> None:
    stages = [(64, 4, 56), (128, 8, 28), (256, 16, 14), (512, 32, 7)]
    assert [(c.channels, c.groups, c.size) for c in bench.CASES] == stages


def test_report_marks_time_and_memory_misses() -> None:
    met, slow, large = case_record(0.4, 3), case_record(0.6, 3), case_record(0.4, 4)
    assert bench.misses([met]) == []
    assert bench.misses([slow]) == ["B8 C64 G4 56x56 train time 0.6x"]
    assert bench.misses([large]) == ["B8 C64 G4 56x56 train peak memory 1x"]
    table = bench.ratio_table([met, slow])
    for cell in ("0.4x ok", "0.6x MISS", "0.9x", "0.75x", "0.5x"):  # train, fwd, train memory 3/4, fwd memory 1/2
        assert cell in table
    assert "Every target met." in bench.summary([met])
    assert "| B8 C64 G4 56x56 |   fwd |" in bench.memory_table([met])
