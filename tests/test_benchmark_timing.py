"""benchmarks/_timing.py's per-round ratios, against ratios worked out by hand. No torch needed."""

from __future__ import annotations

import pytest

from benchmarks._timing import PairedRatio, Stats


def test_paired_ratio_is_round_by_round() -> None:
    # Rounds 1-4: 2/1, 3/3, 4/8, 10/4 -> 2.0, 1.0, 0.5, 2.5. The ratio of the medians (3.5 / 3.5 = 1.0)
    # is not the median of the per-round ratios (1.5): the pairing is what this checks.
    paired = PairedRatio.of(Stats((2.0, 3.0, 4.0, 10.0), 1), Stats((1.0, 3.0, 8.0, 4.0), 1))
    assert paired.median == pytest.approx(1.5)
    assert paired.p25 == pytest.approx(0.875)  # numpy's linear interpolation between 0.5 and 1.0
    assert paired.p75 == pytest.approx(2.125)
    assert paired.rounds == 4
    assert paired.at_most_one == 2  # 1.0 counts: no slower
    assert paired.describe() == "0.875x-2.12x, <= 1.0x in 2/4"
    assert PairedRatio(**paired.as_json()) == paired


def test_paired_ratio_needs_the_same_rounds() -> None:
    with pytest.raises(ValueError, match="same rounds on both sides, got 2 and 3 samples"):
        PairedRatio.of(Stats((1.0, 2.0), 1), Stats((1.0, 2.0, 3.0), 1))
    with pytest.raises(ValueError, match="got 0 and 0"):
        PairedRatio.of(Stats((), 1), Stats((), 1))
