"""Statistics for latency samples: summaries, and bootstrap intervals for speedups and regressions.

A speedup is the ratio of medians (parent / child). Its 95 % interval comes from a percentile bootstrap
that resamples both samples independently; a difference is called real only when the interval excludes 1.
The seed is fixed so the same samples always give the same verdict.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q
    low, high = math.floor(pos), math.ceil(pos)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def summarize(samples_ms: list[float], batch_size: int) -> dict[str, float]:
    values = sorted(samples_ms)
    median = percentile(values, 0.5)
    return {
        "median_ms": median, "p90_ms": percentile(values, 0.9), "p99_ms": percentile(values, 0.99),
        "mean_ms": statistics.fmean(values), "std_ms": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min_ms": values[0], "max_ms": values[-1], "iterations": len(values),
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
    if not parent_ms or not child_ms:
        raise ValueError("both samples need at least one value")
    rng = random.Random(seed)
    point = statistics.median(parent_ms) / statistics.median(child_ms)
    ratios = []
    for _ in range(resamples):
        a = statistics.median(rng.choices(parent_ms, k=len(parent_ms)))
        b = statistics.median(rng.choices(child_ms, k=len(child_ms)))
        ratios.append(a / b)
    ratios.sort()
    tail = (1 - confidence) / 2
    return RatioInterval(point, percentile(ratios, tail), percentile(ratios, 1 - tail))
