"""Is a stage worse than its baseline on the same items, or only different by chance?

Both are scored on the same items, so the question is about the per-item differences: their mean, with a
percentile bootstrap interval over items (seeded: the same scores always give the same verdict). Pairing
removes what the items themselves contribute (an easy item is easy for both models): a 2-point drop on
200 items is often significant paired and never unpaired, where each score's standard error is 3 points.
For 0/1 scores the exact McNemar test over the discordant items is given too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedChange:
    """stage minus baseline, averaged over the items both were scored on."""

    items: int
    difference: float
    low: float
    high: float
    mcnemar_p: float | None  # exact two-sided p for 0/1 scores; None otherwise

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, Any]:
        out = {"items": self.items, "difference": round(self.difference, 6), "low": round(self.low, 6),
               "high": round(self.high, 6), "significant": self.excludes_zero()}
        if self.mcnemar_p is not None:
            out["mcnemar_p"] = round(self.mcnemar_p, 6)
        return out


def mcnemar_exact(better: int, worse: int) -> float:
    """Two-sided exact p-value that `better` and `worse` discordant items came from a fair coin."""
    n = better + worse
    if n == 0:
        return 1.0
    k = min(better, worse)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_change(baseline: list[float], stage: list[float], *, seed: int = 0, resamples: int = RESAMPLES,
                  confidence: float = CONFIDENCE) -> PairedChange:
    """Mean of stage - baseline over paired items, with its bootstrap interval."""
    import numpy as np

    if len(baseline) != len(stage) or not baseline:
        raise ValueError(f"paired scores need the same items on both sides ({len(baseline)} and {len(stage)})")
    a, b = np.asarray(baseline, dtype=float), np.asarray(stage, dtype=float)
    diff = b - a
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, diff.size, size=(resamples, diff.size))
    means = diff[picks].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    binary = bool(np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all())
    p = mcnemar_exact(int(((b == 1) & (a == 0)).sum()), int(((b == 0) & (a == 1)).sum())) if binary else None
    return PairedChange(int(diff.size), float(diff.mean()), float(low), float(high), p)
