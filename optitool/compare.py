"""Compare two reports stage by stage and shape by shape, separating regressions from noise. A CI gate, so
it fails closed: what it cannot compare is listed, and a file that is not an optitool report is refused.

A latency regression is reported only when ALL hold: the slowdown (median new / median base) is above the
threshold; it is above DRIFT_FACTOR times either run's robust relative spread (scaled MAD / median: the
drift a shared machine shows between separate runs, measured in benchmarks/results/bench_repeatability.md,
and blind to a few descheduling spikes, which the standard deviation is not); and its 95 % bootstrap
interval (both samples resampled) lies entirely above 1. Quality metrics regress when they drop by more
than `max_metric_drop` (absolute); artifact size and peak memory (one measurement each, so no interval)
when they grow by more than the threshold. A measurement the base has and the new report lacks is
`missing`, which fails the comparison too unless missing ones are allowed.

Two measurements taken in one interleaved loop (`optitool compare --remeasure` loads both runs' stages and
times them side by side) are compared round by round instead: the slowdown is the median of the per-round
ratios with a bootstrap interval over rounds, and the drift allowance does not apply, because there was no
time between them to drift in. That is what lets a shared CI runner see a 10 % regression.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from optitool.bench.memory import peak_mb
from optitool.bench.stats import paired_ratio_interval, relative_spread, speedup_interval, spikes
from optitool.errors import ConfigError
from optitool.report.table import markdown_table

QUALITY = ("accuracy", "fidelity", "macro_f1", "top1_agreement", "token_agreement",  # higher is better
           "generation_agreement")
KNOWN_SCHEMA_VERSIONS = (1,)
# Unchanged runs of the embedded default on this project's 2-core VM drifted by up to 3.8 times the larger
# relative MAD of the two (15 pairs of 6 back-to-back runs, benchmarks/results/bench_repeatability.md);
# a change within this many relative MADs is not called real.
DRIFT_FACTOR = 4.5


def read_report(path: Path) -> dict[str, Any]:
    """An optitool report from a file or a run folder, or a ConfigError saying why it is not one."""
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{path}: no report.json there")
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(report, dict) or "schema_version" not in report or not isinstance(report.get("stages"), list):
        raise ConfigError(f"{file} is not an optitool report (no schema_version and stages); compare takes the "
                          "report.json of `optitool run` or the -o output of `optitool bench`")
    if report["schema_version"] not in KNOWN_SCHEMA_VERSIONS:
        raise ConfigError(f"{file} has report schema version {report['schema_version']!r}; this optitool reads "
                          f"{', '.join(map(str, KNOWN_SCHEMA_VERSIONS))}: compare it with the optitool that wrote it")
    for i, stage in enumerate(report["stages"]):
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str):
            raise ConfigError(f"{file}: stages[{i}] has no name; the file is damaged or not an optitool report")
    return report


def side_by_side(ref: dict[str, Any], new: dict[str, Any]) -> bool:
    """Were the two measurements taken in one interleaved loop (`compare --remeasure`), round by round?"""
    return (ref.get("loop") is not None and ref.get("loop") == new.get("loop")
            and len(ref["samples_ms"]) == len(new["samples_ms"]))


def _latency_row(stage: str, ref: dict[str, Any], new: dict[str, Any], max_regression: float) -> dict[str, Any]:
    if side_by_side(ref, new):
        # Timed moments apart under the same load: no drift between runs to allow for, and each round's
        # ratio cancels what the machine did during that round.
        slow = paired_ratio_interval(new["samples_ms"], ref["samples_ms"])
        floor = max_regression
    else:
        # speedup_interval(new, base) = median(new) / median(base): above 1 means slower now.
        slow = speedup_interval(new["samples_ms"], ref["samples_ms"])
        floor = max(max_regression, DRIFT_FACTOR * relative_spread(ref["samples_ms"]),
                    DRIFT_FACTOR * relative_spread(new["samples_ms"]))
    change = slow.ratio - 1
    regressed = slow.low > 1.0 and change > floor
    improved = slow.high < 1.0 and -change > floor
    return {"stage": stage, "what": f"latency {new['runtime']} {new['shape']}", "base": ref["median_ms"],
            "new": new["median_ms"], "change": change, "noise_floor": floor, "interval": [slow.low - 1, slow.high - 1],
            "spikes": [spikes(ref["samples_ms"]), spikes(new["samples_ms"])], "side_by_side": side_by_side(ref, new),
            "busy": [reason for entry in (ref, new) for reason in (entry.get("load") or {}).get("reasons", [])],
            "verdict": "regression" if regressed else "improvement" if improved else "unchanged"}


def _growth_row(stage: str, what: str, old: float, new: float, limit: float) -> dict[str, Any]:
    grew = new / old - 1
    return {"stage": stage, "what": what, "base": old, "new": new, "change": grew,
            "verdict": "regression" if grew > limit else "unchanged"}


def _absent(stage: str, what: str, verdict: str, detail: str) -> dict[str, Any]:
    return {"stage": stage, "what": what, "verdict": verdict, "detail": detail}


def _compare_stage(old: dict[str, Any], stage: dict[str, Any], max_regression: float,
                   max_metric_drop: float) -> list[dict[str, Any]]:
    name, rows = stage["name"], []
    old_bench = {(b["runtime"], b["shape"]): b for b in old.get("benchmarks", []) if b.get("samples_ms")}
    new_bench = {(b["runtime"], b["shape"]): b for b in stage.get("benchmarks", []) if b.get("samples_ms")}
    for key, ref in old_bench.items():
        b = new_bench.get(key)
        if b is None:
            rows.append(_absent(name, f"latency {key[0]} {key[1]}", "missing", "measured in the base, not in the new"))
            continue
        rows.append(_latency_row(name, ref, b, max_regression))
        old_mem, new_mem = peak_mb(ref), peak_mb(b)
        if old_mem and new_mem:  # one measurement each, in a fresh process: no spread to test against
            rows.append(_growth_row(name, f"peak memory MB {key[0]} {key[1]}", old_mem, new_mem, max_regression))
    rows += [_absent(name, f"latency {k[0]} {k[1]}", "new", "not in the base") for k in new_bench if k not in old_bench]
    old_size, new_size = old.get("metrics", {}).get("size_bytes"), stage.get("metrics", {}).get("size_bytes")
    if old_size and new_size:
        rows.append(_growth_row(name, "size MB", old_size / 1e6, new_size / 1e6, max_regression))
    for key in QUALITY:
        a, b2 = old.get("metrics", {}).get(key), stage.get("metrics", {}).get(key)
        if a is None:
            continue
        if b2 is None:
            rows.append(_absent(name, key, "missing", "measured in the base, not in the new"))
            continue
        drop = a - b2
        rows.append({"stage": name, "what": key, "base": a, "new": b2, "change": -drop,
                     "verdict": "regression" if drop > max_metric_drop else "unchanged"})
    rows += _task_rows(name, old.get("tasks") or {}, stage.get("tasks") or {}, max_metric_drop)
    old_ppl, new_ppl = old.get("metrics", {}).get("perplexity"), stage.get("metrics", {}).get("perplexity")
    if old_ppl and new_ppl:  # lower is better; a relative rise beyond max_metric_drop regresses
        rows.append(_growth_row(name, "perplexity", old_ppl, new_ppl, max_metric_drop))
    elif old_ppl:
        rows.append(_absent(name, "perplexity", "missing", "measured in the base, not in the new"))
    return rows


def _task_rows(stage: str, old: dict[str, Any], new: dict[str, Any], max_metric_drop: float) -> list[dict[str, Any]]:
    """lm-eval task scores ([evaluation]): the main metric, a drop beyond max_metric_drop (absolute, whichever
    way the metric points) regresses."""
    rows = []
    for task, before in old.items():
        metric = before.get("main_metric")
        if metric is None or metric not in before.get("metrics", {}):
            continue
        after = (new.get(task) or {}).get("metrics", {}).get(metric)
        what = f"{task} {metric}"
        if after is None:
            rows.append(_absent(stage, what, "missing", "scored in the base, not in the new"))
            continue
        sign = 1 if before.get("higher_is_better", {}).get(metric, True) else -1
        change = after - before["metrics"][metric]
        rows.append({"stage": stage, "what": what, "base": before["metrics"][metric], "new": after, "change": change,
                     "verdict": "regression" if -sign * change > max_metric_drop else "unchanged"})
    return rows


def compare_reports(base: dict[str, Any], new: dict[str, Any], *, max_regression: float = 0.05,
                    max_metric_drop: float = 0.01, allow_missing: bool = False) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    base_stages = {s["name"]: s for s in base.get("stages", [])}
    new_names = {s["name"] for s in new.get("stages", [])}
    for stage in new.get("stages", []):
        old = base_stages.get(stage["name"])
        if old is None:
            rows.append(_absent(stage["name"], "stage", "new", "not in the base report"))
            continue
        rows += _compare_stage(old, stage, max_regression, max_metric_drop)
    rows += [_absent(name, "stage", "missing", "in the base report, not in the new")
             for name in base_stages if name not in new_names]
    if not any(r["stage"] in base_stages and r["stage"] in new_names for r in rows):
        raise ConfigError("the two reports have no stage in common (by name), so nothing can be compared")
    missing = sum(r["verdict"] == "missing" for r in rows)
    regressions = sum(r["verdict"] == "regression" for r in rows)
    return {"regressions": regressions, "missing": missing, "rows": rows, "max_regression": max_regression,
            "max_metric_drop": max_metric_drop, "allow_missing": allow_missing,
            "failed": bool(regressions or (missing and not allow_missing))}


def _cells(row: dict[str, Any]) -> list[str]:
    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}"

    change = row.get("change")
    interval = row.get("interval")
    return [row["stage"], row["what"], num(row.get("base")), num(row.get("new")),
            "-" if change is None else f"{change:+.1%}",
            "-" if not interval else f"{interval[0]:+.1%} … {interval[1]:+.1%}",
            "-" if "noise_floor" not in row else f"{row['noise_floor']:.1%}", row["verdict"]]


HEADER = ["stage", "measure", "base", "new", "change", "95% interval", "noise floor", "verdict"]


def render(result: dict[str, Any], *, markdown: bool) -> str:
    rows = [_cells(r) for r in result["rows"]]
    summary = (f"{result['regressions']} regression(s) beyond {result['max_regression']:.0%} latency "
               f"(and outside the noise) or {result['max_metric_drop']} quality")
    if result["missing"]:
        missing = [f"{r['stage']}: {r['what']}" for r in result["rows"] if r["verdict"] == "missing"]
        summary += (f"; {result['missing']} measurement(s) of the base missing from the new report "
                    f"({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''})"
                    + (" (allowed)" if result["allow_missing"] else ": the comparison fails; pass "
                       "--allow-missing when that is intended"))
    paired = [r for r in result["rows"] if r.get("side_by_side")]
    if paired:
        summary += (f"; {len(paired)} latency row(s) timed side by side in one interleaved loop here "
                    "(change = median of the per-round ratios)")
    busy = sorted({reason for r in result["rows"] for reason in r.get("busy", [])})
    if busy:
        summary += f"; the machine was busy while timing ({'; '.join(busy)}), so the intervals are wider"
    if markdown:
        return markdown_table(HEADER, rows) + "\n\n" + summary + "\n"
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(HEADER)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines + ["", summary])
