"""`structured_prune` (width: MLP channels and attention heads, or hidden units of Sequential stacks) and
`depth_prune` (whole blocks): pruning that removes what it prunes, so the model is smaller and faster on any
runtime. Each is one algorithm with only the settings it uses (llm-compressor has one modifier per algorithm;
`magnitude_prune` keeps mask-based pruning)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from optitool import Pass, PassConfig, PassContext, PassError, TorchModel


def refuse_unused(config: PassConfig, unused: dict[str, str]) -> None:
    """A setting the user wrote that has no effect in the chosen mode is an error naming it and why (a typo or
    a misunderstanding must never silently do nothing). `unused`: setting -> why it has no effect. A setting
    written with its default value passes: a resolved pipeline (every default filled in, as report.json and
    the stage cache keep it) must load again."""
    fields = type(config).model_fields
    written = [k for k in unused if k in config.model_fields_set
               and getattr(config, k) != fields[k].get_default(call_default_factory=True)]
    if written:
        raise ValueError("; ".join(f"{k} has no effect {unused[k]}" for k in written) + ": remove it")


class StructuredConfig(PassConfig):
    sparsity: float = Field(gt=0, lt=1, description="fraction of the target's units removed (MLP channels, "
                            "key/value groups with their query heads, or hidden units of a Sequential stack)")
    target: Literal["ffn", "heads", "ffn+heads"] = Field(
        "ffn", description="transformers: MLP (FFN) channels, attention heads (key/value groups with their query "
        "heads), or both")
    scope: Literal["global", "layer"] = Field(
        "layer", description="layer: the same share in every block (the config keeps describing the model, so it "
        "exports); global: one ranking over all blocks (widths then differ per block)")
    criterion: Literal["magnitude", "wanda"] = Field(
        "magnitude", description="channels and heads ranked by weight norms, or by activation norm x weight norm "
        "(needs a calibration split)")
    calibration_samples: int = Field(64, ge=1, description="with criterion = wanda: calibration examples (or token "
                                     "blocks of a causal LM)")

    @model_validator(mode="after")
    def _used(self) -> StructuredConfig:
        if self.criterion != "wanda":
            refuse_unused(self, {"calibration_samples": "with criterion = 'magnitude'"})
        return self


class StructuredPrune(Pass):
    """Remove MLP channels and attention heads (or hidden units of Sequential stacks): smaller and faster."""

    name = "structured_prune"
    compresses = True
    Config = StructuredConfig
    takes = "torch"
    gives = "torch"

    def data_needs(self) -> dict[str, str]:
        return {"calibration": "inputs"} if self.config.criterion == "wanda" else {}

    def run(self, model: TorchModel, ctx: PassContext) -> TorchModel:
        import torch

        from optitool_prune.structured import prune_sequential

        cfg: StructuredConfig = self.config
        before = sum(p.numel() for p in model.module.parameters())
        try:
            layout = ctx.architecture(model.module)
        except PassError as exc:
            seq = next((m for m in [model.module, *model.module.modules()] if isinstance(m, torch.nn.Sequential)),
                       None)
            if seq is None:
                raise PassError(f"structured pruning finds transformer layers by role, and nn.Sequential stacks of "
                                f"Linear/Conv2d layers; this model is neither: {exc}. Use magnitude_prune "
                                "(unstructured or 2:4)") from None
            if cfg.target != "ffn":
                raise PassError(f"target = {cfg.target!r} prunes attention heads, and this model has none that the "
                                f"architecture registry knows ({exc}); for an nn.Sequential stack, target = 'ffn' "
                                "(the default) removes its hidden units") from None
            try:
                details = prune_sequential(seq, cfg.sparsity, cfg.scope)
            except ValueError as err:
                raise PassError(f"structured pruning: {err}") from None
        else:
            details = self._transformer(model, layout, ctx)
        after = sum(p.numel() for p in model.module.parameters())
        model.masks = {}
        ctx.metrics.update(pattern="structured", target=cfg.target, parameters_before=before,
                           parameters_removed=before - after, **details)
        return model

    def _transformer(self, model: TorchModel, layout: Any, ctx: PassContext) -> dict[str, Any]:
        """MLP channels and/or heads of a transformer whose layers the architecture registry knows."""
        from optitool import calibration_batches
        from optitool_prune.structured import prune_heads, prune_mlp
        from optitool_prune.wanda import input_norms

        cfg: StructuredConfig = self.config
        arch = layout.architecture
        details: dict[str, Any] = {"family": arch.family}
        changed: dict[str, Any] = {}
        blocks = list(layout.blocks)
        norms: dict[str, Any] | None = None
        if cfg.criterion == "wanda":  # activation norms entering the down and output projections
            watched = {f"{i}.{role}": b.get_submodule(path) for i, b in enumerate(blocks)
                       for role, path in (("mlp", arch.mlp_out), ("attention", arch.attention_out))}
            batches = calibration_batches(model, ctx, cfg.calibration_samples, why="criterion = 'wanda'")
            norms = input_norms(model.module, watched, batches)
        if "ffn" in cfg.target:
            by_block = {i: norms[f"{i}.mlp"] for i in range(len(blocks))} if norms else None
            info, config = prune_mlp(layout, cfg.sparsity, cfg.scope, by_block)
            details.update(info)
            changed.update(config)
        if "heads" in cfg.target:
            by_block = {i: norms[f"{i}.attention"] for i in range(len(blocks))} if norms else None
            names = {m: n for n, m in model.module.named_modules()}
            info, overrides, config = prune_heads(layout, cfg.sparsity, cfg.scope, by_block, names)
            details.update(info)
            changed.update(config)
            for name, attrs in overrides.items():
                model.overrides[name] = {**model.overrides.get(name, {}), **attrs}
        return {**details, "config_changed": changed}


class DepthConfig(PassConfig):
    sparsity: float = Field(gt=0, lt=1, description="fraction of the blocks removed (at least one block is kept)")
    calibration_samples: int = Field(64, ge=1, description="calibration examples (or token blocks of a causal LM) "
                                     "that rank the blocks")


class DepthPrune(Pass):
    """Remove whole blocks, those that turn the hidden state least on calibration data (block influence)."""

    keeps_widths = True

    name = "depth_prune"
    compresses = True
    Config = DepthConfig
    takes = "torch"
    gives = "torch"

    def data_needs(self) -> dict[str, str]:
        return {"calibration": "inputs"}

    def run(self, model: TorchModel, ctx: PassContext) -> TorchModel:
        from optitool import calibration_batches
        from optitool_prune.structured import block_importance, prune_blocks

        cfg: DepthConfig = self.config
        before = sum(p.numel() for p in model.module.parameters())
        layout = ctx.architecture(model.module)
        batches = calibration_batches(model, ctx, cfg.calibration_samples, why="depth_prune")
        importance = block_importance(model.module, layout, batches)
        info, changed = prune_blocks(layout, cfg.sparsity, importance)
        after = sum(p.numel() for p in model.module.parameters())
        model.masks = {}
        ctx.metrics.update(pattern="structured", target="layers", family=layout.architecture.family,
                           parameters_before=before, parameters_removed=before - after, **info,
                           config_changed=changed)
        return model
