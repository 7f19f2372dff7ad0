"""Where SmolLM2's decode time goes in onnxruntime: per operator, per token, for optitool's 4-bit models and
onnxruntime-genai's int4 graph.

Each graph decodes the same 128-token prompt for 64 greedy tokens through optitool's loop (2 threads) with
onnxruntime's profiler on; the prefill run is left out and every node's kernel time in the decode runs is summed
by operator (MatMulNBits split into the LM head, read once per token, and the blocks' projections), then divided
by the decoded tokens. The graphs are the ones `python -m benchmarks.smollm2_cpu --base finetuned|gguf` made (run
it first). Run: python -m benchmarks.smollm2_profile [--base finetuned|gguf] [--rounds 3]. Writes
benchmarks/results/smollm2_profile.md (fine-tuned) or smollm2_profile_gguf.md.
Profiled kernels are timed one by one, so the totals run a little above the unprofiled decode; the shares are
what this answers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import HERE, WORK, machine_line

THREADS, PROMPT, NEW_TOKENS = 2, 128, 64
GRAPHS = [  # (label, graph under the base checkpoint's work folder)
    ("optitool int4 AWQ + GPTQ, 4-bit tied head (the example)", "gptq-int4/03-weight_only_quantize/model.onnx"),
    ("optitool int4 AWQ + GPTQ symmetric, 4-bit tied head", "gptq-int4-sym/03-weight_only_quantize/model.onnx"),
    ("optitool int4 AWQ + GPTQ, 8-bit tied head", "gptq-int4-head8/03-weight_only_quantize/model.onnx"),
    ("optitool int8 weight-only (min/max)", "int8/02-weight_only_quantize/model.onnx"),
    ("onnxruntime-genai int4 graph", "ortgenai-int4/model.onnx"),
]


def node_roles(path: Path) -> dict[str, str]:
    """Node name -> the row its time is counted in: its operator, MatMulNBits split by what it reads."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph
    outputs = {o.name for o in graph.output}
    roles = {}
    for node in graph.node:
        role = node.op_type
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            where = "LM head" if node.output[0] in outputs or node.output[0] == "logits" else "projections"
            role = f"MatMulNBits {attrs['bits']}-bit, {where}"
        roles[node.name] = role
    return roles


def onnx_nodes(path: Path) -> list[Any]:
    import onnx

    return list(onnx.load(str(path), load_external_data=False).graph.node)


def profile(path: Path, prompt: np.ndarray, folder: Path) -> dict[str, float]:
    """Kernel milliseconds per decoded token by row, from one profiled generation."""
    import onnxruntime as ort

    from optitool.onnx_decoding import OnnxDecoder, kv_layout

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / path.parent.name)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    decoder = OnnxDecoder(session, kv_layout(session, path))
    decoder.greedy(prompt, NEW_TOKENS)
    trace = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted(e["ts"] for e in trace if e.get("name") == "model_run")
    decode_from = runs[1]  # the first run is the prefill
    roles = node_roles(path)
    totals: dict[str, float] = defaultdict(float)
    for event in trace:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time") or event["ts"] < decode_from:
            continue
        node = name[: -len("_kernel_time")]
        totals[roles.get(node, event.get("args", {}).get("op_name", "other"))] += event["dur"] / 1000
    steps = len(runs) - 1
    return {role: ms / steps for role, ms in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=["finetuned", "gguf"], default="finetuned",
                        help="whose graphs: the fine-tuned checkpoint's or the GGUF file's")
    parser.add_argument("--rounds", type=int, default=3, help="profiled generations per graph (medians)")
    args = parser.parse_args()
    base = WORK / ("smollm2-finetuned" if args.base == "finetuned" else "smollm2")
    described = "fine-tuned checkpoint" if args.base == "finetuned" else "GGUF file, dequantized"
    results = "smollm2_profile.md" if args.base == "finetuned" else "smollm2_profile_gguf.md"
    found = [(label, base / where) for label, where in GRAPHS if (base / where).is_file()]
    missing = [label for label, where in GRAPHS if not (base / where).is_file()]
    prompt = np.random.default_rng(0).integers(100, 20000, (1, PROMPT)).astype(np.int64)
    per_graph: dict[str, list[dict[str, float]]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):  # graphs interleaved within each round
            for label, path in found:
                per_graph[label].append(profile(path, prompt, Path(tmp)))
    rows = sorted({role for runs in per_graph.values() for run in runs for role in run})
    medians = {label: {role: float(np.median([run.get(role, 0.0) for run in runs])) for role in rows}
               for label, runs in per_graph.items()}
    totals = {label: sum(m.values()) for label, m in medians.items()}
    shown = [r for r in rows if max(m[r] for m in medians.values()) >= 0.05]
    merged = {label: sum(n.op_type == "Split" for n in onnx_nodes(path)) for label, path in found}
    lines = [f"# Where SmolLM2's decode time goes in onnxruntime ({described})", "",
             f"`python -m benchmarks.smollm2_profile --base {args.base} --rounds {args.rounds}`; kernel milliseconds per decoded token "
             f"(medians of {args.rounds} profiled generations of {NEW_TOKENS} tokens after a {PROMPT}-token prompt, "
             f"prefill left out), {THREADS} threads, graphs interleaved. Profiled kernels run one at a time and "
             "are timed one by one: totals sit above the unprofiled decode; compare rows and shares.", "",
             machine_line(THREADS), "",
             "MatMulNBits nodes merged (gate and up as one node and a Split, weight_only_quantize's fuse_siblings): "
             + "; ".join(f"{label}: {count}" for label, count in merged.items()), "",
             "| operator | " + " | ".join(medians) + " |", "|---|" + "---|" * len(medians)]
    for role in shown:
        lines.append(f"| {role} | " + " | ".join(f"{m[role]:.2f} ({m[role] / totals[label]:.0%})"
                                                   for label, m in medians.items()) + " |")
    others = {label: sum(v for r, v in m.items() if r not in shown) for label, m in medians.items()}
    lines.append("| other operators | " + " | ".join(f"{v:.2f}" for v in others.values()) + " |")
    lines.append("| **total** | " + " | ".join(f"**{t:.2f}**" for t in totals.values()) + " |")
    if missing:
        lines += ["", "Not profiled (not made yet): " + "; ".join(missing)]
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / results).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
