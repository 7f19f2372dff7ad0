"""Budgets: limits in `[budget]` that turn a run into pass/fail for CI. An unmeasured quantity fails
(a budget nobody could check must not pass silently)."""

from __future__ import annotations

from typing import Any

from optitool.bench.memory import peak_mb
from optitool.spec import BudgetSpec


def _stage(report: dict[str, Any], name: str) -> dict[str, Any] | None:
    stages = report.get("stages", [])
    if not stages:
        return None
    if name == "final":
        return stages[-1]
    return next((s for s in stages if s["name"] == name), None)


def _check(name: str, limit: float, measured: float | None, ok: bool | None, unit: str, detail: str = "") -> dict:
    if measured is None:
        return {"budget": name, "limit": limit, "measured": None, "passed": False,
                "message": f"{name}: not measured{detail}, so the limit {limit}{unit} cannot be shown to hold"}
    verb = "met" if ok else "FAILED"
    return {"budget": name, "limit": limit, "measured": round(measured, 6), "passed": bool(ok),
            "message": f"{name} {verb}: measured {measured:.4g}{unit}{detail}, limit {limit}{unit}"}


def _latencies(stage: dict[str, Any]) -> dict[str, float]:
    return {f"{b['runtime']} {b['shape']}": b["median_ms"] for b in stage.get("benchmarks", [])}


def check_budget(report: dict[str, Any], budget: BudgetSpec) -> dict[str, Any]:
    stage = _stage(report, budget.stage)
    base = _stage(report, "baseline") if report.get("stages") else None
    checks: list[dict[str, Any]] = []
    if stage is None:
        return {"passed": False, "stage": budget.stage,
                "checks": [{"budget": "stage", "passed": False, "message": f"no stage named {budget.stage!r}"}]}
    metrics, base_metrics = stage.get("metrics", {}), (base or {}).get("metrics", {})
    if budget.max_accuracy_drop is not None:
        acc, base_acc = metrics.get("accuracy"), base_metrics.get("accuracy")
        drop = None if acc is None or base_acc is None else base_acc - acc
        checks.append(_check("max_accuracy_drop", budget.max_accuracy_drop, drop,
                             drop is not None and drop <= budget.max_accuracy_drop, "",
                             f" (baseline {base_acc}, {stage['name']} {acc})" if drop is not None else
                             " (accuracy needs labelled eval data and a classifier)"))
    if budget.min_fidelity is not None:
        fid = metrics.get("fidelity")
        checks.append(_check("min_fidelity", budget.min_fidelity, fid, fid is not None and fid >= budget.min_fidelity,
                             ""))
    if budget.max_perplexity_increase is not None:
        ppl, base_ppl = metrics.get("perplexity"), base_metrics.get("perplexity")
        rise = None if ppl is None or not base_ppl else ppl / base_ppl - 1
        checks.append(_check("max_perplexity_increase", budget.max_perplexity_increase, rise,
                             rise is not None and rise <= budget.max_perplexity_increase, "",
                             f" (baseline {base_ppl}, {stage['name']} {ppl}; relative)" if rise is not None else
                             " (perplexity is measured for causal language models on text)"))
    for key in ("token_agreement", "generation_agreement"):
        limit = getattr(budget, f"min_{key}")
        if limit is not None:
            agreement = metrics.get(key)
            checks.append(_check(f"min_{key}", limit, agreement, agreement is not None and agreement >= limit, "",
                                 "" if agreement is not None else " (measured for causal language models on text)"))
    if budget.max_size_mb is not None:
        size = metrics.get("size_bytes")
        mb = size / 1e6 if size is not None else None
        checks.append(_check("max_size_mb", budget.max_size_mb, mb, mb is not None and mb <= budget.max_size_mb,
                             " MB"))
    if budget.min_speedup is not None:
        ratios = [b["speedup_vs_baseline"]["ratio"] for b in stage.get("benchmarks", []) if "speedup_vs_baseline" in b]
        worst = min(ratios) if ratios else None
        checks.append(_check("min_speedup", budget.min_speedup, worst,
                             worst is not None and worst >= budget.min_speedup, "x",
                             " (the slowest shape, median vs baseline)"))
    if budget.max_latency_ms is not None:
        measured = _latencies(stage)
        limits = budget.max_latency_ms if isinstance(budget.max_latency_ms, dict) else {"*": budget.max_latency_ms}
        for shape, limit in limits.items():
            found = {k: v for k, v in measured.items() if shape == "*" or k.endswith(f" {shape}")}
            worst = max(found.values()) if found else None
            label = "max_latency_ms" + ("" if shape == "*" else f"[{shape}]")
            checks.append(_check(label, limit, worst, worst is not None and worst <= limit, " ms",
                                 f" (median, {max(found, key=found.get)})" if found else ""))
    if budget.max_peak_memory_mb is not None:
        peaks = [p for p in map(peak_mb, stage.get("benchmarks", [])) if p is not None]
        peak = max(peaks) if peaks else None
        checks.append(_check("max_peak_memory_mb", budget.max_peak_memory_mb, peak,
                             peak is not None and peak <= budget.max_peak_memory_mb, " MB", " (inference peak)"))
    checks += _task_checks(stage, budget, report)
    return {"passed": all(c["passed"] for c in checks), "stage": stage["name"], "checks": checks}


def _task_checks(stage: dict[str, Any], budget: BudgetSpec, report: dict[str, Any]) -> list[dict[str, Any]]:
    """lm-eval task budgets: the drop of a task's main metric from the baseline's on the same items, and
    whether that drop is significant (its paired 95 % interval lies wholly on the worse side of 0)."""
    changes = stage.get("task_changes", {})
    checks = []

    def detail(change: dict[str, Any]) -> str:
        return (f" ({change['metric']}, stage minus baseline {change['difference']:+.4g}, paired 95 % interval "
                f"[{change['low']:+.4g}, {change['high']:+.4g}] over {change['items']} items)")

    for task, limit in (budget.max_task_drop or {}).items():
        change = changes.get(task)
        checks.append(_check(f"max_task_drop[{task}]", limit, change["drop"] if change else None,
                             change is not None and change["drop"] <= limit, "",
                             detail(change) if change else " (the task was not scored on this stage and the baseline)"))
    wanted = budget.no_significant_task_drop
    if wanted:
        scored = ((report.get("pipeline") or {}).get("evaluation") or {}).get("tasks") or list(changes)
        tasks = wanted if isinstance(wanted, list) else list(changes) or scored
        if not tasks:
            checks.append({"budget": "no_significant_task_drop", "limit": 0, "measured": None, "passed": False,
                           "message": "no_significant_task_drop: no task was scored on this stage and the baseline, "
                                      "so it cannot be shown to hold"})
        for task in tasks:
            change = changes.get(task)
            name = f"no_significant_task_drop[{task}]"
            if change is None:
                checks.append({"budget": name, "limit": 0, "measured": None, "passed": False,
                               "message": f"{name}: not measured (the task was not scored on this stage and the "
                                          "baseline), so it cannot be shown to hold"})
                continue
            worse = change["significantly_worse"]
            checks.append({"budget": name, "limit": 0, "measured": change["drop"], "passed": not worse,
                           "message": f"{name} {'FAILED' if worse else 'met'}: "
                                      f"{'significantly worse' if worse else 'not significantly worse'}{detail(change)}"})
    return checks
