"""What a search leaves in its folder: search.json (every trial), search.md (the table a CI job shows), the
Pareto plot of the re-measured candidates, and best.toml (the chosen trial written out as a pipeline, so
`optitool run best.toml` reproduces it)."""

from __future__ import annotations

import copy
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from optitool import atomic
from optitool.search.spec import SearchSpec, set_parameter
from optitool.search.study import TrialRecord


def remeasured_latency(record: dict[str, Any], shape: str | None) -> dict[str, Any] | None:
    from optitool.search.trial import latency_entry

    entry = latency_entry(record, shape)
    if entry is None:
        return None
    speedup = entry.get("speedup_vs_baseline") or {}
    return {"median_ms": round(entry["median_ms"], 4), "mad_ms": entry.get("mad_ms"), "shape": entry.get("shape"),
            "runtime": entry.get("runtime"), "speedup": speedup.get("ratio"),
            "speedup_low": speedup.get("low"), "speedup_high": speedup.get("high"),
            "quiet": entry.get("load", {}).get("quiet")}


def choose_best(front: list[TrialRecord], remeasured: dict[int, dict[str, Any] | None],
                search: SearchSpec) -> TrialRecord | None:
    """The lowest re-measured latency among the front when latency is an objective, else the best on the
    first objective."""
    if not front:
        return None
    if "latency_ms" in search.objectives and any(remeasured.get(t.number) for t in front):
        return min((t for t in front if remeasured.get(t.number)), key=lambda t: remeasured[t.number]["median_ms"])
    name, direction = next(iter(search.objectives.items()))
    return (min if direction == "minimize" else max)(front, key=lambda t: t.values[name])


def best_pipeline(raw: dict[str, Any], params: dict[str, Any], base_dir: Path, target: Path) -> str:
    """The pipeline with the trial's values, without [search], its relative paths rewritten to hold from
    where best.toml is written."""
    import tomli_w

    out = copy.deepcopy({k: v for k, v in raw.items() if k != "search"})
    for key, value in params.items():
        set_parameter(out, key, value)

    def rebase(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: rebase(v) for k, v in node.items()}
        if isinstance(node, list):
            return [rebase(v) for v in node]
        if isinstance(node, str) and node and not node.startswith("pkg:") and not os.path.isabs(node) \
                and "/" in node and (base_dir / node).exists():
            return os.path.relpath((base_dir / node).resolve(), target.parent.resolve())
        return node

    settings = ", ".join(f"{k} = {v!r}" for k, v in params.items())
    return f"# written by `optitool search`: the chosen trial ({settings})\n" + tomli_w.dumps(rebase(out))


def write_results(folder: Path, name: str, search: SearchSpec, trials: list[TrialRecord], front: list[TrialRecord],
                  remeasured: dict[int, dict[str, Any] | None], best: TrialRecord | None, records: list[dict[str, Any]],
                  best_text: str | None, machine: str) -> dict[str, Any]:
    result = {"name": name, "search": search.model_dump(), "trials": [asdict(t) for t in trials],
              "pareto": [t.number for t in front], "best": best.number if best else None,
              "remeasured": {str(k): v for k, v in remeasured.items()}, "machine": machine,
              "counts": {s: sum(t.status == s for t in trials) for s in ("feasible", "infeasible", "failed",
                                                                            "interrupted")}}
    atomic.write_json(folder / "search.json", result)
    if best_text is not None:
        atomic.write_text(folder / "best.toml", best_text)
    elif (folder / "best.toml").exists():
        (folder / "best.toml").unlink()
    atomic.write_text(folder / "search.md", _markdown(result, search, trials, front, remeasured, best))
    if records:
        from optitool.report.plots import write_plots

        plots = write_plots({"name": f"{name}: candidates re-measured", "stages": records},
                            folder / "plots")
        result["plots"] = [str(p.relative_to(folder)) for p in plots]
        atomic.write_json(folder / "search.json", result)
    return result


def _markdown(result: dict[str, Any], search: SearchSpec, trials: list[TrialRecord], front: list[TrialRecord],
              remeasured: dict[int, dict[str, Any] | None], best: TrialRecord | None) -> str:
    names = list(search.parameters)
    objectives = list(search.objectives)
    counts = result["counts"]
    lines = [f"# optitool search: {result['name']}", "",
             f"{len(trials)} trials ({counts['feasible']} feasible, {counts['infeasible']} over budget, "
             f"{counts['failed']} failed), sampler {search.sampler}. Objectives: "
             + ", ".join(f"{k} ({v})" for k, v in search.objectives.items()) + f". {result['machine']}", ""]
    if best is not None:
        lines += [f"Chosen: trial {best.number} (best.toml).", ""]
    else:
        lines += ["No trial met the budget.", ""]
    if front:
        lines += ["## Pareto candidates, re-measured side by side (one interleaved loop with the baseline)", "",
                  "| trial | " + " | ".join(names) + " | " + " | ".join(o for o in objectives if o != "latency_ms")
                  + " | latency ms (re-measured) | speedup vs baseline | quiet |",
                  "|---" * (len(names) + len([o for o in objectives if o != "latency_ms"]) + 4) + "|"]
        for t in front:
            m = remeasured.get(t.number) or {}
            speed = (f"{m['speedup']:.2f}x [{m['speedup_low']:.2f}-{m['speedup_high']:.2f}]"
                     if m.get("speedup") else "-")
            latency = f"{_fmt(m['median_ms'])} ± {_fmt(m['mad_ms'])} ({m['shape']}, {m['runtime']})" if m else "-"
            lines.append(f"| {t.number}{' (chosen)' if best and t.number == best.number else ''} | "
                         + " | ".join(_fmt(t.params[n]) for n in names) + " | "
                         + " | ".join(_fmt(t.values[o]) for o in objectives if o != "latency_ms")
                         + f" | {latency} | {speed} | {m.get('quiet', '-')} |")
        lines.append("")
    lines += ["## Every trial (latency as measured in its own run)", "",
              "| trial | status | " + " | ".join(names) + " | " + " | ".join(objectives) + " | note |",
              "|---" * (len(names) + len(objectives) + 3) + "|"]
    for t in trials:
        note = t.error or "; ".join(t.budget) or ""
        lines.append(f"| {t.number} | {t.status} | " + " | ".join(_fmt(t.params.get(n)) for n in names) + " | "
                     + " | ".join(_fmt(t.values.get(o)) for o in objectives) + f" | {note[:160]} |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
