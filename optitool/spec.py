"""The tables of a pipeline file as typed, validated models.

A leaf module (it imports nothing else of optitool) so that loaders, data sources, benchmarks and the
config parser can all name these types without importing each other.
"""

from __future__ import annotations

import string
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PositiveInt = Annotated[int, Field(ge=1)]
OUTPUT_PLACEHOLDERS = ("name",)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpec(_Section):
    """One model input for models without a tokenizer: shape with "batch" (and "sequence") as named axes."""

    shape: list[int | Literal["batch", "sequence"]]
    dtype: Literal["float32", "float16", "int64", "int32", "bool"] = "float32"
    low: float = 0.0
    high: float = 1.0

    @field_validator("shape")
    @classmethod
    def _positive_dims(cls, shape: list[Any]) -> list[Any]:
        if any(isinstance(d, int) and d < 1 for d in shape):
            raise ValueError(f"every fixed dimension must be at least 1 (got {shape})")
        return shape


class ModelSpec(_Section):
    source: str
    path: str | None = None
    name: str | None = None
    factory: str | None = None
    checkpoint: str | None = None
    task: str | None = None
    num_labels: int | None = Field(default=None, ge=1)
    max_length: int = Field(default=128, ge=1)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, InputSpec] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("inputs", mode="before")
    @classmethod
    def _shape_lists(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: ({"shape": v} if isinstance(v, list) else v) for k, v in value.items()}
        return value


SplitName = Literal["train", "validation", "calibration", "eval"]


class DataSpec(_Section):
    source: Literal["folder", "jsonl", "csv", "parquet", "hf_disk", "python", "synthetic", "samples"] = "samples"
    path: str | None = None
    function: str | None = None
    text_field: str = "text"
    label_field: str | None = "label"
    labels: list[str] | None = None
    limit: int | None = Field(default=None, ge=1)
    max_length: int | None = Field(default=None, ge=1)
    size: int = Field(default=256, ge=1)
    splits: dict[SplitName, float] = Field(
        default_factory=lambda: {"train": 0.6, "calibration": 0.1, "eval": 0.3})

    @field_validator("splits")
    @classmethod
    def _check_splits(cls, splits: dict[str, float]) -> dict[str, float]:
        fractions = [v for v in splits.values() if 0 < v < 1]
        if any(v <= 0 for v in splits.values()):
            raise ValueError("each split is a fraction in (0, 1) or a count >= 1")
        if any(v >= 1 and v != int(v) for v in splits.values()):
            raise ValueError("a split of 1 or more is a count and must be a whole number")
        if sum(fractions) > 1.0 + 1e-9:
            raise ValueError(f"the split fractions add up to {sum(fractions):.3g}, more than 1")
        return splits

    @property
    def reads_examples(self) -> bool:
        """False for sources that make seeded random inputs instead of reading examples."""
        return self.source not in ("synthetic", "samples")

    @property
    def has_labels(self) -> bool:
        """What the pipeline declares; the data itself is checked when it is read."""
        return self.reads_examples and bool(self.label_field)

    def declares_split(self, split: str) -> bool:
        return self.reads_examples and split in self.splits


class BenchmarkSpec(_Section):
    enabled: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    runtimes: list[str] = Field(default_factory=lambda: ["torch_eager", "onnxruntime"], min_length=1)
    batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1, 8], min_length=1)
    sequence_lengths: list[PositiveInt] = Field(default_factory=lambda: [128], min_length=1)
    warmup: int = Field(default=3, ge=0)
    min_iterations: int = Field(default=10, ge=3)
    max_iterations: int = Field(default=200, ge=3)
    min_seconds: float = Field(default=1.0, ge=0)
    threads: int = Field(default=0, ge=0)
    new_tokens: int = Field(default=32, ge=2)  # causal LMs: tokens generated after each prompt
    memory: bool = True
    stages: list[str] | Literal["all"] = "all"


class EvaluationSpec(_Section):
    """lm-eval tasks scored on chosen stages (`optitool.lm_tasks`), each on the same items as the baseline."""

    tasks: list[str] = Field(min_length=1)
    limit: int | None = Field(default=None, ge=1)  # items per task (the first ones, as lm-eval's --limit)
    num_fewshot: int | None = Field(default=None, ge=0)
    stages: list[str] = Field(default_factory=lambda: ["baseline", "final"], min_length=1)
    max_length: int | None = Field(default=None, ge=2)  # tokens the model sees; default: its context length


class BudgetSpec(_Section):
    max_accuracy_drop: float | None = Field(default=None, ge=0)
    min_fidelity: float | None = None
    max_perplexity_increase: float | None = Field(default=None, ge=0)  # relative: 0.05 = +5 % over the baseline
    min_token_agreement: float | None = Field(default=None, ge=0, le=1)
    min_generation_agreement: float | None = Field(default=None, ge=0, le=1)
    min_speedup: float | None = Field(default=None, gt=0)
    max_latency_ms: float | dict[str, float] | None = None
    max_size_mb: float | None = Field(default=None, gt=0)
    max_peak_memory_mb: float | None = Field(default=None, gt=0)
    max_task_drop: dict[str, float] | None = None  # lm-eval task -> largest drop of its main metric
    no_significant_task_drop: bool | list[str] = False  # tasks (true: all) whose paired interval must reach 0
    stage: str = "final"

    @field_validator("max_task_drop")
    @classmethod
    def _drops_not_negative(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        negative = [k for k, v in (value or {}).items() if v < 0]
        if negative:
            raise ValueError(f"a drop limit is 0 or more (the task {negative[0]!r} has {value[negative[0]]})")
        return value


class OutputSpec(_Section):
    dir: str = "runs/{name}"
    plots: bool = True
    keep_artifacts: bool = True

    @field_validator("dir")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a valid folder template ({exc}); write {{{{ and }}}} for "
                             "literal braces") from None
        unknown = [f for f in fields if f not in OUTPUT_PLACEHOLDERS]
        if unknown:
            known = ", ".join("{" + p + "}" for p in OUTPUT_PLACEHOLDERS)
            raise ValueError(f"unknown placeholder {{{unknown[0]}}} in {value!r}; the folder template knows {known}")
        return value

    def folder(self, name: str) -> str:
        return self.dir.format(name=name)
