"""Evaluate every stage on the same eval inputs, against the baseline's outputs."""

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
