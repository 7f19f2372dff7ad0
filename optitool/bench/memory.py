"""Peak memory of running a stage, each measurement in a fresh Python process so none pollutes the next.

`python -m optitool.bench.memory JOB.json` loads the stage, runs it a few times and prints one JSON line.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from optitool.children import run_child


@functools.cache
def _this_process(pid: int) -> Any:
    import psutil

    return psutil.Process(pid)


def rss_mb() -> float:
    """Resident memory of this process now (psutil: Linux, macOS and Windows alike). Sampled 50 times a
    second while a pass runs, so the process handle is made once (per pid: a fork gets its own)."""
    return _this_process(os.getpid()).memory_info().rss / 2**20


def high_water_mb() -> float:
    """Peak resident memory of this process image: Linux's VmHWM, Windows' peak working set, else the
    current resident memory. Not getrusage's ru_maxrss: Linux carries the parent's high-water mark across
    fork and exec into it, so every probe reported the parent's peak."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    peak = getattr(_this_process(os.getpid()).memory_info(), "peak_wset", None)
    return peak / 2**20 if peak else rss_mb()


def peak_mb(bench_entry: dict[str, Any]) -> float | None:
    """The peak memory of one benchmark entry: GPU memory when it ran on a GPU, resident memory otherwise."""
    memory = bench_entry.get("memory")
    if not isinstance(memory, dict) or "error" in memory:
        return None
    return memory.get("peak_gpu_mb") or memory.get("peak_rss_mb")


def measure_in_subprocess(job: dict[str, Any], inputs: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """Run the probe on `job` (artifact location, runtime, device, threads) with these torch inputs."""
    import torch

    with tempfile.TemporaryDirectory(prefix="optitool-mem-") as tmp:
        torch.save({k: v.cpu() for k, v in inputs.items()}, Path(tmp) / "inputs.pt")
        job = {**job, "inputs": str(Path(tmp) / "inputs.pt")}
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with out.open("w") as stdout, err.open("w") as stderr:
            try:
                code = run_child([sys.executable, "-m", "optitool.bench.memory", str(Path(tmp) / "job.json")],
                                 timeout=timeout, grace=5, stdout=stdout, stderr=stderr)
            except subprocess.TimeoutExpired:
                return {"error": f"memory probe timed out after {timeout:.0f} s"}
        printed, complaint = out.read_text(), err.read_text()
    if code != 0:
        tail = (complaint.strip().splitlines() or ["no output"])[-1]
        return {"error": f"memory probe failed: {tail}"}
    return json.loads(printed.strip().splitlines()[-1])


def _load(job: dict[str, Any], loaders: Any) -> Any:
    from optitool.artifacts import OnnxModel
    from optitool.models.loaders import load_stage
    from optitool.spec import ModelSpec

    if job["artifact"] == "onnx":
        return OnnxModel(Path(job["path"]))
    if job["artifact"] == "stage":
        return load_stage(Path(job["path"]), loaders)
    spec = ModelSpec.model_validate(job["origin"])
    return loaders[spec.source].load(spec, Path("/"))


def probe(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from optitool.plugins import get_plugin_manager

    registry = get_plugin_manager().registry  # the same plugins as the run (blocked ones by the environment)
    runtime = registry.runtimes[job["runtime"]].obj()
    inputs = torch.load(job["inputs"], weights_only=True)
    before = rss_mb()
    cuda = job["device"] == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    artifact = _load(job, registry.loader_view())
    if job.get("new_tokens"):  # generation: the peak includes the KV cache of the whole sequence
        generate = runtime.prepare_generation(artifact, job["device"], job.get("threads", 0))
        run = lambda batch: generate(batch, job["new_tokens"])  # noqa: E731
    else:
        run = runtime.prepare(artifact, job["device"], job.get("threads", 0))
    for _ in range(job.get("iterations", 3)):
        run(inputs)
    peak = high_water_mb()
    result = {"peak_rss_mb": round(peak, 1), "model_rss_mb": round(peak - before, 1)}
    if cuda and job["runtime"].startswith("torch"):
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    elif cuda:
        result["peak_gpu_mb"] = _nvml_used_mb()
    return result


def _nvml_used_mb() -> float | None:
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if proc.pid == os.getpid() and proc.usedGpuMemory:
            return round(proc.usedGpuMemory / 2**20, 1)
    return None


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(Path(sys.argv[1]).read_text()))))
