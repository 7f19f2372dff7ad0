"""Layers by role: where a transformer family keeps its blocks, attention and MLP projections, embeddings and
head. Pruning and distillation ask here instead of guessing from class names, so a family is described once
(BERT, GPT-2 with its transposed Conv1D, Llama-like decoders with grouped-query attention) and a plugin adds
another with `registry.add_architecture(...)` in `optitool_register_architectures`.

Importing this module must not import torch: registration happens when the CLI lists passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from optitool.errors import PassError


@dataclass(frozen=True)
class Architecture:
    """One family's layout, as module paths.

    `blocks` is the path of the block list inside the model, matched as a suffix ("model.layers" finds
    `model.layers` in LlamaForCausalLM and `layers` is tried for the bare LlamaModel). Role paths inside a
    block are relative to the block. `attention_in` is (query, key, value), or one fused projection whose
    outputs are query, key and value side by side (GPT-2's c_attn). `config_keys` names the config fields
    that hold a role's size ("heads", "kv_heads", "head_dim", "mlp_width", "layers"); a pass that changes
    a size changes the field when every block agrees, so the config keeps describing the model.
    `head_attributes(attention, heads, head_dim)` gives the attention module's attributes that must follow
    a change of its head count (BERT and GPT-2 store them; Llama's attention reads shapes instead).

    Where scales can be moved between layers (activation-aware quantization): `attention_norm` and `mlp_norm`
    are the norms whose outputs only the attention's, and the MLP's, input projections read (pre-norm
    families; a post-norm family such as BERT reads the residual stream itself and has none);
    `mlp_linear_in` is the MLP input projection whose outputs reach `mlp_out` through no nonlinearity (Llama's
    up_proj, multiplied by the activated gate; GPT-2's c_fc passes through a GELU and is not one).
    """

    family: str
    model_types: tuple[str, ...]
    blocks: str
    attention: str
    attention_in: tuple[str, ...]
    attention_out: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    embeddings: tuple[str, ...] = ()
    head: str | None = None
    config_keys: dict[str, str] = field(default_factory=dict)
    head_dim: Callable[[Any], int] | None = None
    head_attributes: Callable[[Any, int, int], dict[str, Any]] | None = None
    attention_norm: str | None = None
    mlp_norm: str | None = None
    mlp_linear_in: str | None = None

    @property
    def fused_qkv(self) -> bool:
        return len(self.attention_in) == 1

    def roles(self) -> dict[str, str]:
        """Every path this family expects in a block, by role (for error messages and for matching)."""
        names = ("query", "key", "value") if not self.fused_qkv else ("query_key_value",)
        out = {"attention": self.attention}
        out.update({f"attention {n}": p for n, p in zip(names, self.attention_in, strict=True)})
        out["attention output"] = self.attention_out
        out.update({f"mlp input {i}": p for i, p in enumerate(self.mlp_in)})
        out["mlp output"] = self.mlp_out
        return out


def is_conv1d(module: Any) -> bool:
    """transformers' Conv1D (GPT-2 family): a Linear whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _config_head_dim(config: Any, heads_key: str, hidden_key: str) -> int:
    explicit = getattr(config, "head_dim", None)
    return int(explicit) if explicit else int(getattr(config, hidden_key) // getattr(config, heads_key))


BERT = Architecture(
    family="bert", model_types=("bert", "roberta", "xlm-roberta", "electra", "camembert"),
    blocks="encoder.layer", attention="attention.self",
    attention_in=("attention.self.query", "attention.self.key", "attention.self.value"),
    attention_out="attention.output.dense", mlp_in=("intermediate.dense",), mlp_out="output.dense",
    embeddings=("embeddings",), head=None,
    config_keys={"mlp_width": "intermediate_size", "layers": "num_hidden_layers"},
    head_dim=lambda c: _config_head_dim(c, "num_attention_heads", "hidden_size"),
    head_attributes=lambda attention, heads, dim: {"num_attention_heads": heads, "all_head_size": heads * dim,
                                                   "attention_head_size": dim},
)
GPT2 = Architecture(
    family="gpt2", model_types=("gpt2",), blocks="transformer.h", attention="attn",
    attention_in=("attn.c_attn",), attention_out="attn.c_proj", mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj",
    embeddings=("wte", "wpe"), head="lm_head",
    config_keys={"mlp_width": "n_inner", "layers": "n_layer"},
    head_dim=lambda c: int(c.n_embd // c.n_head),
    head_attributes=lambda attention, heads, dim: {"num_heads": heads, "split_size": heads * dim},
    attention_norm="ln_1", mlp_norm="ln_2",
)
LLAMA = Architecture(
    family="llama", model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite"),
    blocks="model.layers", attention="self_attn",
    attention_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), attention_out="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj",
    embeddings=("embed_tokens",), head="lm_head",
    config_keys={"heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "head_dim": "head_dim",
                 "mlp_width": "intermediate_size", "layers": "num_hidden_layers"},
    head_dim=lambda c: _config_head_dim(c, "num_attention_heads", "hidden_size"),
    attention_norm="input_layernorm", mlp_norm="post_attention_layernorm", mlp_linear_in="mlp.up_proj",
)
BUILTIN_ARCHITECTURES = (BERT, GPT2, LLAMA)


@dataclass
class Layout:
    """An architecture found in one model: the block list (and its path) and the model's config."""

    architecture: Architecture
    module: Any
    blocks_path: str

    @property
    def blocks(self) -> Any:
        return self.module.get_submodule(self.blocks_path)

    @property
    def config(self) -> Any:
        return getattr(self.module, "config", None)

    def head_dim(self) -> int:
        if self.architecture.head_dim is None or self.config is None:
            raise PassError(f"the {self.architecture.family} layout does not say its head size")
        return self.architecture.head_dim(self.config)

    def set_config(self, role: str, value: Any) -> dict[str, Any]:
        """Set the config field of `role` (when the family names one); returns {field: value} to record."""
        key = self.architecture.config_keys.get(role)
        if key is None or self.config is None:
            return {}
        setattr(self.config, key, value)
        return {key: value}


def _blocks_path(module: Any, suffix: str) -> str | None:
    import torch

    tail = suffix.rpartition(".")[2]
    candidates = [name for name, sub in module.named_modules() if isinstance(sub, torch.nn.ModuleList)
                  and (name == suffix or name.endswith("." + suffix) or name == tail)]
    return min(candidates, key=len) if candidates else None


def _missing(module: Any, arch: Architecture) -> list[str]:
    path = _blocks_path(module, arch.blocks)
    if path is None:
        return [f"a block list at '{arch.blocks}'"]
    blocks = module.get_submodule(path)
    if not len(blocks):
        return [f"blocks in '{path}'"]
    missing = []
    for role, rel in arch.roles().items():
        try:
            blocks[0].get_submodule(rel)
        except AttributeError:
            missing.append(f"{role} '{path}.0.{rel}'")
    return missing


def find_architecture(module: Any, architectures: Iterable[Architecture] = BUILTIN_ARCHITECTURES) -> Layout:
    """The layout of `module` among `architectures`: by the config's model_type first, then by the first
    family whose every role is present. Raises PassError saying what the closest family lacks."""
    known = list(architectures)
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    ordered = sorted(known, key=lambda a: model_type not in a.model_types)
    reports = []
    for arch in ordered:
        missing = _missing(module, arch)
        if not missing:
            return Layout(arch, module, _blocks_path(module, arch.blocks) or "")
        reports.append((len(missing), arch, missing))
    if not reports:
        raise PassError("no architecture families are registered")
    _, closest, missing = min(reports, key=lambda r: (model_type not in r[1].model_types,
                                                      r[2][0].startswith(("a block list", "blocks in")), r[0]))
    families = ", ".join(a.family for a in known)
    raise PassError(
        f"{type(module).__name__} (model_type {model_type!r}) has no layout optitool knows ({families}); the "
        f"closest, {closest.family}, lacks {'; '.join(missing[:4])}. A plugin can describe this family with "
        "optitool_register_architectures (see docs/plugins.md)")


def keep_blocks(layout: Layout, indices: list[int]) -> dict[str, Any]:
    """Keep only the blocks at `indices` (in order), renumbering what indexes the KV cache (`layer_idx`) and
    the config's layer count and per-layer lists, so the shallower model runs, generates and saves like one
    built that deep. Returns the config fields changed."""
    import torch

    blocks = layout.blocks
    kept = torch.nn.ModuleList([blocks[i] for i in indices])
    for new_index, block in enumerate(kept):
        for sub in block.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new_index
    parent_path, _, attr = layout.blocks_path.rpartition(".")
    parent = layout.module.get_submodule(parent_path) if parent_path else layout.module
    setattr(parent, attr, kept)
    changed = layout.set_config("layers", len(indices))
    config = layout.config
    for key in ("layer_types",):  # per-layer lists (sliding or full attention) follow the kept layers
        values = getattr(config, key, None) if config is not None else None
        if isinstance(values, list) and len(values) == len(blocks):
            setattr(config, key, [values[i] for i in indices])
            changed[key] = getattr(config, key)
    return changed
