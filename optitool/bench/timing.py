"""Timing loops. Candidates measured together are interleaved one call at a time, so a machine-wide
slowdown hits all of them alike instead of whichever happened to run during it. The order rotates every
round, so no candidate always runs right after the same other one (caches, frequency, allocator state)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# Runs one inference and returns once it has finished; may return its own time in ms (CUDA events).
Runner = Callable[[Any], float | None]


def measure_interleaved(candidates: dict[str, Runner], inputs: list[Any], *, warmup: int, min_iterations: int,
                        max_iterations: int, min_seconds: float) -> dict[str, list[float]]:
    """Milliseconds per call for each candidate, at least `min_iterations` each and `min_seconds` of each's
    time in total (up to `max_iterations`). Inputs rotate so no single cached input is timed."""
    for run in candidates.values():
        for i in range(warmup):
            run(inputs[i % len(inputs)])
    samples: dict[str, list[float]] = {key: [] for key in candidates}
    spent = dict.fromkeys(candidates, 0.0)
    iteration = 0
    while True:
        done = all(len(samples[k]) >= min_iterations and spent[k] >= min_seconds for k in candidates)
        if done or iteration >= max_iterations:
            break
        feed = inputs[iteration % len(inputs)]
        keys = list(candidates)
        shift = iteration % len(keys)
        for key in keys[shift:] + keys[:shift]:
            run = candidates[key]
            start = time.perf_counter()
            own = run(feed)
            elapsed = time.perf_counter() - start
            samples[key].append(own if own is not None else elapsed * 1000.0)
            spent[key] += elapsed
        iteration += 1
    return samples
