from __future__ import annotations

import pytest

from optitool.paired import mcnemar_exact, paired_change


def test_identical_scores_change_by_exactly_nothing():
    change = paired_change([1, 0, 1, 1, 0] * 4, [1, 0, 1, 1, 0] * 4)
    assert (change.difference, change.low, change.high) == (0, 0, 0) and not change.excludes_zero()
    assert change.mcnemar_p == 1.0


def test_pairing_sees_a_drop_that_two_separate_errors_hide():
    """40 items; the stage loses 6 the baseline had and gains none: 15 points down. Unpaired, each accuracy's
    standard error is about 8 points, so their intervals overlap; paired, every resample is a drop."""
    baseline = [1] * 30 + [0] * 10
    stage = [0] * 6 + [1] * 24 + [0] * 10
    change = paired_change(baseline, stage, seed=3)
    assert change.difference == pytest.approx(-0.15) and change.high < 0 and change.excludes_zero()
    assert change.mcnemar_p == pytest.approx(2 / 64)  # 6 discordant items, all one way: 2 * 0.5**6
    assert change.as_dict()["significant"] is True


def test_the_same_scores_give_the_same_interval_and_a_seed_changes_only_the_resamples():
    baseline, stage = [0.2, 0.5, 0.9, 0.4] * 10, [0.1, 0.6, 0.7, 0.4] * 10
    first, again = paired_change(baseline, stage, seed=1), paired_change(baseline, stage, seed=1)
    assert first == again and first.mcnemar_p is None  # scores that are not 0/1
    assert first.low <= first.difference <= first.high


def test_mcnemar_exact_values():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="same items"):
        paired_change([1, 0], [1])
