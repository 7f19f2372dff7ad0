"""The `[search]` table: which pipeline keys vary, what is optimised, how trials are drawn. Checked with the
rest of the pipeline (by `validate`, before any model loads): every parameter must name a pass setting and
every value it can take must be one that pass's Config accepts."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from optitool.errors import ConfigError

if TYPE_CHECKING:
    from optitool.registry import Registry

PARAMETER = re.compile(r"^passes\.(\d+)\.([A-Za-z_]\w*)$")
BUILTIN_OBJECTIVES = ("latency_ms", "size_mb")


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


def parse_search(raw: dict[str, Any], where: str) -> SearchSpec | None:
    from optitool.config import format_validation_error

    table = raw.get("search")
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [search] must be a table")
    try:
        return SearchSpec.model_validate(table)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where, ("search",))) from None


def set_parameter(raw: dict[str, Any], key: str, value: Any) -> None:
    """Put one trial's value into a raw pipeline (a `passes.N.setting` key)."""
    match = PARAMETER.match(key)
    assert match is not None
    raw["passes"][int(match[1])][match[2]] = value


def check_search(search: SearchSpec, raw: dict[str, Any], registry: Registry, base_dir: Path, where: str,
                 source: Path | None) -> None:
    """Every parameter names an existing pass setting, and the pipeline with each of its values (both ends
    of a range) is valid; the objectives can be measured."""
    from optitool.config import build_spec

    passes = raw.get("passes", [])
    base = {k: v for k, v in raw.items() if k != "search"}
    for key, value in search.parameters.items():
        here = f"{where}: [search] parameters {key!r}"
        match = PARAMETER.match(key)
        if not match:
            raise ConfigError(f"{here}: a parameter is a pass setting written passes.N.setting (N from 0), "
                              "for example \"passes.0.sparsity\"")
        index, setting = int(match[1]), match[2]
        if index >= len(passes) or not isinstance(passes[index], dict):
            raise ConfigError(f"{here}: the pipeline has {len(passes)} passes (numbered from 0)")
        name = passes[index].get("pass")
        known = set(registry.pass_class(name).Config.model_fields) | {"enabled"} if name in registry.passes else set()
        if known and setting not in known:
            raise ConfigError(f"{here}: pass {name!r} has no setting {setting!r}; it has "
                              f"{', '.join(sorted(known))}")
        if search.sampler == "grid" and isinstance(value, Range) and value.step is None:
            raise ConfigError(f"{here}: a range in a grid search needs a step")
        for candidate in (value.ends() if isinstance(value, Range) else value):
            trial = copy.deepcopy(base)
            set_parameter(trial, key, candidate)
            try:
                build_spec(trial, registry, base_dir=base_dir, source=source, where=where)
            except ConfigError as exc:
                raise ConfigError(f"{here}: the value {candidate!r} is refused: {exc}") from None
    bench = raw.get("benchmark", {})
    if "latency_ms" in search.objectives and isinstance(bench, dict) and bench.get("enabled") is False:
        raise ConfigError(f"{where}: [search] objective 'latency_ms' needs the benchmark; [benchmark] "
                          "enabled = false")
