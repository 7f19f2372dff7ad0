"""Wanda (Sun et al., 2023): prune by |weight| x the norm of the input that weight multiplies, compared
within each output row. Activations of LLMs have a few channels far larger than the rest; a small weight on
such a channel matters more than a larger one on a quiet channel, which magnitude alone cannot see. The
norms come from one pass over calibration data, with no gradient and no weight update."""

from __future__ import annotations

from typing import Any


def input_norms(module: Any, layers: dict[str, Any], batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Per covered layer (weight name -> layer), the L2 norm over all calibration tokens of each input
    channel."""
    import torch

    from optitool import call_module, inputs_for

    sums: dict[str, Any] = {}
    hooks = []
    for name, layer in layers.items():
        def record(_: Any, args: tuple[Any, ...], __: Any, name: str = name) -> None:
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
        hooks.append(layer.register_forward_hook(record))
    try:
        with torch.inference_mode():
            for batch in batches:
                call_module(module, inputs_for(module, batch, "cpu"))
    finally:
        for hook in hooks:
            hook.remove()
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
