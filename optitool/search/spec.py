"""The `[search]` table: which pipeline keys vary, what is optimised, how trials are drawn. Checked with the
rest of the pipeline by optitool.config (by `validate`, before any model loads): every parameter must name a
pass setting and every value it can take must be one that pass's Config accepts."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PARAMETER = re.compile(r"^passes\.(\d+)\.([A-Za-z_]\w*)$")
# what an objective may name besides the registered metrics: the final stage's latency and size, its size
# figures, and the language-model metrics every causal LM stage gets
STAGE_OBJECTIVES = ("latency_ms", "size_mb", "parameters", "nonzero_parameters", "sparsity", "perplexity",
                    "token_agreement", "kl_to_baseline", "generation_agreement")


class Range(BaseModel):
    """A numeric range; integers when low and high are integers (and step, if given)."""

    model_config = ConfigDict(extra="forbid")
    low: float
    high: float
    step: float | None = Field(None, gt=0)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.high <= self.low:
            raise ValueError(f"high ({self.high}) must be above low ({self.low})")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log = true needs low > 0 and no step")
        return self

    @property
    def integer(self) -> bool:
        return all(float(v).is_integer() for v in (self.low, self.high, self.step or 1))

    def grid(self) -> list[Any]:
        """Every value a grid search visits (needs a step)."""
        if self.step is None:
            raise ValueError("a range in a grid search needs a step")
        count = int(round((self.high - self.low) / self.step)) + 1
        values = [self.low + i * self.step for i in range(count) if self.low + i * self.step <= self.high + 1e-12]
        return [int(v) if self.integer else round(v, 10) for v in values]

    def ends(self) -> list[Any]:
        return [int(self.low), int(self.high)] if self.integer else [self.low, self.high]


class SearchSpec(BaseModel):
    """`[search]` in a pipeline file. `objectives` maps a final-stage metric (accuracy, fidelity, perplexity,
    ...) or `latency_ms` / `size_mb` to "minimize" or "maximize"; the pipeline's `[budget]` is the
    constraint every trial must meet to count."""

    model_config = ConfigDict(extra="forbid")
    parameters: dict[str, list[Any] | Range] = Field(min_length=1)
    objectives: dict[str, Literal["minimize", "maximize"]] = Field(
        default_factory=lambda: {"latency_ms": "minimize"}, min_length=1)
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    trials: int | None = Field(None, ge=1, description="trials in all, counting earlier ones of a resumed search")
    timeout_minutes: float | None = Field(None, gt=0)
    seed: int | None = None
    latency_shape: str | None = Field(None, description="benchmark shape of the latency objective, e.g. '8x128'; "
                                      "default: the first measured")
    cpus_per_trial: int = Field(1, ge=1, description="with --executor ray: CPUs each trial task reserves")
    concurrency: int | None = Field(None, ge=1, description="with --executor ray: trials at once (default: as "
                                    "many as the CPUs allow)")

    @model_validator(mode="after")
    def _bounded(self) -> SearchSpec:
        if self.trials is None and self.timeout_minutes is None and self.sampler != "grid":
            raise ValueError("say how long to search: trials = N and/or timeout_minutes = M")
        for key, value in self.parameters.items():
            if isinstance(value, list) and not value:
                raise ValueError(f"parameter {key!r} has no choices")
        return self

    def grid(self) -> dict[str, list[Any]]:
        return {k: (v.grid() if isinstance(v, Range) else list(v)) for k, v in self.parameters.items()}


def set_parameter(raw: dict[str, Any], key: str, value: Any) -> None:
    """Put one trial's value into a raw pipeline (a `passes.N.setting` key)."""
    match = PARAMETER.match(key)
    assert match is not None
    raw["passes"][int(match[1])][match[2]] = value
