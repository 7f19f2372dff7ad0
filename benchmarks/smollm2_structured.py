"""SmolLM2-135M-Instruct pruned so that it runs faster, then distilled: the issue's results (c) and (d).

(c) structured width: half of every block's MLP channels (gate, up and down together) and one of its three
    key/value groups with the three query heads that read it, chosen by activation norm x weight norm on
    calibration text (criterion = "wanda");
(d) depth: the 15 of 30 blocks that turn the hidden state least on calibration text.
Each is one `optitool run` of examples/smollm2_depth_distill.toml (the example) with its pruning settings:
30 distillation steps from the unpruned model (per-token KL, 8 blocks of 256 tokens a step), then quality
on 10 BBC articles and generation timed in torch, interleaved with the unpruned model in the same process
(time to first token after a 128-token prompt, decode time per token over 64 new tokens, batch 1).
Run: python -m benchmarks.smollm2_structured [--reuse]. Writes benchmarks/results/smollm2_structured.md.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

from benchmarks.common import HERE, WORK, machine_line

EXAMPLE = HERE.parent / "examples" / "smollm2_depth_distill.toml"
PRUNE = re.compile(r"\[\[passes\]\]\npass = \"depth_prune\".*?(?=\n\[\[passes\]\])", re.S)
CANDIDATES = {
    "(c) width: MLP channels 50 %, key/value groups 1 of 3 (Wanda-style scores)":
        '[[passes]]\npass = "structured_prune"\nname = "width"\ntarget = "ffn+heads"\n'
        'sparsity = 0.5\nscope = "layer"\ncriterion = "wanda"\ncalibration_samples = 16',
    "(d) depth: 15 of 30 blocks": None,  # the example as it is
}


def run(label: str, settings: str | None, reuse: bool) -> tuple[dict, float]:
    text = EXAMPLE.read_text()
    if settings is not None:
        text = PRUNE.sub(settings, text, count=1)
    folder = WORK / "smollm2-structured" / label[:3].strip("()")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pipeline.toml").write_text(text)
    report = folder / "run" / "report.json"
    seconds = json.loads((folder / "wall.json").read_text())["seconds"] if (folder / "wall.json").is_file() else 0.0
    if not (reuse and report.is_file() and json.loads(report.read_text()).get("status") == "finished"):
        print(f"running {label}", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "optitool.cli", "run", str(folder / "pipeline.toml"), "--output",
                        str(folder / "run"), "--overwrite", "--quiet"], check=False)
        seconds = time.perf_counter() - start
        (folder / "wall.json").write_text(json.dumps({"seconds": seconds}))
    return json.loads(report.read_text()), seconds


def entry(stage: dict, measure: str) -> dict:
    return next(b for b in stage["benchmarks"] if b.get("measure") == measure)


def main() -> None:
    reuse = "--reuse" in sys.argv
    rows, notes = [], []
    base = None
    for label, settings in CANDIDATES.items():
        report, wall = run(label, settings, reuse)
        stages = report["stages"]
        base = stages[0]
        for stage in stages[1:]:
            m = stage["metrics"]
            ttft, decode = entry(stage, "ttft"), entry(stage, "decode")
            quiet = all(entry(s, w)["load"]["quiet"] for s in stages for w in ("ttft", "decode"))
            trained = f"{m['distill_seconds'] / 60:.1f} min ({m['distill_steps']} steps)" if "distill_seconds" in m \
                else "-"
            kept = f"{m['parameters'] / 1e6:.1f} M"
            rows.append(f"| {label} | {stage['name']} | {kept} | {m['perplexity']:.2f} | "
                        f"{m['perplexity'] / base['metrics']['perplexity'] - 1:+.1%} | {m['token_agreement']:.3f} | "
                        f"{m['generation_agreement']:.3f} | {ttft['median_ms']:.0f} | "
                        f"{ttft['speedup_vs_baseline']['ratio']:.2f}x [{ttft['speedup_vs_baseline']['low']:.2f}-"
                        f"{ttft['speedup_vs_baseline']['high']:.2f}] | {1000 / decode['median_ms']:.1f} | "
                        f"{decode['speedup_vs_baseline']['ratio']:.2f}x [{decode['speedup_vs_baseline']['low']:.2f}-"
                        f"{decode['speedup_vs_baseline']['high']:.2f}] | {trained} | {'yes' if quiet else 'no'} |")
        b_ttft, b_decode = entry(base, "ttft"), entry(base, "decode")
        notes.append(f"- {label}: whole run {wall / 60:.1f} min wall; unpruned in the same loop: TTFT "
                     f"{b_ttft['median_ms']:.0f} ms, {1000 / b_decode['median_ms']:.1f} tokens/s.")
    assert base is not None
    lines = ["# SmolLM2-135M made faster by structured pruning, then distilled", "",
             "`python -m benchmarks.smollm2_structured`: each block of rows one `optitool run` of "
             "examples/smollm2_depth_distill.toml with its pruning settings (torch, CPU). Quality: 10 BBC articles "
             f"in 256-token blocks ({base['metrics']['eval_tokens']} scored tokens); unpruned (dequantized GGUF) "
             f"perplexity {base['metrics']['perplexity']:.3f}. Speed: greedy generation in torch eager with its KV "
             "cache, batch 1, 128-token prompt, 64 new tokens, interleaved with the unpruned model in the same "
             "process; median, speedup with its 95 % bootstrap interval. Distillation: per-token KL from the "
             "unpruned model on 160 other BBC articles (8 blocks of 256 tokens a step, lr 2e-4).", "",
             machine_line(2), "",
             "| pruning | stage | parameters | perplexity | vs unpruned | token agreement | greedy agreement | "
             "TTFT ms | TTFT speedup | decode tokens/s | decode speedup | training | quiet |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, "", *notes]
    (HERE / "results" / "smollm2_structured.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
