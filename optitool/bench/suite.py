"""Benchmark a list of stages side by side: each runtime and shape measured with the stages interleaved,
then speedups over the parent and the baseline with bootstrap intervals, and memory in fresh processes."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optitool.artifacts import ModelArtifact, TorchModel
from optitool.bench.memory import measure_in_subprocess
from optitool.bench.stats import speedup_interval, summarize
from optitool.bench.timing import measure_interleaved
from optitool.data.inputs import InputSource
from optitool.registry import Registry

ROTATING_INPUTS = 4


@dataclass
class BenchTarget:
    """A stage to measure: its record (report.json entry) and where a fresh process can load it from."""

    name: str
    artifact: ModelArtifact
    record: dict[str, Any]
    folder: Path | None  # the saved stage, or None for the baseline (loaded from its origin)


def _memory_job(target: BenchTarget, runtime: str, device: str, threads: int) -> dict[str, Any] | None:
    job: dict[str, Any] = {"runtime": runtime, "device": device, "threads": threads}
    if target.artifact.kind == "onnx":
        return {**job, "artifact": "onnx", "path": str(target.artifact.path)}
    assert isinstance(target.artifact, TorchModel)
    if target.folder is not None and (target.folder / "model.safetensors").is_file():
        return {**job, "artifact": "stage", "path": str(target.folder)}
    if target.folder is None and target.artifact.origin and target.artifact.reloadable:
        return {**job, "artifact": "origin", "origin": target.artifact.origin}
    return None


def benchmark_targets(targets: list[BenchTarget], spec: Any, registry: Registry, device: str, inputs: InputSource,
                      log: logging.Logger) -> None:
    threads = spec.threads or os.cpu_count() or 1
    lengths: list[int | None] = list(spec.sequence_lengths) if inputs.is_text else [None]
    for runtime_name in spec.runtimes:
        runtime_cls = registry.runtimes[runtime_name].obj
        chosen = [t for t in targets if t.artifact.kind in runtime_cls.kinds]
        if not chosen:
            continue
        reason = runtime_cls().unavailable(device)
        if reason:
            for t in chosen:
                t.record.setdefault("benchmark_skipped", []).append({"runtime": runtime_name, "reason": reason})
            log.warning("runtime %s skipped on %s: %s", runtime_name, device, reason)
            continue
        for batch_size in spec.batch_sizes:
            for length in lengths:
                _measure_shape(chosen, runtime_cls, runtime_name, spec, device, threads, inputs, batch_size,
                               length, log)
    attach_speedups([t.record for t in targets])


def _measure_shape(chosen: list[BenchTarget], runtime_cls: Any, runtime_name: str, spec: Any, device: str,
                   threads: int, inputs: InputSource, batch_size: int, length: int | None,
                   log: logging.Logger) -> None:
    feeds = [inputs.example(batch_size, length, index=i) for i in range(ROTATING_INPUTS)]
    shape = f"{batch_size}x{length}" if length else f"{batch_size}"
    log.info("timing %s on %s (%s), shape %s: %s", runtime_name, device, threads, shape,
             ", ".join(t.name for t in chosen))
    runtimes = {t.name: runtime_cls() for t in chosen}
    calls = {t.name: runtimes[t.name].prepare(t.artifact, device, threads) for t in chosen}
    samples = measure_interleaved(calls, feeds, warmup=spec.warmup, min_iterations=spec.min_iterations,
                                  max_iterations=spec.max_iterations, min_seconds=spec.min_seconds)
    for t in chosen:
        entry: dict[str, Any] = {"runtime": runtime_name, "device": device, "threads": threads,
                                 "batch_size": batch_size, "sequence_length": length, "shape": shape,
                                 **{k: round(v, 4) for k, v in summarize(samples[t.name], batch_size).items()},
                                 "samples_ms": [round(s, 4) for s in samples[t.name]],
                                 "notes": runtimes[t.name].notes()}
        if spec.memory:
            job = _memory_job(t, runtime_name, device, threads)
            entry["memory"] = (measure_in_subprocess(job, feeds[0]) if job else
                               {"error": "this stage cannot be reloaded in a fresh process"})
        t.record.setdefault("benchmarks", []).append(entry)


def _match(record: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any] | None:
    same_shape = [b for b in record.get("benchmarks", []) if b["shape"] == entry["shape"]]
    same_runtime = [b for b in same_shape if b["runtime"] == entry["runtime"]]
    return (same_runtime or same_shape or [None])[0]


def _flag(entry: dict[str, Any], what: str, ratio: dict[str, Any]) -> str:
    return (f"latency {entry['shape']} on {entry['runtime']}: {what} {ratio['stage']!r} (x{ratio['ratio']:.2f}, "
            f"95% interval {ratio['low']:.2f}-{ratio['high']:.2f})")


def attach_speedups(records: list[dict[str, Any]]) -> None:
    """Speedup of each measurement over the same shape in the parent (previous) stage and the baseline
    (first), with a bootstrap interval; flag a stage that is not significantly faster than its parent."""
    if not records:
        return
    baseline = records[0]
    for i, record in enumerate(records):
        record["flags"] = [f for f in record.get("flags", []) if not f.startswith("latency")]
        for entry in record.get("benchmarks", []):
            for key, other in (("speedup_vs_parent", records[i - 1] if i else None),
                               ("speedup_vs_baseline", baseline if i else None)):
                ref = _match(other, entry) if other else None
                if ref is None:
                    entry.pop(key, None)
                    continue
                interval = speedup_interval(ref["samples_ms"], entry["samples_ms"])
                entry[key] = {**interval.as_dict(), "stage": other["name"], "runtime": ref["runtime"]}
            parent, base = entry.get("speedup_vs_parent"), entry.get("speedup_vs_baseline")
            if parent and parent["verdict"] != "faster":
                word = "slower than" if parent["verdict"] == "slower" else "not significantly faster than"
                record["flags"].append(_flag(entry, f"{word} its parent", parent))
            if base and base["verdict"] == "slower" and base["stage"] != (parent or {}).get("stage"):
                # Faster than its parent can still be slower than where the pipeline started
                # (e.g. int8 ONNX at batch 1 against torch eager): the case users are bitten by.
                record["flags"].append(_flag(entry, "slower than the baseline", base))
