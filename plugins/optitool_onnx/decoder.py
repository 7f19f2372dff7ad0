"""Exporting a causal LM with its KV cache: one graph for the prefill and every decode step.

The graph takes `input_ids`, `attention_mask` (past and new tokens) and `past_key_values.N.key|value`
[batch, kv_heads, past, head_dim], and gives `logits` and `present.N.key|value`: the layout Optimum's
merged model and onnxruntime-genai use, so one loop (optitool.onnx_decoding) runs all of them. Positions
are computed in the graph from the attention mask, so left-padded batches decode as generate() does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from optitool import PassError, TorchModel, cache_argument


class CacheShape(NamedTuple):
    layers: int
    kv_heads: int
    head_dim: int


def cache_tensors(cache: Any) -> list[Any]:
    """[key0, value0, key1, value1, ...] of a transformers cache object (or a legacy tuple of pairs)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [t for layer in layers for t in (layer.keys, layer.values)]
    return [t for pair in cache for t in pair[:2]]


def probe_cache(module: Any, ids: Any) -> CacheShape:
    """Run the model once with its cache on: the cache it returns says the layout, whatever the family.
    A model that returns none cannot be exported with one."""
    import torch

    try:
        with torch.inference_mode():
            out = module(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        cache = out[cache_argument(module)] if hasattr(out, "keys") else None
    except (TypeError, ValueError, KeyError) as exc:
        raise PassError(f"kv_cache = true: {type(module).__name__} did not return a KV cache "
                        f"({type(exc).__name__}: {exc}); only causal language models with a cache can be exported "
                        "with one: set kv_cache = false") from None
    tensors = cache_tensors(cache) if cache is not None else []
    if not tensors or any(t is None or t.dim() != 4 for t in tensors):
        raise PassError(f"kv_cache = true: {type(module).__name__} keeps no [batch, heads, length, head_dim] "
                        "KV cache (an encoder, or a cache layout optitool does not export); set kv_cache = false")
    return CacheShape(len(tensors) // 2, tensors[0].shape[1], tensors[0].shape[3])


def with_past_adapter(module: Any, layers: int) -> Any:
    """The model as a function of flat tensors: (input_ids, attention_mask, *past) -> (logits, *present).
    (Built in a function: torch must not be imported when the plugin is.)"""
    import torch
    from transformers import DynamicCache

    key = cache_argument(module)

    class _WithPast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *args: Any) -> Any:
            input_ids, attention_mask, past = args[0], args[1], args[2:]
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(layers)],
                                 config=self.inner.config)
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             use_cache=True, **{key: cache})
            return (out.logits, *cache_tensors(out[key]))

    return _WithPast()


def io_names(layers: int) -> tuple[list[str], list[str]]:
    kinds = ("key", "value")
    return (["input_ids", "attention_mask"] + [f"past_key_values.{i}.{k}" for i in range(layers) for k in kinds],
            ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in kinds])


def export_with_past(model: TorchModel, path: Path, opset: int, external_data: bool) -> CacheShape:
    """torch.onnx's dynamo exporter on the with-past adapter, traced with a non-empty past (2 sequences,
    5 new tokens after 3 cached) and every batch and length axis dynamic; an empty past (the prefill)
    runs on the same graph."""
    import torch

    module = model.module.eval().cpu()
    vocab = int(getattr(module.config, "vocab_size", 0) or 0) or 100
    generator = torch.Generator().manual_seed(0)
    shape = probe_cache(module, torch.randint(0, vocab, (1, 4), generator=generator))
    batch, new, cached = 2, 5, 3
    ids = torch.randint(0, vocab, (batch, new), generator=generator)
    mask = torch.ones(batch, cached + new, dtype=torch.long)
    past = [torch.randn(batch, shape.kv_heads, cached, shape.head_dim, generator=generator)
            for _ in range(2 * shape.layers)]
    inputs, outputs = io_names(shape.layers)
    dynamic = torch.export.Dim.DYNAMIC
    axes = [{0: dynamic, 1: dynamic}, {0: dynamic, 1: dynamic}] + [{0: dynamic, 2: dynamic}] * (2 * shape.layers)
    try:
        program = torch.onnx.export(with_past_adapter(module, shape.layers).eval(), (ids, mask, *past), dynamo=True,
                                    input_names=inputs, output_names=outputs, opset_version=opset, optimize=True,
                                    dynamic_shapes={"args": tuple(axes)})
    except Exception as exc:  # noqa: BLE001 - the dynamo exporter raises many kinds
        raise PassError(f"the dynamo exporter failed on the with-past decoder ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'no message'}); try kv_cache = false") from None
    program.save(str(path), external_data=external_data)
    return shape


def verify_decoding(model: TorchModel, path: Path, prompts: Any, steps: int) -> dict[str, Any]:
    """Greedy tokens of the exported graph (with its cache, in onnxruntime) against torch's (with its
    cache) for `steps` tokens after each prompt: identical, or the export fails."""
    from optitool import greedy_with_cache, open_decoder

    decoder = open_decoder(path)
    if decoder is None:
        raise PassError(f"the exported graph {path} has no past key/values")
    expected = greedy_with_cache(model.module.eval().cpu(), prompts, steps).tokens
    got = decoder.greedy(prompts.numpy(), steps)[0]
    same = (expected.numpy() == got).all(axis=0)
    agreed = int(same.argmin()) if not same.all() else steps
    if agreed < steps:
        raise PassError(f"verification failed: with its KV cache in onnxruntime the exported decoder generates the "
                        f"same greedy tokens as torch for {agreed} of {steps} steps on {len(prompts)} prompts "
                        f"(step {agreed}: {got[:, agreed].tolist()} vs {expected[:, agreed].tolist()})")
    return {"export_greedy_steps_identical": agreed, "export_greedy_prompts": len(prompts)}
