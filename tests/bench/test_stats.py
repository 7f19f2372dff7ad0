from __future__ import annotations

import random

import pytest

from optitool.bench.stats import percentile, speedup_interval, summarize


def noisy(center: float, spread: float, n: int = 40, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(center, spread) for _ in range(n)]


def test_summary_of_known_samples():
    s = summarize([1.0, 2.0, 3.0, 4.0, 5.0], batch_size=10)
    assert s["median_ms"] == 3.0 and s["min_ms"] == 1.0 and s["max_ms"] == 5.0 and s["iterations"] == 5
    assert s["p90_ms"] == pytest.approx(4.6)
    assert s["throughput_per_s"] == pytest.approx(10 / 0.003)
    assert percentile([1.0, 3.0], 0.5) == 2.0


def test_clear_speedup_is_faster():
    iv = speedup_interval(noisy(100, 2), noisy(50, 2, seed=1))
    assert iv.verdict == "faster" and iv.low > 1.8 and iv.ratio == pytest.approx(2.0, rel=0.05)


def test_same_distribution_is_not_called_faster():
    iv = speedup_interval(noisy(100, 10), noisy(100, 10, seed=1))
    assert iv.verdict == "same" and iv.low < 1 < iv.high


def test_slower_is_flagged_and_verdicts_are_deterministic():
    a, b = noisy(100, 3), noisy(130, 3, seed=1)
    assert speedup_interval(a, b).verdict == "slower"
    assert speedup_interval(a, b) == speedup_interval(a, b)
