"""Can a CI gate on this kind of machine see a 10 % regression? `optitool compare --remeasure`, run the way a
CI job runs it, on the README's embedded default (`examples/minilm_int8.toml`):

1. the pipeline is run once; its run folder is the base, and an exact copy of it is the "unchanged" candidate;
2. a "slow" copy gets a planted slowdown in its int8 stage: a chain of fp32 MatMuls by random orthogonal
   matrices on the graph's output, multiplied by zero and added back, so the outputs stay bit-identical
   while the work grows with batch x sequence like the model's own. The chain length is chosen so the
   planted graph is about 10 % slower than the original, timed side by side with optitool's onnxruntime
   runtime; the achieved slowdown is measured again in a long interleaved loop and written down;
3. `optitool compare --remeasure base slow` and `optitool compare --remeasure base unchanged` are each run
   N times (default 20), alternating, every one a fresh process with the CLI's defaults (threshold 5 %).
   A comparison "flags" when it exits 1.

Acceptance (issue 18): the planted slowdown flagged in >= 19 of 20, the unchanged copy in <= 1 of 20.
Run: python -m benchmarks.compare_detection [--runs 20]. Writes benchmarks/results/compare_detection.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import HERE, ROOT, WORK, machine_line

STAGE = "02-int8_quantize"
TARGET = 0.10


def plant_chain(source: Path, target: Path, links: int, seed: int = 0) -> None:
    """`source` with `links` fp32 384x384 MatMuls hanging off its output, times zero, added back."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    output = graph.output[0].name
    width = graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    for node in graph.node:
        node.output[:] = [f"{output}_unplanted" if o == output else o for o in node.output]
    rng = np.random.default_rng(seed)
    current = f"{output}_unplanted"
    for i in range(links):
        orthogonal = np.linalg.qr(rng.standard_normal((width, width)))[0].astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(orthogonal, f"planted_{i}"))
        graph.node.append(helper.make_node("MatMul", [current, f"planted_{i}"], [f"planted_out_{i}"]))
        current = f"planted_out_{i}"
    graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "planted_zero"))
    graph.node.append(helper.make_node("Mul", [current, "planted_zero"], ["planted_nothing"]))
    graph.node.append(helper.make_node("Add", [f"{output}_unplanted", "planted_nothing"], [output]))
    onnx.save(model, str(target))


def paired_slowdowns(base: Path, planted: Path, rounds: int) -> dict[str, list[float]]:
    """Per shape of the pipeline's benchmark: the planted graph's slowdown (median of per-round ratios and
    its 95 % interval), both timed by optitool's onnxruntime runtime in one interleaved loop."""
    from optitool.bench.stats import paired_ratio_interval
    from optitool.bench.timing import measure_interleaved
    from optitool.data.inputs import InputSource
    from optitool.data.sources import Dataset
    from optitool.models.loaders import load_stage
    from optitool.plugins import get_plugin_manager

    registry = get_plugin_manager().registry
    runtime = registry.runtimes["onnxruntime"].obj
    loaders = registry.loader_view()
    threads = os.cpu_count() or 1
    calls, tokenizer = {}, None
    for name, folder in (("base", base), ("planted", planted)):
        artifact = load_stage(folder, loaders)
        tokenizer = artifact.tokenizer
        calls[name] = runtime().prepare(artifact, "cpu", threads)
    inputs = InputSource(Dataset({}, []), tokenizer=tokenizer, max_length=128, seed=0)
    found = {}
    for batch in (1, 24):
        feeds = [inputs.example(batch, 128, index=i) for i in range(4)]
        samples = measure_interleaved(calls, feeds, warmup=3, min_iterations=rounds, max_iterations=rounds,
                                      min_seconds=0)
        interval = paired_ratio_interval(samples["planted"], samples["base"])
        found[f"{batch}x128"] = [interval.ratio, interval.low, interval.high]
    return found


def calibrate(run: Path, slow_stage: Path) -> tuple[int, dict[str, list[float]]]:
    """The chain length whose slowdown (mean over the two shapes) is nearest 10 %, and its measurement."""
    original = run / STAGE / "model.onnx"
    tried: dict[int, float] = {}
    links = 4
    for _ in range(6):
        plant_chain(original, slow_stage / "model.onnx", links)
        found = paired_slowdowns(run / STAGE, slow_stage, rounds=30)
        tried[links] = float(np.mean([v[0] for v in found.values()])) - 1
        print(f"calibrate: {links} links -> {tried[links]:+.1%}", flush=True)
        if abs(tried[links] - TARGET) <= 0.01:
            break
        per_link = max(tried[links], 0.005) / links
        following = max(1, round(TARGET / per_link))
        if following in tried:
            break
        links = following
    best = min(tried, key=lambda k: abs(tried[k] - TARGET))
    plant_chain(original, slow_stage / "model.onnx", best)
    return best, paired_slowdowns(run / STAGE, slow_stage, rounds=100)


def compare(base: Path, candidate: Path) -> dict[str, Any]:
    args = [sys.executable, "-m", "optitool.cli", "compare", "--remeasure", str(base), str(candidate), "--json"]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"compare failed ({done.returncode}): {done.stderr}")
    result = json.loads(done.stdout)
    latency = {r["what"].split()[-1]: r for r in result["rows"] if r["what"].startswith("latency")}
    return {"flagged": done.returncode == 1, "seconds": time.perf_counter() - start,
            "changes": {shape: r["change"] for shape, r in latency.items()},
            "intervals": {shape: r["interval"] for shape, r in latency.items()},
            "busy": sorted({b for r in latency.values() for b in r.get("busy", [])})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    work = WORK / "compare_detection"
    shutil.rmtree(work, ignore_errors=True)
    base, same, slow = work / "base", work / "unchanged", work / "slow"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "optitool.cli", "run", str(ROOT / "examples/minilm_int8.toml"), "-o",
                    str(base), "--quiet"], check=True)
    shutil.copytree(base, same)
    shutil.copytree(base, slow)
    links, planted = calibrate(base, slow / STAGE)
    print(f"planted: {links} links, {planted}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {"slow": [], "unchanged": []}
    for i in range(args.runs):
        for name, candidate in (("slow", slow), ("unchanged", same))[:: 1 if i % 2 == 0 else -1]:
            results[name].append(compare(base, candidate))
            r = results[name][-1]
            print(f"{i:2d} {name:9s} flagged={r['flagged']} {r['changes']} busy={r['busy']}", flush=True)
    write(args.runs, links, planted, results, time.perf_counter() - start)


def _row(name: str, i: int, r: dict[str, Any]) -> str:
    cells = [f"{r['changes'][s]:+.1%} [{r['intervals'][s][0]:+.1%}, {r['intervals'][s][1]:+.1%}]"
             for s in ("1x128", "24x128")]
    return (f"| {name} | {i} | {' | '.join(cells)} | {'yes' if r['flagged'] else 'no'} | {r['seconds']:.0f} | "
            f"{'; '.join(r['busy']) or 'quiet'} |")


def write(runs: int, links: int, planted: dict[str, list[float]], results: dict[str, list[dict[str, Any]]],
          seconds: float) -> None:
    flagged = {name: sum(r["flagged"] for r in rows) for name, rows in results.items()}
    busy = sum(bool(r["busy"]) for rows in results.values() for r in rows)
    verdict = ("met" if flagged["slow"] >= round(0.95 * runs) and flagged["unchanged"] <= round(0.05 * runs)
               else "NOT met")
    lines = [
        "# Does `optitool compare --remeasure` see a 10 % regression?", "",
        "`python -m benchmarks.compare_detection`: the embedded default run once; its int8 stage compared with "
        "an identical copy and with a copy carrying a planted slowdown, each comparison a fresh "
        "`optitool compare --remeasure BASE CANDIDATE` process with the CLI's defaults (threshold 5 %, at least "
        "30 rounds and 5 s per stage and shape), alternating.", "",
        machine_line(os.cpu_count() or 1), "",
        f"Planted slowdown: {links} fp32 384x384 MatMuls on the output (times zero, added back: outputs "
        "unchanged), measured with optitool's onnxruntime runtime in one interleaved loop of 100 rounds: "
        + ", ".join(f"{shape} {v[0] - 1:+.1%} [{v[1] - 1:+.1%}, {v[2] - 1:+.1%}]" for shape, v in planted.items())
        + ".", "",
        f"**Flagged: planted slowdown {flagged['slow']} of {runs}, unchanged copy {flagged['unchanged']} of "
        f"{runs}** (target: >= {round(0.95 * runs)} and <= {round(0.05 * runs)}: {verdict}). "
        f"{busy} of {2 * runs} comparisons were timed while the machine was busy. Whole script: "
        f"{seconds / 60:.1f} min.", "",
        "| candidate | comparison | 1x128 change [95 % interval] | 24x128 change [95 % interval] | flagged | "
        "seconds | machine |", "|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        lines += [_row(name, i, r) for i, r in enumerate(rows)]
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "compare_detection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8]))


if __name__ == "__main__":
    main()
