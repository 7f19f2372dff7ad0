"""The pass contract third-party plugins code against: `Pass`, `PassConfig` and `PassContext`.

This module must stay importable without torch: `optitool passes` lists passes and schemas at CLI speed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from optitool.errors import PassError

if TYPE_CHECKING:
    from optitool.architectures import Architecture, Layout
    from optitool.artifacts import ModelArtifact
    from optitool.data.inputs import Batch, InputSource

KINDS = ("torch", "onnx")


class PassConfig(BaseModel):
    """Base of every pass's settings. Unknown keys are refused so a typo never silently does nothing."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Pass:
    """One transformation of a model.

    Subclasses set `name`, `Config`, `takes` (a kind or a tuple of kinds) and `gives` (a kind, or
    `"same"` for "the kind it was given"), and implement `run`. The instance holds only its validated
    settings (`self.config`); anything learnt while running belongs on the context.
    """

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    compresses: ClassVar[bool] = False  # prunes, quantizes or shrinks: what a later distillation recovers from
    takes: ClassVar[str | tuple[str, ...]] = "torch"
    gives: ClassVar[str] = "same"
    # Never changes what a linear layer reads (its input width): the widths a model's files declare still
    # hold after it, so the passes after it can be checked against them before anything loads.
    keeps_widths: ClassVar[bool] = False

    def __init__(self, config: PassConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def accepted_kinds(cls) -> tuple[str, ...]:
        return (cls.takes,) if isinstance(cls.takes, str) else tuple(cls.takes)

    def output_kind(self, input_kind: str) -> str:
        """The kind `run` returns for a model of `input_kind`; override when settings decide it."""
        return input_kind if self.gives == "same" else self.gives

    def check(self, input_kind: str) -> None:
        """Refuse, before anything runs, a setting that cannot work on this kind (raise ConfigError)."""

    def check_task(self, task: str) -> None:
        """Refuse, before anything loads, a setting that cannot work for the task the model's files declare
        ("text-generation" for a causal LM; called only when the loader can tell; raise ConfigError)."""

    def check_widths(self, widths: dict[str, int]) -> None:
        """Refuse, before anything loads, a setting the model's linear layers cannot take. `widths` are their
        input widths by role, as the model's files declare them (see `Loader.weight_widths`: "hidden",
        "attention", "mlp"); called only when the loader can tell and every pass before kept them."""

    def stages_named(self) -> dict[str, str]:
        """Settings that name an earlier stage of the pipeline (setting -> stage name): refused before anything
        runs when the pipeline makes no such stage before this pass."""
        return {}

    def processes(self) -> int:
        """How many processes this pass trains on (torch.distributed); above 1, `optitool run` runs under
        torchrun with that many (see optitool.distributed)."""
        return 1

    def data_needs(self) -> dict[str, str]:
        """The data splits this pass needs with these settings: split name -> "inputs" or "labels".
        The pipeline is refused before anything runs when its [data] cannot give them."""
        return {}

    def run(self, model: ModelArtifact, ctx: PassContext) -> ModelArtifact:  # pragma: no cover - abstract
        raise NotImplementedError(f"pass {self.name!r} does not implement run()")


class Progress:
    """A progress bar for a pass's long loop: a pass calls `update(n, **postfix)`; it is drawn (with rich)
    on the run's console when there is one, and the last figures are logged either way."""

    def __init__(self, total: int | None, desc: str, *, console: Any = None, logger: logging.Logger | None = None) -> None:
        self.total, self.desc, self.count = total, desc, 0
        self._postfix: dict[str, Any] = {}
        self._logger = logger
        self._bar: Any = None
        if console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[postfix]}"), console=console,
                                 transient=True)
            self._task = self._bar.add_task(desc, total=total, postfix="")
            self._bar.start()

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.count += n
        self._postfix = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}
        if self._bar is not None:
            text = " ".join(f"{k}={v}" for k, v in self._postfix.items())
            self._bar.update(self._task, advance=n, postfix=text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._logger is not None:
            self._logger.info("%s: %d/%s %s", self.desc, self.count, self.total if self.total else "?", self._postfix)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class PassContext:
    """What a pass may use while it runs.

    `inputs` draws real example inputs (and labels) from the pipeline's data; `stage_dir` is this pass's
    folder in the run; `metrics` is merged into the stage's metrics in report.json; `state` is shared by
    all passes of a run (for example the pruning masks a later distillation keeps).
    """

    device: str
    seed: int
    run_dir: Path
    stage_dir: Path
    inputs: InputSource | None
    logger: logging.Logger
    quiet: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, ModelArtifact] = field(default_factory=dict)
    load_model: Callable[[dict[str, Any]], ModelArtifact] | None = None
    pass_name: str = ""
    console: Any = None  # the run's terminal (rich), for progress bars; None when quiet
    architectures: tuple[Architecture, ...] | None = None  # the registered families; None: the built-in ones
    before_compression: ModelArtifact | None = None  # the model entering the chain's first compressing pass

    def architecture(self, module: Any) -> Layout:
        """Where `module` keeps its blocks, attention and MLP projections, embeddings and head, among the
        families registered in this run; PassError naming what is missing when it is none of them."""
        from optitool.architectures import BUILTIN_ARCHITECTURES, find_architecture

        return find_architecture(module, self.architectures if self.architectures is not None
                                 else BUILTIN_ARCHITECTURES)

    def flag(self, message: str) -> None:
        """Something a reader of the report must see about this stage (shown with the stage's flags)."""
        self.flags.append(message)

    def progress(self, total: int | None, desc: str = "") -> Progress:
        return Progress(total, desc or self.pass_name, console=None if self.quiet else self.console,
                        logger=self.logger)

    def hand_on(self, key: str, value: Any, *, unless_taken: str) -> None:
        """Leave `value` for a later pass to `take(key)`; the run fails with `unless_taken` if none does
        (for example gradual pruning that only a following distillation can carry out)."""
        self.state.setdefault("_handed_on", {})[key] = (value, unless_taken)

    def take(self, key: str) -> Any:
        """What an earlier pass handed on under `key`, or None; taking it settles the hand-over."""
        entry = self.state.get("_handed_on", {}).pop(key, None)
        return entry[0] if entry else None

    def batches(self, split: str, batch_size: int, *, limit: int | None = None) -> Iterator[Batch]:
        if self.inputs is None:
            raise PassError(f"pass {self.pass_name!r} needs data, but the pipeline has no inputs for it")
        return self.inputs.batches(split, batch_size, limit=limit)
