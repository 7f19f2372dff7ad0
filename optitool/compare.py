"""Compare two reports stage by stage and shape by shape, separating regressions from noise.

A latency regression is reported only when BOTH hold: the slowdown (median new / median base) is above
the threshold and above twice either run's relative standard deviation (the drift a shared machine shows
between runs), and its 95 % percentile-bootstrap interval (both samples resampled) lies entirely above 1, so the
difference is larger than the noise the two samples show. Quality metrics regress when they drop
by more than `max_metric_drop` (absolute); artifact size and peak memory (one measurement each, so no
interval) when they grow by more than the threshold.
"""

from __future__ import annotations

import statistics
from typing import Any

from optitool.bench.memory import peak_mb
from optitool.bench.stats import speedup_interval
from optitool.report.table import markdown_table

QUALITY = ("accuracy", "fidelity", "macro_f1", "top1_agreement")
DRIFT_FACTOR = 2.0


def compare_reports(base: dict[str, Any], new: dict[str, Any], *, max_regression: float = 0.05,
                    max_metric_drop: float = 0.01) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    base_stages = {s["name"]: s for s in base.get("stages", [])}
    for stage in new.get("stages", []):
        old = base_stages.get(stage["name"])
        if old is None:
            rows.append({"stage": stage["name"], "what": "stage", "verdict": "new", "detail": "not in the base report"})
            continue
        old_bench = {(b["runtime"], b["shape"]): b for b in old.get("benchmarks", [])}
        for b in stage.get("benchmarks", []):
            ref = old_bench.get((b["runtime"], b["shape"]))
            if ref is None or not ref.get("samples_ms") or not b.get("samples_ms"):
                continue
            # speedup_interval(new, base) = median(new) / median(base): above 1 means slower now.
            slow = speedup_interval(b["samples_ms"], ref["samples_ms"])
            change = slow.ratio - 1
            # The bootstrap interval sees only the noise within each run; a shared machine also drifts
            # between runs. Back-to-back identical runs here differed by 1.75x one run's relative standard
            # deviation (benchmarks/results/bench_repeatability.md), so a change has to exceed twice either
            # run's relative standard deviation too, whatever the interval says.
            floor = max(max_regression, DRIFT_FACTOR * _relative_spread(ref["samples_ms"]),
                        DRIFT_FACTOR * _relative_spread(b["samples_ms"]))
            regressed = slow.low > 1.0 and change > floor
            improved = slow.high < 1.0 and -change > floor
            rows.append({"stage": stage["name"], "what": f"latency {b['runtime']} {b['shape']}",
                         "base": ref["median_ms"], "new": b["median_ms"], "change": change, "noise_floor": floor,
                         "interval": [slow.low - 1, slow.high - 1],
                         "verdict": "regression" if regressed else "improvement" if improved else "unchanged"})
            old_mem, new_mem = peak_mb(ref), peak_mb(b)
            if old_mem and new_mem:  # one measurement each, in a fresh process: no spread to test against
                grew = new_mem / old_mem - 1
                rows.append({"stage": stage["name"], "what": f"peak memory MB {b['runtime']} {b['shape']}",
                             "base": old_mem, "new": new_mem, "change": grew,
                             "verdict": "regression" if grew > max_regression else "unchanged"})
        old_size, new_size = old.get("metrics", {}).get("size_bytes"), stage.get("metrics", {}).get("size_bytes")
        if old_size and new_size:
            grew = new_size / old_size - 1
            rows.append({"stage": stage["name"], "what": "size MB", "base": old_size / 1e6, "new": new_size / 1e6,
                         "change": grew, "verdict": "regression" if grew > max_regression else "unchanged"})
        for key in QUALITY:
            a, b2 = old.get("metrics", {}).get(key), stage.get("metrics", {}).get(key)
            if a is None or b2 is None:
                continue
            drop = a - b2
            rows.append({"stage": stage["name"], "what": key, "base": a, "new": b2, "change": -drop,
                         "verdict": "regression" if drop > max_metric_drop else "unchanged"})
    return {"regressions": sum(r["verdict"] == "regression" for r in rows), "rows": rows,
            "max_regression": max_regression, "max_metric_drop": max_metric_drop}


def _relative_spread(samples: list[float]) -> float:
    return statistics.stdev(samples) / statistics.median(samples) if len(samples) > 1 else 0.0


def _cells(row: dict[str, Any]) -> list[str]:
    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}"

    change = row.get("change")
    interval = row.get("interval")
    return [row["stage"], row["what"], num(row.get("base")), num(row.get("new")),
            "-" if change is None else f"{change:+.1%}",
            "-" if not interval else f"{interval[0]:+.1%} … {interval[1]:+.1%}", row["verdict"]]


HEADER = ["stage", "measure", "base", "new", "change", "95% interval", "verdict"]


def render(result: dict[str, Any], *, markdown: bool) -> str:
    rows = [_cells(r) for r in result["rows"]]
    summary = (f"{result['regressions']} regression(s) beyond {result['max_regression']:.0%} latency "
               f"(and outside the noise) or {result['max_metric_drop']} quality")
    if markdown:
        return markdown_table(HEADER, rows) + "\n\n" + summary + "\n"
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(HEADER)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines + ["", summary])
