"""Saving stages to the run folder and the size and sparsity figures every stage reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from optitool.artifacts import ModelArtifact, OnnxModel, TorchModel
from optitool.models.base import describe_structure
from optitool.models.onnx_files import copy_onnx, onnx_parameter_counts, onnx_size_bytes


def torch_counts(module: Any) -> tuple[int, int, int]:
    """(parameters, nonzero parameters, bytes of parameters and buffers)."""
    total = nonzero = size = 0
    for p in module.parameters():
        total += p.numel()
        nonzero += int((p != 0).sum())
    for t in list(module.parameters()) + list(module.buffers()):
        size += t.numel() * t.element_size()
    for sub in module.modules():  # quantized modules keep packed weights outside parameters()
        weight = getattr(sub, "weight", None)
        if callable(weight) and not hasattr(weight, "shape"):
            try:
                w = weight()
            except Exception:  # noqa: BLE001
                continue
            dense = w.dequantize() if w.is_quantized else w
            total += dense.numel()
            nonzero += int((dense != 0).sum())
            size += dense.numel() * (1 if w.is_quantized else dense.element_size())
    return total, nonzero, size


def parameter_counts(artifact: ModelArtifact) -> tuple[int, int]:
    """(weights, nonzero weights) of a model of either kind, counted the same way for both: the elements
    of its weight tensors (torch parameters and packed quantized weights; ONNX float and quantized weight
    initializers), without quantization scales, zero points or shape constants."""
    if isinstance(artifact, OnnxModel):
        return onnx_parameter_counts(artifact.path)
    total, nonzero, _ = torch_counts(artifact.module)
    return total, nonzero


def stage_metrics(artifact: ModelArtifact, saved_bytes: int | None = None) -> dict[str, Any]:
    if isinstance(artifact, OnnxModel):
        total, nonzero = onnx_parameter_counts(artifact.path)
        size = onnx_size_bytes(artifact.path)
    else:
        total, nonzero, size = torch_counts(artifact.module)
        size = saved_bytes or size
    return {"parameters": total, "nonzero_parameters": nonzero,
            "sparsity": round(1 - nonzero / total, 4) if total else 0.0, "size_bytes": size}


def save_artifact(artifact: ModelArtifact, folder: Path) -> tuple[str, int]:
    """Write the artifact into `folder`; returns (file name, bytes on disk)."""
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(artifact, OnnxModel):
        target = folder / "model.onnx"
        if artifact.path.resolve() != target.resolve():
            copy_onnx(artifact.path, target)
        meta = {"kind": "onnx", "input_names": artifact.input_names, "task": artifact.task,
                "tokenizer": getattr(artifact.tokenizer, "name_or_path", None)}
        (folder / "model.json").write_text(json.dumps(meta, indent=2))
        return "model.onnx", onnx_size_bytes(target)
    assert isinstance(artifact, TorchModel)
    meta: dict[str, Any] = {"kind": "torch", "origin": artifact.origin, "overrides": artifact.overrides,
                            "structure": describe_structure(artifact.module), "input_names": artifact.input_names,
                            "reloadable": artifact.reloadable}
    target = folder / "model.safetensors"
    try:
        from safetensors.torch import save_model

        save_model(artifact.module, str(target))
    except Exception as exc:  # noqa: BLE001 - e.g. packed int8 weights are not plain tensors
        import torch

        meta.update(reloadable=False, why=f"weights are not plain tensors ({type(exc).__name__})")
        target = folder / "model.pt"
        torch.save(artifact.module.state_dict(), target)
    if not artifact.origin:
        meta.update(reloadable=False, why="the model was not loaded from a [model] table")
    (folder / "model.json").write_text(json.dumps(meta, indent=2, default=str))
    return target.name, target.stat().st_size
