"""int8 quantization. ONNX models go through onnxruntime's quantizer (dynamic, or static QDQ with calibration);
torch models through torchao where it is installed (GPU targets) and torch's dynamic int8 on CPU."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from optitool import (
    ConfigError,
    ModelArtifact,
    OnnxModel,
    Pass,
    PassConfig,
    PassContext,
    PassError,
    TorchModel,
)


class Int8Config(PassConfig):
    mode: Literal["dynamic", "static", "weight_only"] = Field(
        "dynamic", description="dynamic (activations quantized at run time), static (calibrated QDQ), weight_only")
    per_channel: bool = Field(True, description="one scale per output channel of each weight")
    reduce_range: bool = Field(False, description="7-bit weights, for CPUs without VNNI")
    calibration: Literal["minmax", "percentile", "entropy"] = Field("minmax", description="static calibration")
    calibration_samples: int = Field(64, ge=1, description="examples of the calibration split used")
    calibration_data: Literal["split", "random"] = Field(
        "split", description="static: the data's calibration split, or seeded random inputs (flagged in the report)")
    op_types: list[str] = Field(default_factory=lambda: ["MatMul", "Gemm", "Gather", "Attention", "Conv"],
                                description="ONNX op types to quantize")
    exclude_nodes: list[str] = Field(default_factory=list, description="ONNX node names left in float")
    preprocess: bool = Field(True, description="symbolic shape inference and graph clean-up first (ONNX)")
    backend: Literal["auto", "torchao", "torch"] = Field("auto", description="torch models: torchao or torch.ao")


class Int8Quantize(Pass):
    """int8 weights (and activations): ONNX through onnxruntime, torch through torchao or torch.ao."""

    keeps_widths = True

    name = "int8_quantize"
    compresses = True
    Config = Int8Config
    takes = ("torch", "onnx")
    gives = "same"

    def check(self, input_kind: str) -> None:
        if input_kind == "onnx" and self.config.mode == "weight_only":
            raise ConfigError("int8_quantize: mode = 'weight_only' is for torch models (torchao); on ONNX use "
                              "'dynamic' or 'static'")

    def data_needs(self) -> dict[str, str]:
        static_split = self.config.mode == "static" and self.config.calibration_data == "split"
        return {"calibration": "inputs"} if static_split else {}

    def run(self, model: ModelArtifact, ctx: PassContext) -> ModelArtifact:
        if isinstance(model, OnnxModel):
            return self._onnx(model, ctx)
        assert isinstance(model, TorchModel)
        return self._torch(model, ctx)

    # ------------------------------------------------------------------------------------------ ONNX
    def _onnx(self, model: OnnxModel, ctx: PassContext) -> OnnxModel:
        from onnxruntime.quantization import QuantType

        cfg: Int8Config = self.config
        source = model.path
        work = Path(tempfile.mkdtemp(prefix="optitool-int8-", dir=ctx.stage_dir))
        if cfg.preprocess:
            source = _preprocess(source, work / "preprocessed.onnx", ctx)
        target = ctx.stage_dir / "model.onnx"
        extra = {"MatMulConstBOnly": True, "DefaultTensorType": 1}  # 1 = FLOAT: fused graphs lose type info
        ops = cfg.op_types
        if cfg.mode == "dynamic":
            from onnxruntime.quantization import quantize_dynamic

            quantize_dynamic(str(source), str(target), op_types_to_quantize=ops, per_channel=cfg.per_channel,
                             reduce_range=cfg.reduce_range, weight_type=QuantType.QInt8,
                             nodes_to_exclude=cfg.exclude_nodes, extra_options=extra)
        else:
            from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

            method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                      "entropy": CalibrationMethod.Entropy}[cfg.calibration]
            quantize_static(str(source), str(target),
                            _CalibrationReader(model, ctx, cfg.calibration_samples, cfg.calibration_data),
                            quant_format=QuantFormat.QDQ, op_types_to_quantize=ops, per_channel=cfg.per_channel,
                            reduce_range=cfg.reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=cfg.exclude_nodes,
                            calibrate_method=method, extra_options=extra)
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        before, after = model.size_bytes(), OnnxModel(target).size_bytes()
        ctx.metrics.update(size_before_bytes=before, size_after_bytes=after, size_ratio=round(after / before, 4))
        return OnnxModel(target, tokenizer=model.tokenizer, input_names=model.input_names)

    # ------------------------------------------------------------------------------------------ torch
    def _torch(self, model: TorchModel, ctx: PassContext) -> TorchModel:
        import importlib.util

        cfg: Int8Config = self.config
        backend = cfg.backend
        if backend == "auto":
            backend = "torchao" if ctx.device == "cuda" and importlib.util.find_spec("torchao") else "torch"
        if backend == "torchao":
            return self._torchao(model, ctx)
        if ctx.device == "cuda":
            raise PassError("torch's own int8 (torch.ao dynamic quantization) runs on CPU only; for a CUDA target "
                            "install torchao (pip install torchao) or export to ONNX first")
        if cfg.mode != "dynamic":
            raise PassError(f"mode = {cfg.mode!r} on torch models needs torchao (backend = 'torchao'); torch's "
                            "CPU path is dynamic int8")
        import torch

        before = _torch_bytes(model.module)
        module = model.module.cpu()
        tied = tied_linears(module)
        # A Linear sharing its weight with an embedding (a tied LM head) stays float: quantized, it would become
        # a second copy beside the float table, and the model would grow (GPT-2: 21.3 -> 23.4 MB)
        spec = {name: torch.ao.quantization.default_dynamic_qconfig for name, m in module.named_modules()
                if isinstance(m, torch.nn.Linear) and name not in tied}
        quantized = torch.ao.quantization.quantize_dynamic(module, spec, dtype=torch.qint8)
        ctx.metrics.update(size_before_bytes=before, backend="torch.ao dynamic int8 (CPU)", tied_kept_float=tied)
        return TorchModel(quantized, origin=model.origin, tokenizer=model.tokenizer, input_names=model.input_names,
                          overrides=model.overrides, reloadable=False)

    def _torchao(self, model: TorchModel, ctx: PassContext) -> TorchModel:
        try:
            from torchao.quantization import (
                Int8DynamicActivationInt8WeightConfig,
                Int8WeightOnlyConfig,
                quantize_,
            )
        except ImportError:
            raise PassError("backend = 'torchao' needs torchao: pip install torchao") from None
        cfg: Int8Config = self.config
        if cfg.mode == "static":
            raise PassError("torchao int8 here is dynamic or weight_only; use mode = 'dynamic' or 'weight_only'")
        config = Int8WeightOnlyConfig() if cfg.mode == "weight_only" else Int8DynamicActivationInt8WeightConfig()
        before = _torch_bytes(model.module)
        quantize_(model.module.to(ctx.device), config)
        ctx.metrics.update(size_before_bytes=before, backend=f"torchao {type(config).__name__}")
        model.reloadable = False
        return model


def _torch_bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@contextmanager
def _working_folder(folder: Path) -> Iterator[None]:
    """onnxruntime's symbolic shape inference writes temporary files (a copy of the whole model) into the
    current folder and leaves them there when it fails; run it inside a folder of our own."""
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _preprocess(source: Path, target: Path, ctx: PassContext) -> Path:
    """Shape inference and clean-up; skipped (with a note) where onnxruntime's tools cannot handle the graph,
    e.g. symbolic shape inference on some dynamo graphs or on transformer-fused ops."""
    source, target = source.resolve(), target.resolve()  # before the working folder changes
    with _working_folder(target.parent):
        return _preprocess_here(source, target, ctx)


def _preprocess_here(source: Path, target: Path, ctx: PassContext) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(source), str(target), skip_symbolic_shape=False)
        return target
    except Exception as first:  # noqa: BLE001
        try:
            quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
            ctx.metrics["preprocess_note"] = f"symbolic shape inference skipped ({type(first).__name__})"
            return target
        except Exception as second:  # noqa: BLE001
            ctx.metrics["preprocess_note"] = f"pre-processing skipped ({type(second).__name__}: {second})"[:300]
            return source


class _CalibrationReader:
    """Feeds onnxruntime's calibrator batches of the calibration split (seeded random inputs without data)."""

    def __init__(self, model: OnnxModel, ctx: PassContext, samples: int, source: str) -> None:
        import onnx

        graph = onnx.load(str(model.path), load_external_data=False).graph
        initializers = {i.name for i in graph.initializer}
        names = [i.name for i in graph.input if i.name not in initializers]
        if ctx.inputs is None:
            raise PassError("static int8 needs calibration inputs: add [data] with a calibration split")
        if source == "split":
            batches = [b.inputs for b in ctx.inputs.batches("calibration", 8, limit=samples)]
        else:  # asked for: calibration ranges from random inputs can be far from real ones
            batches = [ctx.inputs.random(8, index=500 + i) for i in range(max(1, samples // 8))]
            ctx.flag("static int8 was calibrated on seeded random inputs (calibration_data = 'random'), not "
                     "on real data; its accuracy may be worse than a calibrated model's")
        self._feeds = iter([{k: v.numpy() for k, v in b.items() if k in names} for b in batches])

    def get_next(self) -> dict[str, Any] | None:
        return next(self._feeds, None)


def tied_linears(module: Any) -> list[str]:
    """Names of the Linear layers whose weight is also an embedding table's (tied LM heads)."""
    import torch

    tables = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    return [name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear) and id(m.weight) in tables]
