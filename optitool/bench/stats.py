"""Statistics for latency samples: robust summaries, and bootstrap intervals for speedups and regressions.

A latency's spread is told by the median absolute deviation (scaled to match a standard deviation under
normal noise) and the interquartile range, not by the standard deviation: one descheduling spike of
100x the median makes the standard deviation say nothing about the other 99 samples, and a CI gate
built on it could never flag anything. Spikes are counted and reported instead.

A speedup is the ratio of medians (parent / child). Its 95 % interval comes from a percentile bootstrap
that resamples both samples independently (vectorised: 2,000 resamples of 200 samples take milliseconds);
a difference is called real only when the interval excludes 1. The seed is fixed so the same samples
always give the same verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAD_TO_SIGMA = 1.4826  # MAD x this estimates the standard deviation of normal noise
SPIKE_MADS = 5.0  # a sample more than this many scaled MADs above the median is a spike


def _array(samples: list[float]) -> Any:
    import numpy as np

    return np.asarray(samples, dtype=float)


def robust_spread(samples: list[float]) -> float:
    """Scaled median absolute deviation (ms)."""
    import numpy as np

    values = _array(samples)
    if values.size < 2:
        return 0.0
    return float(MAD_TO_SIGMA * np.median(np.abs(values - np.median(values))))


def relative_spread(samples: list[float]) -> float:
    """Scaled MAD over the median: the noise of one run, as a fraction, blind to a few spikes."""
    import numpy as np

    median = float(np.median(_array(samples))) if samples else 0.0
    return robust_spread(samples) / median if median > 0 else 0.0


def spikes(samples: list[float]) -> int:
    """How many samples lie more than SPIKE_MADS scaled MADs above the median."""
    import numpy as np

    values = _array(samples)
    if values.size < 3:
        return 0
    median, spread = float(np.median(values)), robust_spread(samples)
    floor = max(spread, 0.01 * median)  # a perfectly steady run has MAD 0: count only real outliers
    return int((values > median + SPIKE_MADS * floor).sum())


def summarize(samples_ms: list[float], batch_size: int) -> dict[str, float]:
    import numpy as np

    values = np.sort(_array(samples_ms))
    median = float(np.median(values))
    q1, q3 = (float(q) for q in np.percentile(values, [25, 75]))
    return {
        "median_ms": median, "mad_ms": robust_spread(samples_ms), "iqr_ms": q3 - q1,
        "p90_ms": float(np.percentile(values, 90)), "p99_ms": float(np.percentile(values, 99)),
        "mean_ms": float(values.mean()), "std_ms": float(values.std(ddof=1)) if values.size > 1 else 0.0,
        "min_ms": float(values[0]), "max_ms": float(values[-1]), "iterations": int(values.size),
        "spikes": spikes(samples_ms),
        "throughput_per_s": batch_size / (median / 1000.0) if median > 0 else math.inf,
    }


@dataclass(frozen=True)
class RatioInterval:
    ratio: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        """'faster', 'slower' or 'same' (the interval contains 1)."""
        if self.low > 1.0:
            return "faster"
        if self.high < 1.0:
            return "slower"
        return "same"

    def as_dict(self) -> dict[str, float | str]:
        return {"ratio": self.ratio, "low": self.low, "high": self.high, "verdict": self.verdict}


def speedup_interval(parent_ms: list[float], child_ms: list[float], *, resamples: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> RatioInterval:
    """median(parent) / median(child) with a bootstrap interval; > 1 means the child is faster."""
    import numpy as np

    if not len(parent_ms) or not len(child_ms):
        raise ValueError("both samples need at least one value")
    parent, child = _array(parent_ms), _array(child_ms)
    rng = np.random.default_rng(seed)
    a = np.median(parent[rng.integers(0, parent.size, (resamples, parent.size))], axis=1)
    b = np.median(child[rng.integers(0, child.size, (resamples, child.size))], axis=1)
    ratios = a / b
    tail = (1 - confidence) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail])
    return RatioInterval(float(np.median(parent) / np.median(child)), float(low), float(high))


def paired_ratio_interval(numerator_ms: list[float], denominator_ms: list[float], *, resamples: int = 2000,
                          seed: int = 0, confidence: float = 0.95) -> RatioInterval:
    """numerator / denominator for samples taken in pairs (round i of one interleaved loop timed both within
    milliseconds): the median of the per-round ratios, with a bootstrap over rounds. A slowdown of the
    whole machine during a round scales both of its samples alike and cancels in their ratio, so this is
    far tighter than the ratio of two medians when the samples are paired."""
    import numpy as np

    if len(numerator_ms) != len(denominator_ms) or not len(numerator_ms):
        raise ValueError("paired samples need the same, nonzero number of values")
    logs = np.log(_array(numerator_ms)) - np.log(_array(denominator_ms))
    rng = np.random.default_rng(seed)
    medians = np.median(logs[rng.integers(0, logs.size, (resamples, logs.size))], axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(medians, [tail, 1 - tail])
    return RatioInterval(float(np.exp(np.median(logs))), float(np.exp(low)), float(np.exp(high)))
