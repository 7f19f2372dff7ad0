"""Structured pruning that physically removes what it prunes: FFN units and attention heads of BERT-like
transformers, and hidden units of Linear/Conv chains in nn.Sequential. The model gets smaller and faster on
any runtime; the changed module attributes are recorded so the saved stage can be rebuilt."""

from __future__ import annotations

from typing import Any


def _slice_linear(linear: Any, *, rows: Any = None, cols: Any = None) -> Any:
    import torch

    weight = linear.weight.detach()
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
    new.weight.data.copy_(weight)
    if linear.bias is not None:
        bias = linear.bias.detach()
        new.bias.data.copy_(bias[rows] if rows is not None else bias)
    return new.to(linear.weight.device)


def _keep_counts(scores: list[Any], sparsity: float, scope: str) -> list[Any]:
    """Indices to keep per group: the top (1 - sparsity) of each, or by one global threshold (>= 1 each)."""
    import torch

    if scope == "layer":
        return [torch.topk(s, max(1, round(len(s) * (1 - sparsity)))).indices.sort().values for s in scores]
    flat = torch.cat(scores)
    keep_total = max(len(scores), round(len(flat) * (1 - sparsity)))
    threshold = torch.topk(flat, keep_total).values.min()
    out = []
    for s in scores:
        idx = (s >= threshold).nonzero().flatten()
        out.append(idx if len(idx) else s.argmax().view(1))
    return out


def bert_layers(module: Any) -> list[Any]:
    """Encoder layers with the BERT layout (attention.self.query/key/value, attention.output.dense,
    intermediate.dense, output.dense), the layout of BERT, RoBERTa, MiniLM, ELECTRA and similar."""
    layers = []
    for sub in module.modules():
        if all(hasattr(sub, a) for a in ("attention", "intermediate", "output")) and \
                hasattr(getattr(sub.attention, "self", None), "query"):
            layers.append(sub)
    return layers


def prune_ffn(layers: list[Any], sparsity: float, scope: str) -> dict[str, Any]:
    scores = []
    for layer in layers:
        up, down = layer.intermediate.dense, layer.output.dense
        scores.append(up.weight.detach().norm(dim=1) * down.weight.detach().norm(dim=0))
    keep = _keep_counts(scores, sparsity, scope)
    kept = []
    for layer, idx in zip(layers, keep, strict=True):
        layer.intermediate.dense = _slice_linear(layer.intermediate.dense, rows=idx)
        layer.output.dense = _slice_linear(layer.output.dense, cols=idx)
        kept.append(len(idx))
    return {"ffn_units_kept": kept}


def prune_heads(model: Any, layers: list[Any], sparsity: float, scope: str) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    scores, sizes = [], []
    for layer in layers:
        att = layer.attention.self
        heads = att.num_attention_heads
        size = att.query.weight.shape[0] // heads
        per_head = []
        for proj in (att.query, att.key, att.value):
            per_head.append(proj.weight.detach().reshape(heads, size, -1).norm(dim=(1, 2)))
        per_head.append(layer.attention.output.dense.weight.detach().reshape(-1, heads, size).norm(dim=(0, 2)))
        scores.append(torch.stack(per_head).prod(0))
        sizes.append(size)
    keep = _keep_counts(scores, sparsity, scope)
    names = {m: n for n, m in model.named_modules()}
    overrides, kept = {}, []
    for layer, idx, size in zip(layers, keep, sizes, strict=True):
        att = layer.attention.self
        dims = torch.cat([torch.arange(h * size, (h + 1) * size) for h in idx.tolist()])
        att.query = _slice_linear(att.query, rows=dims)
        att.key = _slice_linear(att.key, rows=dims)
        att.value = _slice_linear(att.value, rows=dims)
        layer.attention.output.dense = _slice_linear(layer.attention.output.dense, cols=dims)
        attrs = {"num_attention_heads": len(idx), "all_head_size": len(idx) * size, "attention_head_size": size}
        for attr, value in attrs.items():
            setattr(att, attr, value)
        overrides[names[att]] = attrs
        kept.append(len(idx))
    return {"heads_kept": kept}, overrides


def prune_sequential(seq: Any, sparsity: float, scope: str) -> dict[str, Any]:
    """Hidden units between consecutive Linear (or Conv2d) layers of an nn.Sequential, and the BatchNorm
    between them. The last layer's outputs are the model's and are never removed."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    positions = [i for i, m in enumerate(seq) if isinstance(m, kinds)]
    pairs = list(zip(positions, positions[1:], strict=False))
    if not pairs:
        raise ValueError("structured pruning needs at least two Linear or Conv2d layers in a row")
    scores = []
    for a, _ in pairs:
        w = seq[a].weight.detach()
        scores.append(w.reshape(w.shape[0], -1).norm(dim=1))
    keep = _keep_counts(scores, sparsity, scope)
    kept = []
    for (a, b), idx in zip(pairs, keep, strict=True):
        if isinstance(seq[a], torch.nn.Conv2d) and isinstance(seq[b], torch.nn.Linear):
            raise ValueError("a Conv2d followed (through Flatten) by a Linear cannot lose channels here")
        seq[a] = _slice_out(seq[a], idx)
        for j in range(a + 1, b):
            if isinstance(seq[j], torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                seq[j] = _slice_norm(seq[j], idx)
        seq[b] = _slice_in(seq[b], idx)
        kept.append(len(idx))
    return {"units_kept": kept}


def _slice_out(layer: Any, idx: Any) -> Any:
    import torch

    if isinstance(layer, torch.nn.Linear):
        return _slice_linear(layer, rows=idx)
    new = torch.nn.Conv2d(layer.in_channels, len(idx), layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, bias=layer.bias is not None)
    new.weight.data.copy_(layer.weight.detach()[idx])
    if layer.bias is not None:
        new.bias.data.copy_(layer.bias.detach()[idx])
    return new


def _slice_in(layer: Any, idx: Any) -> Any:
    import torch

    if isinstance(layer, torch.nn.Linear):
        return _slice_linear(layer, cols=idx)
    new = torch.nn.Conv2d(len(idx), layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, bias=layer.bias is not None)
    new.weight.data.copy_(layer.weight.detach()[:, idx])
    if layer.bias is not None:
        new.bias.data.copy_(layer.bias.detach())
    return new


def _slice_norm(norm: Any, idx: Any) -> Any:
    new = type(norm)(len(idx), eps=norm.eps, momentum=norm.momentum)
    for attr in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, attr).data.copy_(getattr(norm, attr).detach()[idx])
    return new
