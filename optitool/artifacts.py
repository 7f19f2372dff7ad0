"""Model artifacts: a model in one kind, `torch` (an nn.Module in memory) or `onnx` (a file)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch


class ModelArtifact:
    kind: ClassVar[str]


@dataclass
class TorchModel(ModelArtifact):
    """An `nn.Module` plus what is needed to rebuild it from a saved state dict.

    `origin` is the `[model]` table it was first loaded from; `overrides` are module attributes a pass
    changed along with the weights' shapes (for example the head count after head pruning); `masks`
    are the pruning masks (parameter name -> bool tensor) later passes must keep.
    """

    module: torch.nn.Module
    origin: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None
    input_names: list[str] = field(default_factory=list)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    reloadable: bool = True
    kind: ClassVar[str] = "torch"


@dataclass
class OnnxModel(ModelArtifact):
    """An ONNX file (with its external data next to it when it has any)."""

    path: Path
    tokenizer: Any = None
    input_names: list[str] = field(default_factory=list)
    task: str | None = None  # what the model it came from did ("text-generation" for a causal LM)
    kind: ClassVar[str] = "onnx"

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    def size_bytes(self) -> int:
        from optitool.models.onnx_files import onnx_size_bytes

        return onnx_size_bytes(self.path)
