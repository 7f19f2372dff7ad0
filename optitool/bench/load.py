"""Was the machine quiet while we timed? Timings taken while other processes take the cores look precise
and are not (on 2 shared cores, torch can run 25x slower), so every measurement records the load and is
flagged when it was not quiet, as pyperf warns about unstable benchmarks.

What is recorded over the timed interval: the CPU time of this process and of the whole machine (from
psutil's system-wide counters), hence the cores other processes used; CPU steal where the kernel reports
it (a virtual machine whose host is busy); the 1-minute load average.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

BUSY_SHARE = 0.25  # other processes using more than this share of the cores: not quiet
STEAL_SHARE = 0.05  # more than this share of CPU time stolen by the hypervisor: not quiet


@dataclass
class LoadReading:
    wall_s: float
    cpu_count: int
    own_cores: float  # cores this process kept busy on average
    other_cores: float  # cores every other process kept busy on average
    steal_share: float | None  # share of all CPU time the hypervisor took; None where not reported
    load_average: float | None
    reasons: list[str] = field(default_factory=list)

    @property
    def quiet(self) -> bool:
        return not self.reasons

    def as_dict(self) -> dict[str, Any]:
        return {"quiet": self.quiet, "wall_s": round(self.wall_s, 3), "cpu_count": self.cpu_count,
                "own_cores": round(self.own_cores, 2), "other_cores": round(self.other_cores, 2),
                "steal_share": None if self.steal_share is None else round(self.steal_share, 3),
                "load_average_1m": None if self.load_average is None else round(self.load_average, 2),
                "reasons": self.reasons}


def classify(reading: LoadReading) -> LoadReading:
    """Fill in why a reading was not quiet (nothing when it was)."""
    reasons = []
    if reading.other_cores > BUSY_SHARE * reading.cpu_count:
        reasons.append(f"other processes kept {reading.other_cores:.1f} of {reading.cpu_count} cores busy")
    if reading.steal_share is not None and reading.steal_share > STEAL_SHARE:
        reasons.append(f"the hypervisor took {reading.steal_share:.0%} of the CPU time (steal)")
    reading.reasons = reasons
    return reading


def busy_and_steal(times: Any) -> tuple[float, float]:
    """Busy CPU seconds (all cores, every state but idle, iowait and steal) and stolen seconds."""
    total = sum(times)
    idle = times.idle + getattr(times, "iowait", 0.0)
    steal = getattr(times, "steal", 0.0)
    return total - idle - steal, steal


class LoadMonitor:
    """`with LoadMonitor() as load: <time things>`; then `load.reading`."""

    def __init__(self) -> None:
        self.reading: LoadReading | None = None

    def __enter__(self) -> LoadMonitor:
        import psutil

        self._process = psutil.Process()
        self._own = sum(self._process.cpu_times()[:2])
        self._system = psutil.cpu_times()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        import psutil

        wall = max(time.perf_counter() - self._start, 1e-9)
        own = sum(self._process.cpu_times()[:2]) - self._own
        system = psutil.cpu_times()
        busy_now, steal_now = busy_and_steal(system)
        busy_then, steal_then = busy_and_steal(self._system)
        cores = psutil.cpu_count() or 1
        has_steal = hasattr(system, "steal")
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # Windows
            load = None
        self.reading = classify(LoadReading(
            wall_s=wall, cpu_count=cores, own_cores=own / wall,
            other_cores=max(0.0, (busy_now - busy_then - own) / wall),
            steal_share=(steal_now - steal_then) / (wall * cores) if has_steal else None, load_average=load))
