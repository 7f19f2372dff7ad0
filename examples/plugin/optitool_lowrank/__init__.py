"""acme.lowrank: replace each covered Linear layer by two thinner ones from a truncated SVD.

A (out x in) weight W becomes B (out x r) @ A (r x in), with r chosen per layer by a fixed `rank` or by
the fraction of spectral energy kept. A layer is only replaced when that saves parameters, so the model
never grows. This is a third-party plugin: it uses only optitool's public API.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from pydantic import Field, model_validator

import optitool

OPTITOOL_API_VERSION = 1
__version__ = "0.1.0"


class LowRankConfig(optitool.PassConfig):
    rank: int | None = Field(None, ge=1, description="fixed rank for every layer")
    energy: float | None = Field(None, gt=0, le=1, description="keep this fraction of the squared singular values")
    include: list[str] = Field(default_factory=lambda: ["*"], description="module name patterns")
    exclude: list[str] = Field(default_factory=lambda: ["*classifier*", "*pooler*"], description="left as they are")

    @model_validator(mode="after")
    def _one_of(self) -> LowRankConfig:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("give exactly one of rank or energy")
        return self


def _rank(singular: Any, cfg: LowRankConfig) -> int:
    if cfg.rank is not None:
        return min(cfg.rank, len(singular))
    energy = (singular**2).cumsum(0) / (singular**2).sum()
    return int((energy < cfg.energy).sum()) + 1


class LowRank(optitool.Pass):
    """Factorise Linear layers into two thinner ones (truncated SVD)."""

    name = "acme.lowrank"
    Config = LowRankConfig
    takes = "torch"
    gives = "torch"

    def run(self, model: optitool.TorchModel, ctx: optitool.PassContext) -> optitool.TorchModel:
        import torch

        cfg: LowRankConfig = self.config
        ranks: dict[str, int] = {}
        for name, sub in list(model.module.named_modules()):
            if not isinstance(sub, torch.nn.Linear) or not any(fnmatch.fnmatch(name, p) for p in cfg.include):
                continue
            if any(fnmatch.fnmatch(name, p) for p in cfg.exclude):
                continue
            u, s, vh = torch.linalg.svd(sub.weight.detach().float(), full_matrices=False)
            r = _rank(s, cfg)
            if r * (sub.in_features + sub.out_features) >= sub.in_features * sub.out_features:
                continue  # factorising would not save parameters
            first = torch.nn.Linear(sub.in_features, r, bias=False)
            second = torch.nn.Linear(r, sub.out_features, bias=sub.bias is not None)
            first.weight.data.copy_(vh[:r] * s[:r, None].sqrt())
            second.weight.data.copy_(u[:, :r] * s[:r].sqrt())
            if sub.bias is not None:
                second.bias.data.copy_(sub.bias.detach())
            parent_name, _, child = name.rpartition(".")
            parent = model.module.get_submodule(parent_name) if parent_name else model.module
            setattr(parent, child, torch.nn.Sequential(first, second))
            ranks[name] = r
        if not ranks:
            raise optitool.PassError("no Linear layer would get smaller at this rank/energy; lower it")
        ctx.metrics.update(factorised_layers=len(ranks), ranks=ranks)
        model.reloadable = False  # the factorised structure is not rebuilt by the original loader
        return model


@optitool.hookimpl
def optitool_register_passes(registry: Any) -> None:
    registry.add(LowRank)
