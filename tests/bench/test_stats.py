from __future__ import annotations

import random

import pytest

from optitool.bench.stats import relative_spread, speedup_interval, spikes, summarize


def noisy(center: float, spread: float, n: int = 40, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(center, spread) for _ in range(n)]


def test_summary_of_known_samples():
    s = summarize([1.0, 2.0, 3.0, 4.0, 5.0], batch_size=10)
    assert s["median_ms"] == 3.0 and s["min_ms"] == 1.0 and s["max_ms"] == 5.0 and s["iterations"] == 5
    assert s["p90_ms"] == pytest.approx(4.6)
    assert s["throughput_per_s"] == pytest.approx(10 / 0.003)
    assert s["mad_ms"] == pytest.approx(1.4826) and s["iqr_ms"] == 2.0 and s["spikes"] == 0


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


def test_spikes_do_not_inflate_the_robust_spread():
    steady = noisy(0.08, 0.002, n=200)
    spiky = steady[:-4] + [16.0, 20.0, 32.0, 25.0]  # four descheduling spikes of 200-400x the median
    assert relative_spread(spiky) == pytest.approx(relative_spread(steady), rel=0.1)
    assert relative_spread(spiky) < 0.05
    assert spikes(spiky) == 4 and spikes(steady) == 0
    assert summarize(spiky, 1)["std_ms"] > 50 * summarize(steady, 1)["std_ms"]  # what std would have said


def test_the_bootstrap_handles_many_samples():
    """10,000 samples a side (pure Python took 15 s per interval here; the numpy version 1.5 s, measured
    outside the tests: timing is not a test's business)."""
    a, b = noisy(100, 5, n=10_000), noisy(90, 5, n=10_000, seed=1)
    interval = speedup_interval(a, b, resamples=200)
    assert interval.verdict == "faster" and interval.low < 100 / 90 < interval.high
