"""Magnitude masks: unstructured (per layer or global) and N:M. A mask is True where a weight is kept."""

from __future__ import annotations

from typing import Any


def layer_mask(weight: Any, sparsity: float) -> Any:
    """Zero exactly round(sparsity * n) of the smallest-magnitude weights of one tensor."""
    import torch

    n = weight.numel()
    k = int(round(sparsity * n))
    mask = torch.ones(n, dtype=torch.bool, device=weight.device)
    if k:
        mask[torch.topk(weight.detach().abs().flatten(), k, largest=False).indices] = False
    return mask.view_as(weight)


def global_masks(weights: dict[str, Any], sparsity: float) -> dict[str, Any]:
    """Zero exactly round(sparsity * total) of the smallest weights across all tensors together."""
    import torch

    flat = torch.cat([w.detach().abs().flatten().float() for w in weights.values()])
    k = int(round(sparsity * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if k:
        keep[torch.topk(flat, k, largest=False).indices] = False
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = keep[start: start + w.numel()].view_as(w).to(w.device)
        start += w.numel()
    return masks


def n_m_mask(weight: Any, n: int, m: int) -> Any:
    """Keep the n largest of every m consecutive weights along the input dimension (the last one)."""
    import torch

    rows = weight.detach().reshape(weight.shape[0], -1)
    if rows.shape[1] % m:
        raise ValueError(f"input dimension {rows.shape[1]} is not a multiple of {m}")
    groups = rows.abs().reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
    return keep.reshape(weight.shape)
