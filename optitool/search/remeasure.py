"""Honest winners: trials ran in different processes (or on different nodes), so their latencies are not
comparable to the last percent. The Pareto candidates and the baseline are loaded again and measured side by
side, interleaved in one loop on this machine, and only those figures are reported."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from optitool.config import PipelineSpec
from optitool.registry import Registry


def final_stage_folder(trial_folder: Path) -> tuple[Path, dict[str, Any]]:
    """The folder and record of a trial's last stage."""
    report = json.loads((trial_folder / "report.json").read_text())
    stage = report["stages"][-1]
    artifact = stage.get("artifact")
    folder = trial_folder / artifact.split("/")[0] if artifact else trial_folder / "00-baseline"
    return folder, stage


def remeasure(spec: PipelineSpec, registry: Registry, trials: dict[str, Path], device: str) -> list[dict[str, Any]]:
    """Benchmark the baseline and each trial's final stage (name -> trial folder) in one interleaved loop;
    returns their records (baseline first) with fresh `benchmarks` and speedups over the baseline."""
    from optitool.bench.suite import BenchTarget, benchmark_targets
    from optitool.lm import is_causal_lm
    from optitool.models.loaders import load_stage
    from optitool.runner import load_model_and_inputs

    log = logging.getLogger("optitool.search")
    baseline, inputs = load_model_and_inputs(spec, registry)
    first = json.loads((next(iter(trials.values())) / "report.json").read_text())["stages"][0] if trials else {}
    targets = [BenchTarget("baseline", baseline, {"name": "baseline", "metrics": dict(first.get("metrics", {})),
                                                  "benchmarks": [], "flags": []}, None)]
    loaders = registry.loader_view()
    for name, trial_folder in trials.items():
        folder, stage = final_stage_folder(trial_folder)
        record = {**copy.deepcopy(stage), "name": name, "benchmarks": [], "flags": []}
        artifact = load_stage(folder, loaders) if stage.get("artifact") else baseline
        targets.append(BenchTarget(name, artifact, record, folder if stage.get("artifact") else None))
    benchmark_targets(targets, spec.benchmark, registry, device, inputs, log, generation=is_causal_lm(baseline))
    return [t.record for t in targets]
