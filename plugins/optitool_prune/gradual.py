"""Gradual magnitude pruning (Zhu & Gupta's cubic schedule), carried out by a training pass.

magnitude_prune with `schedule = "cubic"` hands a GradualPruner on; distill calls `update` after its
optimizer steps, so the model is pruned a little at a time while it learns to do without the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from optitool_prune.masks import global_masks, layer_mask


@dataclass
class GradualPruner:
    target: float
    scope: str
    weight_names: list[str]
    frequency: int
    masks: dict[str, Any] = field(default_factory=dict)

    def sparsity_at(self, step: int, total: int) -> float:
        """s_t = s_f * (1 - (1 - t / n)^3): fast at first, gentle near the end, exactly s_f at t = n."""
        progress = min(1.0, step / max(1, total))
        return self.target * (1 - (1 - progress) ** 3)

    def due(self, step: int, total: int) -> bool:
        return step >= total or step % self.frequency == 0

    def update(self, module: Any, step: int, total: int) -> dict[str, Any]:
        """Recompute masks for this step's sparsity, zero the pruned weights, and return the masks."""
        import torch

        params = dict(module.named_parameters())
        weights = {name: params[name] for name in self.weight_names}
        sparsity = self.sparsity_at(step, total)
        if self.scope == "global":
            masks = global_masks(weights, sparsity)
        else:
            masks = {name: layer_mask(w, sparsity) for name, w in weights.items()}
        with torch.no_grad():
            for name, w in weights.items():
                w.mul_(masks[name].to(w.dtype))
        self.masks = masks
        return masks
