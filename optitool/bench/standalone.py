"""`optitool bench MODEL`: benchmark a model, a stage folder or a whole run folder without a pipeline."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from optitool.artifacts import ModelArtifact
from optitool.bench.suite import BenchTarget, benchmark_targets
from optitool.data.inputs import InputSource
from optitool.data.sources import Dataset
from optitool.errors import ConfigError
from optitool.lm import is_causal_lm
from optitool.models.loaders import load_stage
from optitool.spec import BenchmarkSpec, ModelSpec


def _guess_source(path: Path) -> str:
    if (path / "report.json").is_file():
        return "run"
    if (path / "model.json").is_file():
        return "stage"
    if path.suffix == ".onnx":
        return "onnx"
    if (path / "config.json").is_file():
        return "hf"
    raise ConfigError(f"{path}: cannot tell what it is (not a run folder, stage folder, .onnx file or Hugging Face "
                      "folder); pass --source")


def run_targets(loaders: Any, run: Path, names: list[str] | None = None) -> list[BenchTarget]:
    """The stages of a run folder (all, or those named) loaded for benchmarking; a stage whose folder cannot
    be loaded is skipped with a warning when all are asked for, and refused when it was named."""
    report = json.loads((run / "report.json").read_text())
    targets = []
    for stage in report["stages"]:
        if names is not None and stage["name"] not in names:
            continue
        if stage["artifact"] is None:
            spec = ModelSpec.model_validate(stage["origin"])  # paths in an origin are absolute
            artifact = loaders[spec.source].load(spec, Path("/"))
            folder = None
        else:
            folder = run / Path(stage["artifact"]).parent
            try:
                artifact = load_stage(folder, loaders)
            except ConfigError as exc:
                if names is not None:
                    raise ConfigError(f"{run}: stage {stage['name']!r} cannot be loaded: {exc}") from None
                logging.getLogger("optitool").warning("stage %s skipped: %s", stage["name"], exc)
                continue
        record = {"name": stage["name"], "pass": stage.get("pass"), "kind": artifact.kind,
                  "metrics": stage.get("metrics", {}), "benchmarks": [], "flags": []}
        targets.append(BenchTarget(stage["name"], artifact, record, folder))
    return targets


def _targets(plugins: Any, path: Path, source: str) -> tuple[list[BenchTarget], Any]:
    loaders = plugins.registry.loader_view()
    if source == "run":
        targets = run_targets(loaders, path)
        tokenizer = next((t.artifact.tokenizer for t in targets if getattr(t.artifact, "tokenizer", None)), None)
        return targets, tokenizer
    if source not in loaders:
        raise ConfigError(f"--source {source!r} is not a known loader; known: {', '.join(sorted(loaders))}")
    spec = ModelSpec(source=source, path=str(path.resolve()))
    loaders[source].validate(spec, Path.cwd(), "MODEL")
    artifact: ModelArtifact = loaders[source].load(spec, Path.cwd())
    from optitool.models.store import stage_metrics

    record = {"name": path.name, "pass": None, "kind": artifact.kind, "metrics": stage_metrics(artifact),
              "benchmarks": [], "flags": []}
    folder = path if source == "stage" else None
    return [BenchTarget(path.name, artifact, record, folder)], getattr(artifact, "tokenizer", None)


def bench_command(plugins: Any, path: Path, *, source: str, device: str, runtimes: list[str], batch_sizes: list[int],
                  sequence_lengths: list[int], threads: int, min_iterations: int, min_seconds: float,
                  memory: bool) -> dict[str, Any]:
    from optitool.environment import describe
    from optitool.runner import resolve_device

    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    source = _guess_source(path) if source == "auto" else source
    for name in runtimes:
        if name not in plugins.registry.runtimes:
            raise ConfigError(f"--runtime {name!r} is not known; known: {', '.join(sorted(plugins.registry.runtimes))}")
    device = resolve_device(device)
    spec = BenchmarkSpec(device=device, runtimes=runtimes or ["torch_eager", "onnxruntime"], batch_sizes=batch_sizes,
                         sequence_lengths=sequence_lengths, threads=threads, min_iterations=min_iterations,
                         max_iterations=max(min_iterations, 10_000), min_seconds=min_seconds, memory=memory)
    targets, tokenizer = _targets(plugins, path, source)
    if not targets:
        raise ConfigError(f"{path}: nothing to benchmark")
    if tokenizer is None:
        raise ConfigError(f"{path}: optitool bench makes text inputs from the model's tokenizer, and this model has "
                          "none; benchmark it through a pipeline with [model.inputs] instead")
    inputs = InputSource(Dataset({}, []), tokenizer=tokenizer, max_length=max(sequence_lengths), seed=0)
    from optitool.report.console import RunConsole

    console = RunConsole(quiet=False)
    with console.step(f"benchmarking {len(targets)} stage(s) on {device}, interleaved"):
        benchmark_targets(targets, spec, plugins.registry, device, inputs, logging.getLogger("optitool.bench"),
                          progress=lambda done, total, shape: console.say(f"  timed shape {shape} ({done}/{total})"),
                          generation=is_causal_lm(targets[0].artifact))
    return {"schema_version": 1, "name": path.name, "status": "finished", "device": device,
            "environment": describe(threads or None), "benchmark": spec.model_dump(),
            "stages": [t.record for t in targets]}
