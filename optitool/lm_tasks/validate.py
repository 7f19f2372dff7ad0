"""`[evaluation]` checked with the rest of the pipeline, before any model loads: tasks that exist and parse,
a model that can be scored on them, stages this pipeline makes, budgets on tasks it scores."""

from __future__ import annotations

from pathlib import Path

from optitool.errors import ConfigError
from optitool.lm_tasks.adapter import DEFAULT_MAX_GEN_TOKENS
from optitool.lm_tasks.tasks import TaskRef, resolve_tasks
from optitool.spec import BudgetSpec, EvaluationSpec

CAUSAL_LM_TASK = "text-generation"


def check_evaluation(evaluation: EvaluationSpec | None, budget: BudgetSpec | None, *, model_task: str | None,
                     context_length: int | None, stage_names: list[str], base_dir: Path,
                     where: str) -> list[TaskRef]:
    """The tasks `[evaluation]` names, resolved; a ConfigError naming the setting that cannot work."""
    _check_task_budgets(evaluation, budget, where)
    if evaluation is None:
        return []
    if model_task is not None and model_task != CAUSAL_LM_TASK:
        raise ConfigError(f"{where}: [evaluation] scores lm-eval tasks by a causal language model's next-token "
                          f"probabilities (and its generations), and [model] is a {model_task!r} model; remove "
                          "[evaluation], or load a causal LM")
    for name in evaluation.stages:
        if name != "final" and name not in stage_names:
            raise ConfigError(f"{where}: [evaluation].stages names {name!r}, which is not a stage of this pipeline; "
                              f"its stages are {', '.join(stage_names)} (and 'final', the last)")
    if context_length is not None and evaluation.max_length is not None and evaluation.max_length > context_length:
        raise ConfigError(f"{where}: [evaluation].max_length is {evaluation.max_length} tokens, and the model takes "
                          f"at most {context_length} (its context length)")
    refs = resolve_tasks(evaluation.tasks, base_dir, where)
    window = evaluation.max_length or context_length
    for ref in refs:
        wanted = ref.max_gen_toks or DEFAULT_MAX_GEN_TOKENS
        if ref.output_type == "generate_until" and window is not None and window <= wanted:
            raise ConfigError(f"{where}: [evaluation].tasks has the generate_until task {ref.name!r}, which generates "
                              f"up to {wanted} tokens, and the model sees {window} tokens in all: raise "
                              "[evaluation].max_length, or give the task a smaller max_gen_toks in its "
                              "generation_kwargs")
    if budget is not None:
        _check_budget_tasks(evaluation, budget, refs, where)
    return refs


def _task_budget_keys(budget: BudgetSpec | None) -> list[str]:
    if budget is None:
        return []
    keys = [f"[budget].max_task_drop.{k}" for k in budget.max_task_drop or {}]
    if budget.no_significant_task_drop:
        keys.append("[budget].no_significant_task_drop")
    return keys


def _check_task_budgets(evaluation: EvaluationSpec | None, budget: BudgetSpec | None, where: str) -> None:
    keys = _task_budget_keys(budget)
    if keys and evaluation is None:
        raise ConfigError(f"{where}: {keys[0]} limits an lm-eval task score, and the pipeline has no [evaluation] "
                          "table naming tasks to score")


def _check_budget_tasks(evaluation: EvaluationSpec, budget: BudgetSpec, refs: list[TaskRef], where: str) -> None:
    if not _task_budget_keys(budget):
        return
    stage = budget.stage
    if stage not in evaluation.stages and not (stage == "final" and "final" in evaluation.stages):
        raise ConfigError(f"{where}: [budget] limits task scores of stage {stage!r}, and [evaluation].stages "
                          f"({', '.join(evaluation.stages)}) does not score it")
    if "baseline" not in evaluation.stages:
        raise ConfigError(f"{where}: [budget] limits how far task scores drop from the baseline's, and "
                          "[evaluation].stages does not score 'baseline'")
    if any(r.file is None for r in refs):
        return  # a registered name may be a group: its tasks are known only when it loads
    names = [r.name for r in refs]
    limited = list(budget.max_task_drop or {})
    if isinstance(budget.no_significant_task_drop, list):
        limited += budget.no_significant_task_drop
    for name in limited:
        if name not in names:
            raise ConfigError(f"{where}: [budget] limits the task {name!r}, which [evaluation].tasks does not score; "
                              f"it scores {', '.join(names)}")
