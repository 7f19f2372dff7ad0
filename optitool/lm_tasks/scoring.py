"""Score stages on lm-eval tasks and say, per task, whether each stage is worse than the baseline on the
same items (`optitool.paired`).

A task's main metric is its first averaged per-item one (acc before acc_norm; a corpus-level metric such
as perplexity is reported but cannot be paired item by item). Per-item scores are kept beside each stage
(`task_items.json`) so the pairing can be checked, or redone against another run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from optitool.lm_tasks.adapter import Progress, make_stage_lm
from optitool.lm_tasks.backends import Reader
from optitool.lm_tasks.tasks import TaskRef, task_configs
from optitool.paired import paired_change

BOOTSTRAP_ITERS = 1000  # lm-eval's own bootstrap, for standard errors of corpus-level metrics
ITEMS_FILE = "task_items.json"  # per-item scores beside each scored stage
DEFAULT_CONTEXT = 2048  # tokens lm-eval's HF backend gives a model whose files do not say its context length


@dataclass
class TaskScores:
    """One stage on one task: aggregate metrics and their standard errors, and per-item scores."""

    task: str
    metrics: dict[str, float]
    stderr: dict[str, float]
    higher_is_better: dict[str, bool]
    items: dict[str, dict[str, float]] = field(default_factory=dict)  # doc_id -> metric -> score
    num_fewshot: int = 0
    main: str | None = None

    def summary(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "stderr": self.stderr, "main_metric": self.main,
                "higher_is_better": self.higher_is_better, "items": len(self.items), "num_fewshot": self.num_fewshot}


def score(reader: Reader, tokenizer: Any, refs: list[TaskRef], *, limit: int | None, num_fewshot: int | None,
          max_length: int, seed: int, progress: Progress | None = None) -> dict[str, TaskScores]:
    """Every task in `refs` on one stage."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # no hub here: never wait on one
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    registered = any(r.file is None for r in refs)
    loaded = TaskManager(include_defaults=registered).load(task_configs(refs))
    for task in loaded["tasks"].values():
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)
    lm = make_stage_lm(reader, tokenizer, max_length, progress)
    results = evaluate(lm, loaded, limit=limit, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=True,
                       verbosity="WARNING")
    return {name: _task_scores(name, results) for name in results["results"] if name in results.get("samples", {})}


def _task_scores(name: str, results: dict[str, Any]) -> TaskScores:
    higher = {k: bool(v) for k, v in results["higher_is_better"].get(name, {}).items()}
    metrics, stderr = {}, {}
    for key, value in results["results"][name].items():
        metric, _, _ = key.partition(",")
        if not isinstance(value, int | float) or metric == "sample_len":
            continue
        if metric.endswith("_stderr"):
            if isinstance(value, float) and value == value:  # lm-eval writes "N/A" or nan when it has none
                stderr[metric.removesuffix("_stderr")] = round(float(value), 6)
        else:
            metrics[metric] = round(float(value), 6)
    items: dict[str, dict[str, float]] = {}
    averaged = [m for m in higher if m in metrics]
    for sample in results["samples"][name]:
        scores = {m: float(sample[m]) for m in averaged if isinstance(sample.get(m), int | float | bool)}
        items[str(sample["doc_id"])] = scores
    aggregation = results["configs"][name].get("metric_list") or []
    mean_metrics = [m["metric"] for m in aggregation if m.get("aggregation", "mean") == "mean"] or averaged
    main = next((m for m in mean_metrics if m in metrics), None)
    return TaskScores(name, metrics, stderr, higher, items, int(results["n-shot"].get(name, 0)), main)


def load_scores(stage_folder: Any) -> dict[str, TaskScores]:
    """The task scores a run kept for one stage (stage.json and task_items.json), to pair them again: with a
    stage of another run, or a model scored outside a run."""
    import json
    from pathlib import Path

    folder = Path(stage_folder)
    record = json.loads((folder / "stage.json").read_text())
    items = json.loads((folder / ITEMS_FILE).read_text())
    return {name: TaskScores(name, s["metrics"], s["stderr"], s["higher_is_better"], items.get(name, {}),
                             s.get("num_fewshot", 0), s.get("main_metric"))
            for name, s in record.get("tasks", {}).items()}


def paired_changes(baseline: dict[str, TaskScores], stage: dict[str, TaskScores], seed: int) -> dict[str, Any]:
    """Per task: the stage's main metric minus the baseline's over the items both were scored on, its paired
    interval, and the drop (positive = worse, whichever way the metric points)."""
    out = {}
    for name, scores in stage.items():
        base = baseline.get(name)
        metric = scores.main
        if base is None or metric is None:
            continue
        shared = [d for d in base.items if d in scores.items and metric in base.items[d] and metric in scores.items[d]]
        if not shared:
            continue
        change = paired_change([base.items[d][metric] for d in shared], [scores.items[d][metric] for d in shared],
                               seed=seed)
        sign = 1 if scores.higher_is_better.get(metric, True) else -1
        worse = change.high < 0 if sign > 0 else change.low > 0
        out[name] = {"metric": metric, **change.as_dict(), "drop": round(-sign * change.difference, 6),
                     "significantly_worse": bool(worse)}
    return out


def check_scorable(artifact: Any, tokenizer: Any) -> None:
    """The loaded model can be scored on lm-eval tasks (refused before the run folder is written)."""
    from optitool.errors import ConfigError
    from optitool.lm import is_causal_lm

    if not is_causal_lm(artifact):
        raise ConfigError("[evaluation] scores lm-eval tasks by a causal language model's next-token probabilities "
                          f"and generations, and the loaded model ({type(getattr(artifact, 'module', artifact)).__name__})"
                          " is not one; remove [evaluation], or load a causal LM")
    if tokenizer is None:
        raise ConfigError("[evaluation] scores text, and the loaded model has no tokenizer: load it from a folder or "
                          "file that carries one")


class ThrottledProgress:
    """Progress lines while a stage is scored: at most one every `every_s` seconds, and the last."""

    def __init__(self, say: Any, stage: str, every_s: float = 10.0) -> None:
        import time

        self.say, self.stage, self.every_s = say, stage, every_s
        self._clock = time.monotonic
        self._last = self._clock()

    def __call__(self, done: int, total: int, what: str) -> None:
        now = self._clock()
        if done == total or now - self._last >= self.every_s:
            self._last = now
            self.say(f"  {self.stage}: {what} {done}/{total}")


def score_stages(stages: list[Any], spec: Any, tokenizer: Any, device: str, *, context_length: int | None,
                 baseline_folder: Any, console: Any, log: Any, stage_done: Any) -> None:
    """The run's part: `[evaluation]`'s tasks on the stages it names ('final': the last), in order, each
    stage's record given its scores, its paired changes from the baseline and the seconds they took; its
    per-item scores kept beside it (the baseline's in `baseline_folder`). `stage_done` is called after each."""
    import time

    from optitool import atomic
    from optitool.bench.load import LoadMonitor
    from optitool.errors import OptitoolError, RunError
    from optitool.lm_tasks.backends import reader_for

    evaluation = spec.evaluation
    chosen = {stages[-1].name if n == "final" else n for n in evaluation.stages}
    max_length = evaluation.max_length or context_length or DEFAULT_CONTEXT
    names = ", ".join(evaluation.tasks)
    scores: dict[str, dict[str, TaskScores]] = {}
    for stage in [s for s in stages if s.name in chosen]:
        start = time.perf_counter()
        with console.step(f"lm-eval tasks ({names}) on {stage.name}"), LoadMonitor() as load:
            try:
                scores[stage.name] = score(
                    reader_for(stage.artifact, device), tokenizer, spec.evaluation_tasks, limit=evaluation.limit,
                    num_fewshot=evaluation.num_fewshot, max_length=max_length, seed=spec.seed,
                    progress=ThrottledProgress(console.say, stage.name))
            except OptitoolError:
                raise
            except Exception as exc:  # noqa: BLE001 - lm-eval or a task's own code failed: say which
                log.exception("lm-eval tasks on %s failed", stage.name)
                raise RunError(f"scoring lm-eval tasks ({names}) on stage {stage.name!r} failed: "
                               f"{type(exc).__name__}: {exc}") from exc
        stage.record["tasks"] = {t: s.summary() for t, s in scores[stage.name].items()}
        stage.record["tasks_seconds"] = round(time.perf_counter() - start, 1)
        stage.record["tasks_load"] = load.reading.as_dict() if load.reading else None  # was the time its own?
        if "baseline" in scores and stage.name != "baseline":
            stage.record["task_changes"] = paired_changes(scores["baseline"], scores[stage.name], spec.seed)
        folder = stage.folder or baseline_folder
        atomic.write_json(folder / ITEMS_FILE, {t: s.items for t, s in scores[stage.name].items()})
        atomic.write_json(folder / "stage.json", stage.record)
        stage_done()
