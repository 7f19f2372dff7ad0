"""Benchmark a list of stages side by side: for each shape, every stage on every runtime that takes it is
timed in ONE interleaved loop (torch eager and onnxruntime alike), so every ratio optitool reports
compares calls made seconds apart under the same machine load; then speedups over the parent and the
baseline with bootstrap intervals, the machine's load during the loop, and memory in fresh processes."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optitool.artifacts import ModelArtifact, TorchModel
from optitool.bench.load import LoadMonitor
from optitool.bench.memory import measure_in_subprocess
from optitool.bench.stats import speedup_interval, summarize
from optitool.bench.timing import measure_interleaved
from optitool.data.inputs import InputSource
from optitool.registry import Registry
from optitool.spec import BenchmarkSpec

ROTATING_INPUTS = 4
# Called after each shape is measured: (shapes done, shapes in all, the shape just measured).
ShapeProgress = Callable[[int, int, str], None]


@dataclass
class BenchTarget:
    """A stage to measure: its record (report.json entry) and where a fresh process can load it from."""

    name: str
    artifact: ModelArtifact
    record: dict[str, Any]
    folder: Path | None  # the saved stage, or None for the baseline (loaded from its origin)


@dataclass
class Candidate:
    """One stage on one runtime: a participant of the interleaved loop."""

    target: BenchTarget
    runtime_name: str
    runtime_cls: Any

    @property
    def key(self) -> str:
        return f"{self.target.name} @ {self.runtime_name}"


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


def candidates_for(targets: list[BenchTarget], spec: BenchmarkSpec, registry: Registry, device: str,
                   log: logging.Logger) -> list[Candidate]:
    """Every (stage, runtime) pair that can run here; a runtime that cannot is recorded on its stages."""
    chosen = []
    for runtime_name in spec.runtimes:
        runtime_cls = registry.runtimes[runtime_name].obj
        takers = [t for t in targets if t.artifact.kind in runtime_cls.kinds]
        if not takers:
            continue
        reason = runtime_cls().unavailable(device)
        if reason:
            for t in takers:
                t.record.setdefault("benchmark_skipped", []).append({"runtime": runtime_name, "reason": reason})
            log.warning("runtime %s skipped on %s: %s", runtime_name, device, reason)
            continue
        chosen += [Candidate(t, runtime_name, runtime_cls) for t in takers]
    return chosen


def benchmark_targets(targets: list[BenchTarget], spec: BenchmarkSpec, registry: Registry, device: str,
                      inputs: InputSource, log: logging.Logger, progress: ShapeProgress | None = None,
                      generation: bool = False) -> None:
    """Time every target. With `generation` (causal language models) what is timed is greedy generation
    after prompts of each sequence length: the time to the first token and the time per further token."""
    threads = spec.threads or os.cpu_count() or 1
    lengths: list[int | None] = list(spec.sequence_lengths) if inputs.is_text else [None]
    chosen = candidates_for(targets, spec, registry, device, log)
    shapes = [(b, n) for b in spec.batch_sizes for n in lengths]
    if chosen:
        measure = _measure_generation if generation else _measure_shape
        for done, (batch_size, length) in enumerate(shapes, start=1):
            shape = measure(chosen, spec, device, threads, inputs, batch_size, length, log)
            if progress is not None:
                progress(done, len(shapes), shape)
    attach_speedups([t.record for t in targets])


def _entry(c: Candidate, shape: str, samples: list[float], per: int, extra: dict[str, Any]) -> dict[str, Any]:
    """One measurement of report.json: its samples, robust summary and where they came from."""
    return {"runtime": c.runtime_name, "shape": shape,
            **{k: round(v, 4) for k, v in summarize(samples, per).items()},
            "samples_ms": [round(s, 4) for s in samples], **extra}


def _measure_generation(chosen: list[Candidate], spec: BenchmarkSpec, device: str, threads: int,
                        inputs: InputSource, batch_size: int, length: int | None, log: logging.Logger) -> str:
    """Every (stage, runtime) generating after the same prompts, one generation at a time, rotating: two
    measurements per candidate, `<b>x<L> ttft` (prefill to the first token) and `<b>x<L> decode` (each
    further token; its throughput is tokens per second)."""
    import torch

    from optitool.lm import token_blocks

    assert length is not None
    blocks = token_blocks(inputs, "eval", length, seed=inputs.seed, shapes_only=True)
    rows = torch.cat([b.inputs["input_ids"] for b in blocks])  # real text, unpadded, `length` tokens each
    feeds = []
    for i in range(ROTATING_INPUTS):
        ids = torch.stack([rows[(i * batch_size + j) % len(rows)] for j in range(batch_size)])
        feeds.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    shape = f"{batch_size}x{length}"
    runnable = []
    runtimes = {c.key: c.runtime_cls() for c in chosen}
    generators = {}
    for c in chosen:
        generate = runtimes[c.key].prepare_generation(c.target.artifact, device, threads)
        if generate is None:
            c.target.record.setdefault("benchmark_skipped", []).append(
                {"runtime": c.runtime_name, "reason": f"{c.runtime_name} cannot generate with this model"})
            continue
        generators[c.key] = generate
        runnable.append(c)
    ttft: dict[str, list[float]] = {c.key: [] for c in runnable}
    decode: dict[str, list[float]] = {c.key: [] for c in runnable}

    def timed(key: str) -> Any:
        def call(prompt: dict[str, Any]) -> float:
            first, per_token = generators[key](prompt, spec.new_tokens)
            ttft[key].append(first)
            decode[key].append(per_token)
            return first + per_token * (spec.new_tokens - 1)

        return call

    log.info("timing generation %s (+%d tokens) on %s (%s threads), interleaved: %s", shape, spec.new_tokens,
             device, threads, ", ".join(c.key for c in runnable))
    with LoadMonitor() as monitor:
        measure_interleaved({c.key: timed(c.key) for c in runnable}, feeds, warmup=spec.warmup,
                            min_iterations=spec.min_iterations, max_iterations=spec.max_iterations,
                            min_seconds=spec.min_seconds)
    load = monitor.reading.as_dict() if monitor.reading else {}
    loop = f"{shape}#{uuid.uuid4().hex[:8]}"
    for c in runnable:
        common = {"device": device, "threads": threads, "batch_size": batch_size, "sequence_length": length,
                  "new_tokens": spec.new_tokens, "interleaved_with": sorted(k for k in generators if k != c.key),
                  "loop": loop, "load": load, "notes": runtimes[c.key].notes()}
        warm = spec.warmup  # the warm-up generations were recorded too
        decode_entry = _entry(c, f"{shape} decode", decode[c.key][warm:], batch_size, {**common, "measure": "decode"})
        if spec.memory:  # peak of a whole generation in a fresh process: weights, activations and KV cache
            job = _memory_job(c.target, c.runtime_name, device, threads)
            decode_entry["memory"] = (measure_in_subprocess({**job, "new_tokens": spec.new_tokens, "iterations": 1},
                                                            feeds[0]) if job else
                                      {"error": "this stage cannot be reloaded in a fresh process"})
        c.target.record.setdefault("benchmarks", []).extend([
            _entry(c, f"{shape} ttft", ttft[c.key][warm:], batch_size, {**common, "measure": "ttft"}), decode_entry])
    _log_busy(load, shape, log)
    return shape


def _measure_shape(chosen: list[Candidate], spec: BenchmarkSpec, device: str, threads: int, inputs: InputSource,
                   batch_size: int, length: int | None, log: logging.Logger) -> str:
    feeds = [inputs.example(batch_size, length, index=i) for i in range(ROTATING_INPUTS)]
    shape = f"{batch_size}x{length}" if length else f"{batch_size}"
    log.info("timing shape %s on %s (%s threads), interleaved: %s", shape, device, threads,
             ", ".join(c.key for c in chosen))
    runtimes = {c.key: c.runtime_cls() for c in chosen}
    calls = {c.key: runtimes[c.key].prepare(c.target.artifact, device, threads) for c in chosen}
    with LoadMonitor() as monitor:
        samples = measure_interleaved(calls, feeds, warmup=spec.warmup, min_iterations=spec.min_iterations,
                                      max_iterations=spec.max_iterations, min_seconds=spec.min_seconds)
    load = monitor.reading.as_dict() if monitor.reading else {}
    loop = f"{shape}#{uuid.uuid4().hex[:8]}"  # the loop these samples came from: ratios only within one
    for c in chosen:
        entry = _entry(c, shape, samples[c.key], batch_size, {
            "device": device, "threads": threads, "batch_size": batch_size, "sequence_length": length,
            "interleaved_with": sorted(k for k in calls if k != c.key), "loop": loop, "load": load,
            "notes": runtimes[c.key].notes()})
        if spec.memory:
            job = _memory_job(c.target, c.runtime_name, device, threads)
            entry["memory"] = (measure_in_subprocess(job, feeds[0]) if job else
                               {"error": "this stage cannot be reloaded in a fresh process"})
        c.target.record.setdefault("benchmarks", []).append(entry)
    _log_busy(load, shape, log)
    return shape


def _log_busy(load: dict[str, Any], shape: str, log: logging.Logger) -> None:
    if load and not load["quiet"]:
        log.warning("shape %s was timed on a busy machine: %s", shape, "; ".join(load["reasons"]))


def _match(record: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any] | None:
    """The entry of `record` to compare `entry` with: same shape, measured in the same loop when there is
    one (so the ratio is interleaved), the same runtime preferred."""
    same_shape = [b for b in record.get("benchmarks", []) if b["shape"] == entry["shape"]]
    same_loop = [b for b in same_shape if b.get("loop") is not None and b.get("loop") == entry.get("loop")]
    pool = same_loop or same_shape
    same_runtime = [b for b in pool if b["runtime"] == entry["runtime"]]
    return (same_runtime or pool or [None])[0]


def _flag(entry: dict[str, Any], what: str, ratio: dict[str, Any]) -> str:
    return (f"latency {entry['shape']} on {entry['runtime']}: {what} {ratio['stage']!r} (x{ratio['ratio']:.2f}, "
            f"95% interval {ratio['low']:.2f}-{ratio['high']:.2f})")


def busy_flag(entry: dict[str, Any]) -> str | None:
    load = entry.get("load") or {}
    if load.get("quiet", True):
        return None
    return f"busy machine while timing {entry['shape']}: {'; '.join(load.get('reasons', []))}"


def attach_speedups(records: list[dict[str, Any]]) -> None:
    """Speedup of each measurement over the same shape in the parent (previous) stage and the baseline
    (first), with a bootstrap interval; flag a stage that is not significantly faster than its parent,
    and measurements taken while the machine was busy."""
    if not records:
        return
    baseline = records[0]
    for i, record in enumerate(records):
        record["flags"] = [f for f in record.get("flags", []) if not f.startswith(("latency", "busy machine"))]
        for entry in record.get("benchmarks", []):
            busy = busy_flag(entry)
            if busy and busy not in record["flags"]:
                record["flags"].append(busy)
            for key, other in (("speedup_vs_parent", records[i - 1] if i else None),
                               ("speedup_vs_baseline", baseline if i else None)):
                ref = _match(other, entry) if other else None
                if ref is None:
                    entry.pop(key, None)
                    continue
                interval = speedup_interval(ref["samples_ms"], entry["samples_ms"])
                interleaved = ref.get("loop") is not None and ref.get("loop") == entry.get("loop")
                entry[key] = {**interval.as_dict(), "stage": other["name"], "runtime": ref["runtime"],
                              "interleaved": interleaved}
            parent, base = entry.get("speedup_vs_parent"), entry.get("speedup_vs_baseline")
            if parent and parent["verdict"] != "faster":
                word = "slower than" if parent["verdict"] == "slower" else "not significantly faster than"
                record["flags"].append(_flag(entry, f"{word} its parent", parent))
            if base and base["verdict"] == "slower" and base["stage"] != (parent or {}).get("stage"):
                # Faster than its parent can still be slower than where the pipeline started
                # (e.g. int8 ONNX at batch 1 against torch eager): the case users are bitten by.
                record["flags"].append(_flag(entry, "slower than the baseline", base))
