"""Wanda (Sun et al., 2023): prune by |weight| x the norm of the input that weight multiplies, compared
within each output row. Activations of LLMs have a few channels far larger than the rest; a small weight on
such a channel matters more than a larger one on a quiet channel, which magnitude alone cannot see. The
norms come from one pass over calibration data, with no gradient and no weight update."""

from __future__ import annotations

from typing import Any


def input_norms(module: Any, layers: dict[str, Any], batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Per covered layer (weight name -> layer), the L2 norm over all calibration tokens of each input
    channel."""
    from optitool import observe_inputs

    sums: dict[str, Any] = {}

    def energy(name: str, x: Any) -> None:
        sums[name] = sums.get(name, 0) + (x * x).sum(0)

    observe_inputs(module, layers, batches, energy)
    return {name: total.sqrt() for name, total in sums.items()}


def scores(weight: Any, norm: Any, transposed: bool) -> Any:
    """|W| x ||x|| laid out as the weight [out, in] (a Conv1D's [in, out] weight is transposed back after)."""
    w = weight.detach().float()
    return (w.abs() * norm[:, None]) if transposed else (w.abs() * norm[None, :])


def row_mask(score: Any, sparsity: float) -> Any:
    """Keep the largest (1 - sparsity) of each output row's scores; exactly round(sparsity * in) per row."""
    import torch

    rows = score.reshape(score.shape[0], -1)
    k = int(round(sparsity * rows.shape[1]))
    mask = torch.ones_like(rows, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.topk(rows, k, dim=1, largest=False).indices, False)
    return mask.reshape(score.shape)
