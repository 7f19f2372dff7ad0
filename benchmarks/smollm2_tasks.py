"""SmolLM2-135M-Instruct and the models optitool makes from it, scored on the two offline lm-eval tasks
shipped with optitool (bbc_topic: zero-shot topic by the log-likelihood of five topic names; bbc_cloze: a
paragraph's last word), each on the same items as the float32 model, with paired intervals.

1. The adapter checked against lm-eval itself: the float32 model (the GGUF file dequantized by transformers)
   scored by lm-eval's own Hugging Face backend (`HFLM`, batch 8) and by optitool's adapter (the same weights,
   one request at a time through the KV cache), on every item of both tasks: the scores, and the largest
   difference between the two log-likelihoods of any request.
2. The models, each made by `optitool run` with an `[evaluation]` table added on the command line (baseline
   and final stage scored in the run, the final stage paired with the baseline item by item): int8 weight-only,
   int4 round to nearest, imatrix and GPTQ int4 (examples/smollm2_int4.toml and the variants
   benchmarks/smollm2_cpu.py makes), and the depth-pruned + distilled model (examples/smollm2_depth_distill.toml).
3. Anchors made by onnxruntime-genai's model builder (int4 default, int4 k_quant_mixed, int8), scored with the
   same adapter on their own graphs and paired with the float32 model's items from (2).
Per model: the time its scoring took (both tasks, every item) on this machine. The BBC texts the tasks are cut
from overlap the articles the depth example distils on (it reads 200 of the 2,225): its scores may flatter it.
Run: python -m benchmarks.smollm2_tasks [--reuse] [--limit N]. Writes benchmarks/results/smollm2_tasks.md/.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import HERE, ROOT, WORK, machine_line

TASKS = ["bbc_topic", "bbc_cloze"]
OUT = WORK / "smollm2-tasks"
THREADS = 2


def evaluation_overrides(limit: int | None) -> list[str]:
    sets = [f"evaluation.tasks={json.dumps(TASKS)}", 'evaluation.stages=["baseline", "final"]']
    return sets + ([f"evaluation.limit={limit}"] if limit else [])


def runs() -> dict[str, tuple[str, list[str]]]:
    """label -> (example, overrides): the recipes of the 4-bit issue and the depth example."""
    from benchmarks.smollm2_cpu import OPTITOOL_RUNS

    picked = {k: OPTITOOL_RUNS[k] for k in ("int8", "rtn-int4", "imatrix-int4", "gptq-int4")}
    out: dict[str, tuple[str, list[str]]] = {k: ("examples/smollm2_int4.toml", v) for k, v in picked.items()}
    out["depth-distill"] = ("examples/smollm2_depth_distill.toml", [])
    return out


def make_run(label: str, example: str, overrides: list[str], limit: int | None, reuse: bool) -> Path:
    from benchmarks.smollm2_cpu import example_variant

    out = OUT / label
    report = out / "report.json"
    if reuse and report.is_file() and json.loads(report.read_text()).get("status") == "finished":
        return out
    dropped = [o for o in overrides if o.endswith("=__drop__")]
    pipeline = example_variant(dropped) if dropped else ROOT / example
    args = [sys.executable, "-m", "optitool.cli", "run", str(pipeline), "--output", str(out), "--overwrite",
            "--no-benchmark"]
    for override in [o for o in overrides if not o.endswith("=__drop__")] + evaluation_overrides(limit):
        args += ["--set", override]
    print(f"making and scoring {label}: optitool run {example} {' '.join(overrides)}", flush=True)
    started = time.time()
    subprocess.run(args, check=False)  # a budget that fails (the int4 size target) still leaves its stages
    (out / "made_in_seconds.txt").write_text(f"{time.time() - started:.1f}\n")
    return out


def load_fp32() -> tuple[Any, Any]:
    from benchmarks.smollm2_cpu import load_torch

    return load_torch()


def parity(model: Any, tokenizer: Any, limit: int | None) -> dict[str, Any]:
    """Both tasks through lm-eval's HF backend and through optitool's adapter, on the same float32 weights."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from optitool.lm_tasks.backends import TorchReader
    from optitool.lm_tasks.scoring import score
    from optitool.lm_tasks.tasks import resolve_tasks, task_configs

    refs = resolve_tasks(TASKS, ROOT, "benchmark")
    started = time.time()
    hf = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu"),
                                 tasks=task_configs(refs), limit=limit, bootstrap_iters=1000, log_samples=True,
                                 num_fewshot=0)
    hf_seconds = time.time() - started
    started = time.time()
    mine = score(TorchReader(model, "cpu"), tokenizer, refs, limit=limit, num_fewshot=0,
                 max_length=model.config.max_position_embeddings, seed=0)
    mine_seconds = time.time() - started
    out: dict[str, Any] = {"seconds": {"lm-eval HF backend": round(hf_seconds, 1), "optitool": round(mine_seconds, 1)}}
    for task in TASKS:
        hf_metrics = {k.split(",")[0]: v for k, v in hf["results"][task].items()
                      if "," in k and not k.split(",")[0].endswith("_stderr")}
        mine_items = mine[task].items
        hf_items = {str(s["doc_id"]): s for s in hf["samples"][task]}
        main = mine[task].main
        same = sum(float(hf_items[d][main]) == v[main] for d, v in mine_items.items())
        out[task] = {"lm-eval HF backend": hf_metrics, "optitool": mine[task].metrics, "main_metric": main,
                     "items": len(mine_items), "items_with_equal_main_metric": same,
                     "largest_loglikelihood_difference": _largest_difference(model, tokenizer, hf["samples"][task])}
    return out


def _largest_difference(model: Any, tokenizer: Any, hf_samples: list[dict[str, Any]]) -> float:
    """Over every request lm-eval logged for a task: |its HF backend's log-likelihood - the adapter's| for the
    same (context, continuation) text, the adapter re-reading them (a context once for its continuations)."""
    from optitool.lm_tasks.adapter import TokenScorer
    from optitool.lm_tasks.backends import TorchReader

    pairs, theirs = [], []
    for sample in hf_samples:
        for arguments, response in zip(sample["arguments"], sample["resps"], strict=True):
            pairs.append((arguments[0], arguments[1]))
            theirs.append(float(response[0][0]))
    scorer = TokenScorer(TorchReader(model, "cpu"), tokenizer, model.config.max_position_embeddings)
    ours = [ll for ll, _ in scorer.loglikelihood(pairs)]
    return max(abs(a - b) for a, b in zip(theirs, ours, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reuse", action="store_true", help="keep models and runs already made")
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(THREADS)
    wall = time.time()
    from optitool.bench.load import LoadMonitor

    model, tokenizer = load_fp32()
    with LoadMonitor() as load:
        check = parity(model, tokenizer, args.limit)
    check["load"] = load.reading.as_dict() if load.reading else None
    print(json.dumps(check, indent=1), flush=True)
    del model
    made = {label: make_run(label, example, overrides, args.limit, args.reuse)
            for label, (example, overrides) in runs().items()}
    with LoadMonitor() as load:
        anchors = score_anchors(made["gptq-int4"], args.limit, args.reuse)
    anchors_load = load.reading.as_dict() if load.reading else None
    write(check, made, anchors, args.limit, time.time() - wall, anchors_load, args.reuse)


def score_anchors(run: Path, limit: int | None, reuse: bool) -> dict[str, Any]:
    """onnxruntime-genai's builds of the float32 model, scored with the adapter and paired with the float32
    model's items as the run kept them."""
    import benchmarks.smollm2_cpu as cpu
    from optitool.lm_tasks.backends import OnnxCacheReader
    from optitool.lm_tasks.scoring import load_scores, paired_changes, score
    from optitool.lm_tasks.tasks import resolve_tasks
    from optitool.onnx_decoding import open_decoder

    model, tokenizer = load_fp32()
    built = cpu.make_genai_models(cpu.hf_folder(model, tokenizer), reuse)
    baseline = load_scores(run / "00-baseline")
    refs = resolve_tasks(TASKS, ROOT, "benchmark")
    out = {}
    for label in ("int8", "int4", "int4 k_quant_mixed"):
        graph = built[label] / "model.onnx"
        started = time.time()
        scores = score(OnnxCacheReader(open_decoder(graph, threads=THREADS)), tokenizer, refs, limit=limit,
                       num_fewshot=0, max_length=model.config.max_position_embeddings, seed=0)
        out[label] = {"tasks": {t: s.summary() for t, s in scores.items()},
                      "task_changes": paired_changes(baseline, scores, 0), "tasks_seconds": round(time.time() - started, 1),
                      "size_mb": round(cpu.folder_mb([*built[label].glob("*.onnx"), *built[label].glob("*.onnx.data")]), 1)}
    return out


def _row(name: str, tasks: dict[str, Any], changes: dict[str, Any], size: float | None, seconds: float | None,
         load: dict[str, Any] | None = None) -> list[str]:
    row = [name, f"{size:.0f}" if size else "-"]
    for task in TASKS:
        scores = tasks.get(task)
        if scores is None:
            row += ["-", "-"]
            continue
        metric = scores["main_metric"]
        row.append(f"{scores['metrics'][metric]:.3f} ±{scores['stderr'].get(metric, 0):.3f}")
        change = changes.get(task)
        row.append("-" if change is None else f"{change['difference']:+.3f} [{change['low']:+.3f}, {change['high']:+.3f}]"
                   + (" worse" if change["significantly_worse"] else ""))
    cloze = tasks.get("bbc_cloze", {}).get("metrics", {}).get("perplexity")
    busy = "" if load is None else " (quiet)" if not load.get("reasons") else " (BUSY)"
    row += [f"{cloze:.1f}" if cloze is not None else "-",
            (f"{seconds:.0f}" + (busy if load is not None else " (load not recorded)")) if seconds is not None else "-"]
    return row


def _load_words(reading: dict[str, Any] | None) -> str:
    if not reading:
        return "load not recorded"
    quiet = "quiet" if not reading.get("reasons") else "BUSY: " + "; ".join(reading["reasons"])
    return f"{quiet} (other processes kept {reading['other_cores']:.2f} of {reading['cpu_count']} cores busy)"


def write(check: dict[str, Any], made: dict[str, Path], anchors: dict[str, Any], limit: int | None, wall: float,
          anchors_load: dict[str, Any] | None, reuse: bool) -> None:
    header = ["model", "size MB", "bbc_topic acc", "vs fp32 (paired 95 %)", "bbc_cloze acc", "vs fp32 (paired 95 %)",
              "cloze word perplexity", "scoring s"]
    rows, data = [], {"parity": check, "runs": {}, "anchors": anchors, "anchors_load": anchors_load, "limit": limit}
    first = json.loads((made["gptq-int4"] / "report.json").read_text())["stages"][0]
    rows.append(_row("float32 (GGUF dequantized), torch", first.get("tasks", {}), {},
                     first["metrics"].get("size_bytes", 0) / 1e6, first.get("tasks_seconds"), first.get("tasks_load")))
    for label, run in made.items():
        report = json.loads((run / "report.json").read_text())
        final = report["stages"][-1]
        data["runs"][label] = {"stage": final["name"], "tasks": final.get("tasks"), "task_changes": final.get("task_changes"),
                               "tasks_seconds": final.get("tasks_seconds"), "status": report.get("status"),
                               "made_in_seconds": float((run / "made_in_seconds.txt").read_text())}
        rows.append(_row(f"optitool {label} ({final['name']}, {final['kind']})", final.get("tasks", {}),
                         final.get("task_changes", {}), final["metrics"].get("size_bytes", 0) / 1e6,
                         final.get("tasks_seconds"), final.get("tasks_load")))
    for label, scored in anchors.items():
        rows.append(_row(f"onnxruntime-genai {label}", scored["tasks"], scored["task_changes"], scored["size_mb"],
                         scored["tasks_seconds"], anchors_load))
    lines = ["# SmolLM2-135M on the offline lm-eval tasks (bbc_topic, bbc_cloze)", "",
             f"`python -m benchmarks.smollm2_tasks{f' --limit {limit}' if limit else ''}{' --reuse' if reuse else ''}`; "
             f"{wall / 60:.0f} min" + (" (the optitool runs were reused from an earlier invocation: their own wall "
                                      "times are at the end)" if reuse else " in all") + ".", "",
             machine_line(THREADS), "", "## The adapter against lm-eval's own Hugging Face backend (float32, same weights)", "",
             "| task | metric | lm-eval HF backend | optitool adapter | items with equal main metric | largest "
             "log-likelihood difference |", "|---|---|---|---|---|---|"]
    for task in TASKS:
        c = check[task]
        for metric, value in c["lm-eval HF backend"].items():
            lines.append(f"| {task} | {metric} | {value:.6g} | {c['optitool'].get(metric, float('nan')):.6g} | "
                         f"{c['items_with_equal_main_metric']}/{c['items']} | {c['largest_loglikelihood_difference']:.2e} |")
    lines += ["", f"Seconds for both tasks: lm-eval HF backend (batch 8) {check['seconds']['lm-eval HF backend']}, "
                  f"optitool adapter (a torch model reads distinct sequences in batches of 8) {check['seconds']['optitool']}; "
                  f"machine {_load_words(check.get('load'))}.", "",
              "## Every model, paired with the float32 model on the same items", "",
              "Main metric ± its standard error; vs fp32: the change with its paired bootstrap 95 % interval ('worse': "
              "the whole interval below 0). Scoring seconds: both tasks, every item, this machine.", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "The optitool rows' scoring seconds were taken inside their `optitool run` (its report records the "
                  "machine's load while it scored, where the run was made by an optitool that records it); the anchors' "
                  f"with the machine {_load_words(anchors_load)}. Scoring times on these 2 cores move with other load; "
                  "the scores do not."]
    lines += ["", "Wall time of each `optitool run` (loading, passes, its own evaluation, and scoring baseline and final "
                  "on both tasks): " + ", ".join(f"{label} {run['made_in_seconds']:.0f} s"
                                                 for label, run in data["runs"].items()) + "."]
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "smollm2_tasks.md").write_text("\n".join(lines) + "\n")
    (HERE / "results" / "smollm2_tasks.json").write_text(json.dumps(data, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
