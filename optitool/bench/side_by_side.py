"""`optitool compare --remeasure BASE_RUN NEW_RUN`: load the same stage(s) of two run folders and time them
side by side in one interleaved loop on this machine, so a CI gate compares calls made milliseconds apart
instead of two reports made at different times on a shared runner (whose drift hides 50-100 % regressions).
The reports' other measurements (size, quality) are compared as they were recorded."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optitool.errors import ConfigError

BASE, NEW = "base", "new"


def _run_report(path: Path, which: str) -> dict[str, Any]:
    from optitool.compare import read_report

    if not (path / "report.json").is_file():
        raise ConfigError(f"{which} {path}: --remeasure takes run folders (report.json and the stage folders "
                          "beside it, e.g. a downloaded run artifact), not a report file alone")
    return read_report(path)


def _chosen_stages(base: dict[str, Any], new: dict[str, Any], names: list[str]) -> list[str]:
    if not names:
        names = [new["stages"][-1]["name"]]
    for which, report in ((BASE, base), (NEW, new)):
        known = [s["name"] for s in report["stages"]]
        for name in names:
            if name not in known:
                raise ConfigError(f"--stage {name!r} is not a stage of the {which} run (its stages: "
                                  f"{', '.join(known)})")
    return names


def remeasure_runs(plugins: Any, base_run: Path, new_run: Path, *, stages: list[str], device: str,
                   min_seconds: float, min_iterations: int,
                   say: Callable[[str], None] = lambda text: None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both runs' reports reduced to the chosen stages (default: the new run's final stage), with fresh
    latency measurements from one interleaved loop (shapes and runtimes from the new run's [benchmark])."""
    from optitool.bench.standalone import run_targets
    from optitool.bench.suite import benchmark_targets
    from optitool.data.inputs import InputSource
    from optitool.data.sources import Dataset
    from optitool.lm import is_causal_lm
    from optitool.runner import resolve_device
    from optitool.spec import BenchmarkSpec

    reports = {BASE: _run_report(base_run, BASE), NEW: _run_report(new_run, NEW)}
    names = _chosen_stages(reports[BASE], reports[NEW], stages)
    settings = dict(reports[NEW]["pipeline"].get("benchmark") or {})
    device = resolve_device(device)
    spec = BenchmarkSpec.model_validate({
        **settings, "device": device, "memory": False, "stages": "all",
        "min_seconds": max(min_seconds, settings.get("min_seconds", 0)),
        "min_iterations": max(min_iterations, settings.get("min_iterations", 3)),
        "max_iterations": max(settings.get("max_iterations", 200), min_iterations)})
    loaders = plugins.registry.loader_view()
    targets = []
    for which, run in ((BASE, base_run), (NEW, new_run)):
        for target in run_targets(loaders, run, names):
            target.name = f"{which}: {target.name}"  # the loop's candidate keys must differ
            targets.append(target)
    tokenizer = next((t.artifact.tokenizer for t in targets if getattr(t.artifact, "tokenizer", None)), None)
    if tokenizer is None:
        raise ConfigError("--remeasure makes text inputs from the stages' tokenizer, and these stages have none")
    inputs = InputSource(Dataset({}, []), tokenizer=tokenizer, max_length=max(spec.sequence_lengths), seed=0)
    say(f"timing {', '.join(names)} of both runs side by side on {device}, interleaved")
    benchmark_targets(targets, spec, plugins.registry, device, inputs, logging.getLogger("optitool.compare"),
                      progress=lambda done, total, shape: say(f"  timed shape {shape} ({done}/{total})"),
                      generation=is_causal_lm(targets[0].artifact))
    fresh = {t.name: t.record for t in targets}
    reduced = {}
    for which, report in reports.items():
        kept = []
        for stage in report["stages"]:
            if stage["name"] in names:
                record = fresh[f"{which}: {stage['name']}"]
                kept.append({**copy.deepcopy(stage), "benchmarks": record.get("benchmarks", []),
                             "benchmark_skipped": record.get("benchmark_skipped", [])})
        reduced[which] = {**report, "stages": kept}
    return reduced[BASE], reduced[NEW]
