"""Evaluation of a stage on the eval split: accuracy where labels and a classification head exist, and
fidelity to the baseline for any model. Metrics are registered through the metrics hook like plugins' own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class Evaluation:
    """What a metric sees: this stage's and the baseline's outputs on the same eval inputs."""

    output_name: str
    outputs: torch.Tensor  # [n, features] float tensor
    reference: torch.Tensor  # the baseline's outputs on the same inputs
    labels: torch.Tensor | None  # [n] long tensor
    label_names: list[str]

    @property
    def is_classifier(self) -> bool:
        return (self.output_name == "logits" and self.labels is not None
                and self.outputs.shape[1] == len(self.label_names))


def fidelity(ev: Evaluation) -> float:
    """Mean cosine similarity of the stage's outputs to the baseline's."""
    import torch

    return float(torch.nn.functional.cosine_similarity(ev.outputs, ev.reference, dim=1).mean())


def top1_agreement(ev: Evaluation) -> float | None:
    if ev.output_name != "logits":
        return None
    return float((ev.outputs.argmax(1) == ev.reference.argmax(1)).float().mean())


def kl_divergence(ev: Evaluation) -> float | None:
    """KL(baseline || stage) of the softmaxed logits, averaged over examples."""
    import torch

    if ev.output_name != "logits":
        return None
    log_p = torch.log_softmax(ev.reference, 1)
    log_q = torch.log_softmax(ev.outputs, 1)
    return float((log_p.exp() * (log_p - log_q)).sum(1).mean())


def accuracy(ev: Evaluation) -> float | None:
    if not ev.is_classifier:
        return None
    return float((ev.outputs.argmax(1) == ev.labels).float().mean())


def macro_f1(ev: Evaluation) -> float | None:
    if not ev.is_classifier:
        return None
    predicted = ev.outputs.argmax(1)
    scores = []
    for label in range(len(ev.label_names)):
        tp = int(((predicted == label) & (ev.labels == label)).sum())
        fp = int(((predicted == label) & (ev.labels != label)).sum())
        fn = int(((predicted != label) & (ev.labels == label)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


BUILTIN_METRICS = {"fidelity": fidelity, "top1_agreement": top1_agreement, "kl_divergence": kl_divergence,
                   "accuracy": accuracy, "macro_f1": macro_f1}
