"""Evaluate every stage on the same eval inputs, against the baseline: per token for a causal language
model (optitool.lm), on the main output (accuracy, fidelity, registered metrics) for anything else."""

from __future__ import annotations

from typing import Any

from optitool.artifacts import ModelArtifact
from optitool.data.inputs import InputSource
from optitool.errors import ConfigError
from optitool.execution import Executor
from optitool.metrics import Evaluation
from optitool.registry import Registry

RANDOM_EVAL_BATCHES = 4


def eval_batches(inputs: InputSource, batch_size: int = 16, limit: int | None = None) -> list[Any]:
    """The eval split when the data has one; seeded random inputs (for fidelity only) otherwise."""
    from optitool.data.inputs import Batch

    if inputs.has_split("eval"):
        return list(inputs.batches("eval", batch_size, limit=limit))
    return [Batch(inputs.random(batch_size, index=1000 + i)) for i in range(RANDOM_EVAL_BATCHES)]


def collect_outputs(artifact: ModelArtifact, batches: list[Any], device: str) -> tuple[str, Any, Any]:
    import torch

    run = Executor(artifact, device if artifact.kind == "torch" else "cpu")
    names, outs, labels = set(), [], []
    for batch in batches:
        name, out = run(batch.inputs)
        names.add(name)
        outs.append(out)
        if batch.labels is not None:
            labels.append(batch.labels)
    label_tensor = torch.cat(labels) if labels and len(labels) == len(batches) else None
    return names.pop() if len(names) == 1 else "output", torch.cat(outs), label_tensor


def check_labels(output_name: str, outputs: Any, label_names: list[str]) -> None:
    """A model whose main output is logits must have one per label the data uses, or accuracy is meaningless."""
    if label_names and output_name == "logits" and outputs.shape[1] != len(label_names):
        raise ConfigError(f"the data has {len(label_names)} labels ({', '.join(label_names)}) but the model's "
                          f"classification head has {outputs.shape[1]} outputs; set [model] num_labels = "
                          f"{len(label_names)} (a new head starts untrained: fine-tune it before its accuracy means anything)")


def evaluate(artifact: ModelArtifact, batches: list[Any], reference: Any, registry: Registry, device: str,
             label_names: list[str]) -> tuple[dict[str, float], Any]:
    """Metrics of one stage; returns them and the stage's outputs (the baseline keeps its own as reference)."""
    name, outputs, labels = collect_outputs(artifact, batches, device)
    if reference is None:  # the baseline: the data's labels must fit its head
        check_labels(name, outputs, label_names)
        reference = outputs
    if reference.shape != outputs.shape:
        return {"evaluation_error": f"outputs of shape {tuple(outputs.shape)} cannot be compared with the "
                                    f"baseline's {tuple(reference.shape)}"}, outputs
    ev = Evaluation(output_name=name, outputs=outputs, reference=reference, labels=labels, label_names=label_names)
    metrics: dict[str, Any] = {"eval_examples": int(outputs.shape[0])}
    for metric_name, registered in registry.metrics.items():
        value = registered.obj(ev)
        if value is not None:
            metrics[metric_name] = round(float(value), 6)
    return metrics, outputs


class StageEvaluator:
    """Evaluates the baseline and then every stage of a run in the same way, on the same inputs."""

    def __init__(self, baseline: ModelArtifact, inputs: InputSource, registry: Registry, device: str,
                 seed: int) -> None:
        from optitool.lm import is_causal_lm, token_blocks

        self.baseline, self.inputs, self.registry, self.device = baseline, inputs, registry, device
        self.causal_lm = is_causal_lm(baseline) and inputs.is_text
        self.batches = (token_blocks(inputs, "eval", inputs.max_length, seed=seed) if self.causal_lm
                        else eval_batches(inputs))
        self.reference: Any = None

    def baseline_metrics(self) -> dict[str, Any]:
        """The baseline's metrics; refuses data its head cannot take (before anything is written)."""
        if self.causal_lm:
            return {**self._lm(self.baseline, None), **self._lm_notes()}
        metrics, self.reference = evaluate(self.baseline, self.batches, None, self.registry, self.device,
                                           self.inputs.label_names)
        return metrics

    def __call__(self, artifact: ModelArtifact) -> dict[str, Any]:
        if self.causal_lm:
            return self._lm(artifact, self.baseline)
        metrics, _ = evaluate(artifact, self.batches, self.reference, self.registry, self.device,
                              self.inputs.label_names)
        return metrics

    def _lm(self, artifact: ModelArtifact, baseline: ModelArtifact | None) -> dict[str, Any]:
        from optitool.lm import (
            GENERATION_TOKENS,
            generation_agreement,
            generation_prompts,
            greedy_tokens,
            lm_metrics,
        )

        metrics = lm_metrics(artifact, baseline, self.batches, self.device)
        length = self.inputs.max_length // 2
        new_tokens = min(GENERATION_TOKENS, self.inputs.max_length - length)
        prompts = generation_prompts(self.batches, length)
        tokens = greedy_tokens(artifact, prompts, new_tokens, self.device)
        if baseline is None:
            self.baseline_tokens = tokens
        metrics.update(generation_agreement=generation_agreement(tokens, self.baseline_tokens),
                       generation_prompts=int(prompts.shape[0]), generation_tokens=new_tokens)
        return metrics

    def _lm_notes(self) -> dict[str, Any]:
        notes = {}
        if self.inputs.label_names:
            notes["labels_ignored"] = ("a causal language model is evaluated on the eval split's text; its labels "
                                       "are not used")
        if not self.inputs.has_split("eval"):
            notes["eval_text"] = ("none: perplexity is over seeded random tokens and means little; agreement and "
                                  "KL with the baseline still do")
        return notes
