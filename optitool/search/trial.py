"""One trial: an ordinary `optitool run` of the pipeline with the trial's values, in a fresh process and
its own folder, read back into an outcome (its objectives, and whether it met the budget)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optitool.children import run_child
from optitool.search.spec import SearchSpec


@dataclass
class Outcome:
    """What a trial came to: "feasible" (its budget met, or none set), "infeasible" (budget failed) or
    "failed" (it crashed: `error` says how)."""

    status: str
    values: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    budget: list[str] = field(default_factory=list)
    seconds: float | None = None


def toml_value(value: Any) -> str:
    """A value written as `--set` reads it (a TOML literal)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def trial_command(pipeline: Path, params: dict[str, Any], folder: Path, cache: Path | None,
                  device: str) -> list[str]:
    command = [sys.executable, "-m", "optitool.cli", "run", str(pipeline), "--output", str(folder), "--overwrite",
               "--quiet", "--device", device]
    for key, value in params.items():
        command += ["--set", f"{key}={toml_value(value)}"]
    if cache is not None:
        command += ["--cache", str(cache)]
    return command


def run_trial(pipeline: Path, params: dict[str, Any], folder: Path, cache: Path | None, device: str,
              env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run one trial to the end in a fresh process; (exit code, the end of what it printed)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    log = folder.parent / f"{folder.name}.log"
    with log.open("w", encoding="utf-8") as out:
        code = run_child(trial_command(pipeline, params, folder, cache, device), stdout=out,
                         stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    return code, log.read_text(encoding="utf-8", errors="replace")[-2000:]


def latency_entry(stage: dict[str, Any], shape: str | None) -> dict[str, Any] | None:
    """The benchmark entry of a stage at `shape` (default: its first measured one) that the latency
    objective reads; for a language model the decode time per token."""
    entries = [b for b in stage.get("benchmarks", []) if "median_ms" in b and (
        shape is None or b.get("shape") == shape or str(b.get("shape", "")).startswith(f"{shape} "))]
    decode = [b for b in entries if b.get("measure") == "decode"]
    chosen = (decode or entries)[:1]
    return chosen[0] if chosen else None


def read_outcome(folder: Path, code: int, output: str, search: SearchSpec) -> Outcome:
    report_path = folder / "report.json"
    if not report_path.is_file():
        return Outcome("failed", error=_last_paragraph(output) or f"exit code {code}, no report")
    report = json.loads(report_path.read_text())
    if report.get("status") != "finished":
        return Outcome("failed", error=report.get("error") or _last_paragraph(output) or f"exit code {code}")
    stage = report["stages"][-1]
    metrics = dict(stage.get("metrics", {}))
    values: dict[str, float] = {}
    for name in search.objectives:
        if name == "latency_ms":
            entry = latency_entry(stage, search.latency_shape)
            value = entry["median_ms"] if entry else None
        elif name == "size_mb":
            value = metrics["size_bytes"] / 1e6 if "size_bytes" in metrics else None
        else:
            value = metrics.get(name)
        if not isinstance(value, int | float):
            return Outcome("failed", metrics=metrics, error=f"objective {name!r} was not measured on the final "
                           f"stage {stage['name']!r}")
        values[name] = float(value)
    budget = report.get("budget") or {}
    failed = [c["message"] for c in budget.get("checks", []) if not c["passed"]]
    status = "infeasible" if budget and not budget.get("passed", True) else "feasible"
    return Outcome(status, values=values, metrics=metrics, budget=failed)


def _last_paragraph(text: str) -> str:
    paragraphs = [p.strip() for p in text.strip().split("\n\n") if p.strip()]
    return paragraphs[-1][-800:] if paragraphs else ""
