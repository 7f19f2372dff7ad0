"""Structured pruning that physically removes what it prunes, so the model is smaller and faster on any
runtime: MLP channels (gate, up and down together for SwiGLU; c_fc/c_proj for GPT-2; intermediate/output
for BERT), attention heads (a key/value group leaves with its query heads under grouped-query attention),
whole blocks (depth), and hidden units of Linear/Conv chains in nn.Sequential. Transformer layers are found
by role (`ctx.architecture`), never by class name. What changed is recorded (module attributes, config
fields) so the saved stage reloads as the same architecture."""

from __future__ import annotations

from typing import Any

from optitool import Layout, PassError, call_module, inputs_for, is_conv1d, keep_blocks


def out_in(layer: Any) -> Any:
    """The weight laid out [outputs, inputs] whatever the layer stores."""
    w = layer.weight.detach()
    return w.t() if is_conv1d(layer) else w.reshape(w.shape[0], -1)


def slice_out(layer: Any, idx: Any) -> Any:
    """The layer keeping only the outputs `idx`."""
    import torch

    bias = layer.bias.detach()[idx] if getattr(layer, "bias", None) is not None else None
    if is_conv1d(layer):
        new = type(layer)(len(idx), layer.weight.shape[0])
        new.weight.data.copy_(layer.weight.detach()[:, idx])
    elif isinstance(layer, torch.nn.Linear):
        new = torch.nn.Linear(layer.in_features, len(idx), bias=bias is not None)
        new.weight.data.copy_(layer.weight.detach()[idx])
    else:
        new = torch.nn.Conv2d(layer.in_channels, len(idx), layer.kernel_size, layer.stride, layer.padding,
                              layer.dilation, bias=bias is not None)
        new.weight.data.copy_(layer.weight.detach()[idx])
    if bias is not None:
        new.bias.data.copy_(bias)
    return new.to(layer.weight.device)


def slice_in(layer: Any, idx: Any) -> Any:
    """The layer reading only the inputs `idx` (its outputs and bias unchanged)."""
    import torch

    has_bias = getattr(layer, "bias", None) is not None
    if is_conv1d(layer):
        new = type(layer)(layer.weight.shape[1], len(idx))
        new.weight.data.copy_(layer.weight.detach()[idx])
    elif isinstance(layer, torch.nn.Linear):
        new = torch.nn.Linear(len(idx), layer.out_features, bias=has_bias)
        new.weight.data.copy_(layer.weight.detach()[:, idx])
    else:
        new = torch.nn.Conv2d(len(idx), layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                              layer.dilation, bias=has_bias)
        new.weight.data.copy_(layer.weight.detach()[:, idx])
    if has_bias:
        new.bias.data.copy_(layer.bias.detach())
    return new.to(layer.weight.device)


def keep_counts(scores: list[Any], sparsity: float, scope: str) -> list[Any]:
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


def _set(root: Any, path: str, new: Any) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, attr, new)


def _uniform(kept: list[int]) -> bool:
    return len(set(kept)) == 1


def prune_mlp(layout: Layout, sparsity: float, scope: str, norms: dict[int, Any] | None) -> tuple[dict, dict]:
    """Remove MLP channels. A channel's importance is the norm of its weights in and out, or, with
    calibration norms (`norms[block]`: the activation norm of each channel entering the down projection),
    activation norm x the norm of its down-projection column. Returns (metrics, config fields changed)."""
    arch = layout.architecture
    blocks = list(layout.blocks)
    scores = []
    for i, block in enumerate(blocks):
        down = out_in(block.get_submodule(arch.mlp_out)).float()
        if norms is not None:
            scores.append(norms[i] * down.norm(dim=0))
        else:
            score = down.norm(dim=0)
            for path in arch.mlp_in:
                score = score * out_in(block.get_submodule(path)).float().norm(dim=1)
            scores.append(score)
    keep = keep_counts(scores, sparsity, scope)
    for block, idx in zip(blocks, keep, strict=True):
        for path in arch.mlp_in:
            _set(block, path, slice_out(block.get_submodule(path), idx))
        _set(block, arch.mlp_out, slice_in(block.get_submodule(arch.mlp_out), idx))
    kept = [len(idx) for idx in keep]
    changed = layout.set_config("mlp_width", kept[0]) if _uniform(kept) else {}
    return {"mlp_channels_kept": kept}, changed


def _head_shapes(layout: Layout, block: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of one block, read from its weight shapes."""
    arch = layout.architecture
    dim = layout.head_dim()
    rows = [out_in(block.get_submodule(p)).shape[0] for p in arch.attention_in]
    if arch.fused_qkv:
        return rows[0] // 3 // dim, rows[0] // 3 // dim, dim
    return rows[0] // dim, rows[1] // dim, dim


def prune_heads(layout: Layout, sparsity: float, scope: str, norms: dict[int, Any] | None,
                names: dict[Any, str]) -> tuple[dict, dict, dict]:
    """Remove attention heads; under grouped-query attention a key/value group leaves with the query heads
    that read it, so the ratio of query to key/value heads, and the model's shapes, stay valid. A group's
    importance sums its query heads': the norm of their output-projection columns times the norms of their
    query/key/value rows, or times the activation norm entering the output projection (with calibration).
    Returns (metrics, module attributes to record, config fields changed)."""
    import torch

    arch = layout.architecture
    blocks = list(layout.blocks)
    scores, shapes = [], []
    for i, block in enumerate(blocks):
        heads, kv, dim = _head_shapes(layout, block)
        ratio = heads // kv
        o = out_in(block.get_submodule(arch.attention_out)).float().reshape(-1, heads, dim)
        if norms is not None:
            per_head = norms[i].reshape(heads, dim).norm(dim=1) * o.norm(dim=(0, 2))
        else:
            w = [out_in(block.get_submodule(p)).float() for p in arch.attention_in]
            q, k, v = w[0].chunk(3) if arch.fused_qkv else w
            kv_norm = k.reshape(kv, dim, -1).norm(dim=(1, 2)) * v.reshape(kv, dim, -1).norm(dim=(1, 2))
            per_head = q.reshape(heads, dim, -1).norm(dim=(1, 2)) * kv_norm.repeat_interleave(ratio) \
                * o.norm(dim=(0, 2))
        scores.append(per_head.reshape(kv, ratio).sum(1))
        shapes.append((heads, kv, dim))
    keep = keep_counts(scores, sparsity, scope)
    overrides, kept_heads, kept_groups = {}, [], []
    for block, groups, (heads, kv, dim) in zip(blocks, keep, shapes, strict=True):
        ratio = heads // kv
        q_heads = [g * ratio + r for g in groups.tolist() for r in range(ratio)]
        q_dims = torch.cat([torch.arange(h * dim, (h + 1) * dim) for h in q_heads])
        kv_dims = torch.cat([torch.arange(g * dim, (g + 1) * dim) for g in groups.tolist()])
        if arch.fused_qkv:
            width = heads * dim
            path = arch.attention_in[0]
            _set(block, path, slice_out(block.get_submodule(path),
                                        torch.cat([q_dims, width + kv_dims, 2 * width + kv_dims])))
        else:
            for path, dims in zip(arch.attention_in, (q_dims, kv_dims, kv_dims), strict=True):
                _set(block, path, slice_out(block.get_submodule(path), dims))
        _set(block, arch.attention_out, slice_in(block.get_submodule(arch.attention_out), q_dims))
        if arch.head_attributes is not None:
            attention = block.get_submodule(arch.attention)
            attrs = arch.head_attributes(attention, len(q_heads), dim)
            for attr, value in attrs.items():
                setattr(attention, attr, value)
            overrides[names[attention]] = attrs
        kept_heads.append(len(q_heads))
        kept_groups.append(len(groups))
    changed: dict[str, Any] = {}
    if _uniform(kept_heads):
        changed.update(layout.set_config("head_dim", shapes[0][2]))  # before the count it was derived from
        changed.update(layout.set_config("heads", kept_heads[0]))
        changed.update(layout.set_config("kv_heads", kept_groups[0]))
    metrics = {"heads_kept": kept_heads}
    if any(h != g for h, g in zip(kept_heads, kept_groups, strict=True)):
        metrics["kv_heads_kept"] = kept_groups
    return metrics, overrides, changed


def block_importance(module: Any, layout: Layout, batches: list[dict[str, Any]]) -> list[float]:
    """How much each block changes the hidden state it is given: 1 - cosine(input, output) averaged over
    real tokens of calibration data (the "block influence" of ShortGPT; a block that barely turns the
    residual stream can go with the least harm)."""
    import torch

    count = len(layout.blocks)
    totals, tokens = [0.0] * count, 0
    with torch.inference_mode():
        for batch in batches:
            inputs = inputs_for(module, batch, "cpu")
            out = call_module(module, {**inputs, "output_hidden_states": True})
            hidden = out.hidden_states  # embeddings, then each block's output
            real = inputs["attention_mask"].bool() if "attention_mask" in inputs else None
            for i in range(count):
                a, b = hidden[i].float(), hidden[i + 1].float()
                cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
                totals[i] += float((1 - cos)[real].sum() if real is not None else (1 - cos).sum())
            tokens += int(real.sum()) if real is not None else hidden[0].shape[0] * hidden[0].shape[1]
    return [t / max(tokens, 1) for t in totals]


def prune_blocks(layout: Layout, sparsity: float, importance: list[float]) -> tuple[dict, dict]:
    """Remove round(sparsity x blocks) whole blocks, the least important first (at least one is kept)."""
    count = len(importance)
    remove = min(count - 1, round(count * sparsity))
    if remove < 1:
        raise PassError(f"target = 'layers' with sparsity {sparsity} removes no block of {count}; raise sparsity "
                        f"to at least {1 / count:.3f}")
    order = sorted(range(count), key=lambda i: importance[i])
    kept = sorted(set(range(count)) - set(order[:remove]))
    changed = keep_blocks(layout, kept)
    return {"blocks_kept": kept, "block_importance": [round(v, 6) for v in importance]}, changed


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
    keep = keep_counts(scores, sparsity, scope)
    kept = []
    for (a, b), idx in zip(pairs, keep, strict=True):
        if isinstance(seq[a], torch.nn.Conv2d) and isinstance(seq[b], torch.nn.Linear):
            raise ValueError("a Conv2d followed (through Flatten) by a Linear cannot lose channels here")
        seq[a] = slice_out(seq[a], idx)
        for j in range(a + 1, b):
            if isinstance(seq[j], torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                seq[j] = _slice_norm(seq[j], idx)
        seq[b] = slice_in(seq[b], idx)
        kept.append(len(idx))
    return {"units_kept": kept}


def _slice_norm(norm: Any, idx: Any) -> Any:
    new = type(norm)(len(idx), eps=norm.eps, momentum=norm.momentum)
    for attr in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, attr).data.copy_(getattr(norm, attr).detach()[idx])
    return new
