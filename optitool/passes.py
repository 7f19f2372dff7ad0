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
    from optitool.artifacts import ModelArtifact
    from optitool.data.inputs import InputSource

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
    takes: ClassVar[str | tuple[str, ...]] = "torch"
    gives: ClassVar[str] = "same"

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

    def data_needs(self) -> dict[str, str]:
        """The data splits this pass needs with these settings: split name -> "inputs" or "labels".
        The pipeline is refused before anything runs when its [data] cannot give them."""
        return {}

    def run(self, model: ModelArtifact, ctx: PassContext) -> ModelArtifact:  # pragma: no cover - abstract
        raise NotImplementedError(f"pass {self.name!r} does not implement run()")


class Progress:
    """A minimal progress reporter: a pass calls `update(n, **postfix)`; the CLI decides how it is shown."""

    def __init__(self, total: int | None, desc: str, *, quiet: bool) -> None:
        self._bar = None
        self.total, self.desc, self.count = total, desc, 0
        if not quiet:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
            except ImportError:  # tqdm is optional; the log still gets the numbers
                self._bar = None

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

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

    def flag(self, message: str) -> None:
        """Something a reader of the report must see about this stage (shown with the stage's flags)."""
        self.flags.append(message)

    def progress(self, total: int | None, desc: str = "") -> Progress:
        return Progress(total, desc or self.pass_name, quiet=self.quiet)

    def hand_on(self, key: str, value: Any, *, unless_taken: str) -> None:
        """Leave `value` for a later pass to `take(key)`; the run fails with `unless_taken` if none does
        (for example gradual pruning that only a following distillation can carry out)."""
        self.state.setdefault("_handed_on", {})[key] = (value, unless_taken)

    def take(self, key: str) -> Any:
        """What an earlier pass handed on under `key`, or None; taking it settles the hand-over."""
        entry = self.state.get("_handed_on", {}).pop(key, None)
        return entry[0] if entry else None

    def batches(self, split: str, batch_size: int, *, limit: int | None = None) -> Iterator[Any]:
        if self.inputs is None:
            raise PassError(f"pass {self.pass_name!r} needs data, but the pipeline has no inputs for it")
        return self.inputs.batches(split, batch_size, limit=limit)
