"""The magnitude_prune pass: mask-based pruning (unstructured or N:M, by magnitude or Wanda, at once or on a
cubic schedule during distillation). Structured width and depth pruning are their own passes
(structured_passes.py); `pattern = "structured"` still runs them for one release, with a flag saying what to
write instead."""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from optitool import Pass, PassConfig, PassContext, PassError, TorchModel, is_conv1d
from optitool_prune.structured_passes import refuse_unused

DEFAULT_EXCLUDE = ["*classifier*", "*lm_head*", "*pooler*", "*score*"]
N_M = re.compile(r"^(\d+):(\d+)$")


class PruneConfig(PassConfig):
    sparsity: float | None = Field(None, gt=0, lt=1, description="fraction of covered weights (or units) removed")
    pattern: str = Field("unstructured", description="unstructured, N:M (e.g. 2:4, N kept of every M) or structured")
    scope: Literal["global", "layer"] = Field("global", description="one threshold for all layers, or per layer")
    target: Literal["ffn", "heads", "ffn+heads", "layers"] = Field(
        "ffn", description="structured pruning of transformers: MLP (FFN) channels, attention heads (key/value "
        "groups with their query heads), both, or whole blocks (sparsity = the fraction of blocks removed, the "
        "least important by calibration data)")
    include: list[str] = Field(default_factory=lambda: ["*"], description="module name patterns covered")
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE), description="module name patterns left")
    criterion: Literal["magnitude", "wanda"] = Field(
        "magnitude", description="what is pruned: the smallest |weight|, or the smallest |weight| x input norm "
        "within each output row (Wanda; needs a calibration split); structured: channels and heads by weight "
        "norms, or by activation norm x weight norm with wanda")
    calibration_samples: int = Field(64, ge=1, description="with criterion = wanda: calibration examples (or "
                                     "token blocks of a causal LM) that give the input norms")
    schedule: Literal["oneshot", "cubic"] = Field(
        "oneshot", description="cubic: prune gradually during the next distill pass (unstructured only)")
    frequency: int = Field(10, ge=1, description="with schedule = cubic: optimizer steps between mask updates")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        match = N_M.match(value)
        if value not in ("unstructured", "structured") and not match:
            raise ValueError("pattern is 'unstructured', 'structured' or 'N:M' like '2:4'")
        if match and not 0 < int(match[1]) < int(match[2]):
            raise ValueError("in N:M, N (weights kept) must be between 1 and M - 1")
        return value

    @model_validator(mode="after")
    def _sparsity_needed(self) -> PruneConfig:
        if self.sparsity is None and not N_M.match(self.pattern):
            raise ValueError(f"sparsity is required with pattern = {self.pattern!r}")
        if self.schedule == "cubic" and self.pattern != "unstructured":
            raise ValueError("schedule = 'cubic' works with pattern = 'unstructured'")
        if self.criterion == "wanda" and self.schedule != "oneshot":
            raise ValueError("criterion = 'wanda' works with schedule = 'oneshot'")
        match = N_M.match(self.pattern)
        if match and self.sparsity is not None and abs(self.sparsity - (1 - int(match[1]) / int(match[2]))) > 1e-9:
            raise ValueError(f"pattern {self.pattern} means sparsity {1 - int(match[1]) / int(match[2])}; "
                             "leave sparsity out")
        self._refuse_unused()
        return self

    def _refuse_unused(self) -> None:
        structured, depth = self.pattern == "structured", self.pattern == "structured" and self.target == "layers"
        unused: dict[str, str] = {}
        if not structured:
            unused["target"] = (f"with pattern = {self.pattern!r} (structured pruning is the structured_prune and "
                                "depth_prune passes)")
        if self.criterion != "wanda" and not depth:
            unused["calibration_samples"] = "with criterion = 'magnitude'"
        if self.schedule != "cubic":
            unused["frequency"] = "with schedule = 'oneshot'"
        if N_M.match(self.pattern):
            unused["scope"] = f"with pattern = {self.pattern!r} (every group of M keeps N)"
        if structured:
            unused.update(include="with pattern = 'structured'", exclude="with pattern = 'structured'")
        if depth:
            unused.update(criterion="with target = 'layers' (blocks are ranked by their influence)",
                          scope="with target = 'layers'")
        refuse_unused(self, unused)


class MagnitudePrune(Pass):
    """Prune the smallest-magnitude weights: unstructured, N:M (2:4) or structured (removes units and heads)."""

    name = "magnitude_prune"
    compresses = True
    Config = PruneConfig
    takes = "torch"
    gives = "torch"

    def data_needs(self) -> dict[str, str]:
        cfg: PruneConfig = self.config
        by_data = cfg.criterion == "wanda" or (cfg.pattern == "structured" and cfg.target == "layers")
        return {"calibration": "inputs"} if by_data else {}

    def covered_layers(self, module: Any) -> dict[str, Any]:
        """Weight name -> layer, for covered(): the layers whose inputs Wanda measures."""
        import torch

        cfg: PruneConfig = self.config
        found = {}
        for name, sub in module.named_modules():
            if not (isinstance(sub, torch.nn.Linear | torch.nn.Conv1d | torch.nn.Conv2d) or is_conv1d(sub)):
                continue
            if any(fnmatch.fnmatch(name, p) for p in cfg.include) and not any(
                    fnmatch.fnmatch(name, p) for p in cfg.exclude):
                found[f"{name}.weight"] = sub
        return found

    def covered(self, module: Any) -> dict[str, Any]:
        """Weights of Linear and Conv layers (GPT-2's transposed Conv1D included) whose names match include
        and not exclude."""
        return {name: layer.weight for name, layer in self.covered_layers(module).items()}

    def run(self, model: TorchModel, ctx: PassContext) -> TorchModel:
        if self.config.pattern == "structured":
            return self._instead(ctx).run(model, ctx)
        import torch

        cfg: PruneConfig = self.config
        weights = self.covered(model.module)
        if not weights:
            raise PassError(f"no Linear, Conv or Conv1D weights match include={cfg.include} exclude={cfg.exclude}")
        if cfg.schedule == "cubic":
            return self._hand_on_gradual(model, weights, ctx)
        match = N_M.match(cfg.pattern)
        from optitool_prune.masks import global_masks, layer_mask, n_m_mask

        transposed = {f"{n_}.weight" for n_, sub in model.module.named_modules() if is_conv1d(sub)}
        if cfg.criterion == "wanda":
            masks = self._wanda(model, weights, transposed, ctx)
        elif match:
            n, m = int(match[1]), int(match[2])
            masks = {}
            for name, w in weights.items():
                try:  # groups run along the input dimension: the first of a Conv1D's [in, out] weight
                    masks[name] = n_m_mask(w.t(), n, m).t() if name in transposed else n_m_mask(w, n, m)
                except ValueError as exc:
                    raise PassError(f"{name}: {exc}; exclude that layer for pattern {cfg.pattern}") from None
        elif cfg.scope == "global":
            masks = global_masks(weights, cfg.sparsity)
        else:
            masks = {name: layer_mask(w, cfg.sparsity) for name, w in weights.items()}
        if match:
            ctx.metrics["runtime_note"] = (f"{cfg.pattern} sparsity runs faster only where a kernel exploits it: "
                                           "torch.sparse semi-structured (2:4) on CUDA GPUs with sparse tensor "
                                           "cores; on CPU and in onnxruntime the zeros run on dense kernels")
        with torch.no_grad():
            for name, w in weights.items():
                w.mul_(masks[name].to(w.dtype))
        existing = dict(model.masks)
        for name, mask in masks.items():
            existing[name] = mask & existing[name] if name in existing else mask
        model.masks = {k: v.cpu() for k, v in existing.items()}
        ctx.state["masks"] = model.masks
        per_layer = {name: round(1 - float(masks[name].float().mean()), 6) for name in weights}
        covered = sum(w.numel() for w in weights.values())
        zeros = sum(int((w == 0).sum()) for w in weights.values())
        ctx.metrics.update(pattern=cfg.pattern, criterion=cfg.criterion, covered_parameters=covered,
                           covered_sparsity=round(zeros / covered, 6), sparsity_per_layer=per_layer)
        return model

    def _wanda(self, model: TorchModel, weights: dict[str, Any], transposed: set[str],
               ctx: PassContext) -> dict[str, Any]:
        """Masks from |W| x input norm, per output row (unstructured) or per group of M inputs (N:M)."""
        from optitool_prune.masks import n_m_mask
        from optitool_prune.wanda import input_norms, row_mask, scores

        cfg: PruneConfig = self.config
        batches = self._calibration_batches(model, ctx)
        layers = self.covered_layers(model.module)
        norms = input_norms(model.module, layers, batches)
        match = N_M.match(cfg.pattern)
        masks = {}
        for name, w in weights.items():
            if name not in norms:
                raise PassError(f"criterion = 'wanda': {name} saw no input during calibration (a layer the "
                                "forward pass does not reach); exclude it")
            score = scores(w, norms[name], name in transposed)
            if name in transposed:
                score = score.t()  # [out, in] for the per-row / per-group choice
            try:
                mask = n_m_mask(score, int(match[1]), int(match[2])) if match else row_mask(score, cfg.sparsity)
            except ValueError as exc:
                raise PassError(f"{name}: {exc}; exclude that layer for pattern {cfg.pattern}") from None
            masks[name] = mask.t() if name in transposed else mask
        return masks

    def _calibration_batches(self, model: TorchModel, ctx: PassContext) -> list[dict[str, Any]]:
        """Inputs of the calibration split: token blocks for a causal LM (4 a batch), else batches of 8."""
        from optitool import calibration_batches

        return calibration_batches(model, ctx, self.config.calibration_samples, why="criterion = 'wanda'")

    def _hand_on_gradual(self, model: TorchModel, weights: dict[str, Any], ctx: PassContext) -> TorchModel:
        from optitool_prune.gradual import GradualPruner

        cfg: PruneConfig = self.config
        pruner = GradualPruner(target=cfg.sparsity, scope=cfg.scope, weight_names=list(weights),
                               frequency=cfg.frequency)
        ctx.hand_on("gradual_pruning", pruner, unless_taken=(
            "magnitude_prune with schedule = 'cubic' prunes during training, but no distill pass followed it; "
            "add one after it or use schedule = 'oneshot'"))
        ctx.metrics.update(pattern="unstructured", schedule="cubic", target_sparsity=cfg.sparsity,
                           note="weights are pruned during the next distill pass")
        return model

    def _instead(self, ctx: PassContext) -> Pass:
        """The pass `pattern = "structured"` now stands for, with the same settings; the stage says what to write."""
        from optitool_prune.structured_passes import (
            DepthConfig,
            DepthPrune,
            StructuredConfig,
            StructuredPrune,
        )

        cfg: PruneConfig = self.config
        if cfg.target == "layers":
            instead: Pass = DepthPrune(DepthConfig(sparsity=cfg.sparsity, calibration_samples=cfg.calibration_samples))
            write = f'pass = "depth_prune", sparsity = {cfg.sparsity}'
        else:
            settings: dict[str, Any] = {"sparsity": cfg.sparsity, "target": cfg.target, "scope": cfg.scope,
                                        "criterion": cfg.criterion}
            if cfg.criterion == "wanda":
                settings["calibration_samples"] = cfg.calibration_samples
            instead = StructuredPrune(StructuredConfig(**settings))
            write = "pass = \"structured_prune\", " + ", ".join(
                f"{k} = {v!r}".replace("'", '"') for k, v in settings.items())
        ctx.flag(f"magnitude_prune with pattern = 'structured' is deprecated and goes in the next release; write "
                 f"{write}")
        return instead
