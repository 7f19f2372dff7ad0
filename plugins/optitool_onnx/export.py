"""The onnx_export pass: export, optionally optimise, then verify against the torch model on real inputs."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from optitool import (
    ConfigError,
    OnnxModel,
    Pass,
    PassConfig,
    PassContext,
    PassError,
    TorchModel,
    call_module,
    main_output,
)


class OnnxExportConfig(PassConfig):
    exporter: Literal["auto", "dynamo", "torchscript", "optimum", "genai"] = Field(
        "auto", description="torch.onnx's dynamo exporter, the TorchScript exporter, optimum's (HF models), or "
        "onnxruntime-genai's model builder (HF causal LMs of the families it knows; always with a KV cache); "
        "auto: TorchScript for optimize = \"transformer\" on an encoder (onnxruntime fuses only its graphs), "
        "dynamo otherwise")
    kv_cache: bool | None = Field(
        None, description="causal LMs: past key/values in the graph, one graph for prefill and decode "
        "(default: yes for causal LMs, no otherwise)")
    verify_steps: int = Field(32, ge=1, description="with a KV cache: greedy steps that must equal torch's")
    opset: int = Field(18, ge=11, le=23, description="ONNX opset")
    dynamic_axes: bool = Field(True, description="dynamic batch (and sequence) axes")
    optimize: Literal["none", "basic", "extended", "transformer"] = Field(
        "none", description="onnxruntime graph optimisation; transformer = BERT-style fusions")
    fp16: bool = Field(False, description="convert weights to float16 (for GPU targets)")
    keep_io_float32: bool = Field(True, description="with fp16, keep graph inputs and outputs float32")
    verify: bool = Field(True, description="compare with the torch model on real inputs and fail beyond tolerance")
    atol: float = Field(1e-3, gt=0, description="absolute tolerance of the verification")
    rtol: float = Field(1e-3, ge=0, description="relative tolerance of the verification")
    verify_batches: int = Field(2, ge=1, description="eval batches compared")
    verify_batch_size: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _genai_has_a_cache(self) -> OnnxExportConfig:
        if self.exporter == "genai" and self.kv_cache is False:
            raise ValueError('exporter = "genai" always builds a graph with a KV cache (what onnxruntime-genai '
                             'runs), so kv_cache = false cannot hold: drop it, or use exporter = "dynamo"')
        return self


def output_adapter(module: Any, input_names: list[str]) -> Any:
    """The module as exporters want it: positional tensors in a fixed order in, its main output only out.
    (A function, not a class: torch must not be imported when this plugin is.)"""
    import torch

    class _Adapter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *args: Any) -> Any:
            return main_output(call_module(self.inner, dict(zip(input_names, args, strict=True))))[1]

    return _Adapter()


class OnnxExport(Pass):
    """Export a torch model to ONNX and verify the result on real inputs."""

    keeps_widths = True

    name = "onnx_export"
    Config = OnnxExportConfig
    takes = "torch"
    gives = "onnx"

    def run(self, model: TorchModel, ctx: PassContext) -> OnnxModel:
        cfg: OnnxExportConfig = self.config
        if ctx.inputs is None:
            raise PassError("onnx_export needs example inputs: give the model a tokenizer or [model.inputs]")
        path = ctx.stage_dir / "model.onnx"
        module = model.module.eval().cpu()
        if self._with_cache(model):
            return self._run_decoder(model, ctx, path)
        sample = ctx.inputs.example(2, 16 if ctx.inputs.is_text else None)
        if "attention_mask" in sample:
            # Trace with padding: a model may skip an all-ones mask, and the graph would then ignore masks.
            sample["attention_mask"] = sample["attention_mask"].clone()
            sample["attention_mask"][-1, -4:] = 0
        names = list(sample)
        import torch

        with torch.inference_mode():
            output_name = main_output(call_module(module, sample))[0]
        exporter = self._exporter(with_cache=False)
        ctx.metrics["exporter"] = exporter
        if cfg.optimize == "transformer" and exporter == "torchscript":
            _eager_attention(module)  # onnxruntime's fusions match the eager attention's pattern, not SDPA's
        if exporter == "optimum":
            self._export_optimum(model, ctx, path)
        else:
            self._export_torch(module, sample, names, output_name, path, exporter)
        batches = [ctx.inputs.example(cfg.verify_batch_size, index=i) for i in range(cfg.verify_batches)]
        return self._finish(model, ctx, path, names, batches)

    def check_task(self, task: str) -> None:
        cfg: OnnxExportConfig = self.config
        if task != "text-generation" and cfg.kv_cache:
            raise ConfigError(f"kv_cache = true, but the model is a {task!r} model, not a causal language model: it "
                              "has no KV cache to export; set kv_cache = false (or leave it out)")
        if task != "text-generation" and cfg.exporter == "genai":
            raise ConfigError(f'exporter = "genai" exports causal language models, and the model is a {task!r} '
                              'model: use exporter = "dynamo"')

    def _with_cache(self, model: TorchModel) -> bool:
        from optitool import is_causal_lm

        cfg: OnnxExportConfig = self.config
        causal = is_causal_lm(model)
        if cfg.kv_cache and not causal:
            raise PassError(f"kv_cache = true: {type(model.module).__name__} is not a causal language model, so it "
                            "has no KV cache to export; set kv_cache = false (or leave it out)")
        if cfg.exporter == "genai" and not causal:
            raise PassError(f'exporter = "genai" exports causal language models; {type(model.module).__name__} is '
                            'not one: use exporter = "dynamo"')
        if cfg.exporter == "genai" and cfg.kv_cache is False:
            raise PassError('exporter = "genai" always writes a KV cache; use exporter = "dynamo" for kv_cache = false')
        wanted = causal if cfg.kv_cache is None else cfg.kv_cache
        if wanted and cfg.exporter in ("torchscript", "optimum"):
            raise PassError(f'kv_cache: exporter = "{cfg.exporter}" is wired for graphs without a KV cache here; use '
                            'exporter = "dynamo" or "genai" for a decoder with its cache, or set kv_cache = false')
        return wanted

    def _run_decoder(self, model: TorchModel, ctx: PassContext, path: Path) -> OnnxModel:
        """A causal LM with its KV cache: export, then check the prefill's logits and `verify_steps` greedy
        tokens against torch."""
        from optitool_onnx.decoder import export_with_past, verify_decoding
        from optitool_onnx.genai import export_genai

        cfg: OnnxExportConfig = self.config
        exporter = self._exporter(with_cache=True)
        ctx.metrics["exporter"] = exporter
        if exporter == "genai":
            export_genai(model, path, ctx.logger)
        else:
            export_with_past(model, path, cfg.opset, _too_big_for_protobuf(model.module))
        from optitool import token_blocks

        # Unpadded blocks of real text: what a decoder is evaluated on (logits at padding mean nothing)
        length = min(32, ctx.inputs.max_length)
        blocks = token_blocks(ctx.inputs, "eval", length, seed=ctx.inputs.seed, shapes_only=True)[:cfg.verify_batches]
        exported = self._finish(model, ctx, path, ["input_ids", "attention_mask"], [b.inputs for b in blocks])
        if cfg.verify:
            import torch

            prompts = torch.cat([b.inputs["input_ids"] for b in blocks])[:4, :length // 2]
            ctx.metrics.update(verify_decoding(model, exported.path, prompts, cfg.verify_steps))
        ctx.metrics["kv_cache"] = True
        return exported

    def _finish(self, model: TorchModel, ctx: PassContext, path: Path, names: list[str],
                batches: list[dict[str, Any]]) -> OnnxModel:
        cfg: OnnxExportConfig = self.config
        if cfg.optimize != "none":
            self._optimize(model, path, ctx)
        if cfg.fp16:
            self._to_fp16(path)
        exported = OnnxModel(path, tokenizer=model.tokenizer, input_names=names)
        _note_dropped_weights(model, exported, ctx)
        if cfg.verify:
            self._verify(model, exported, ctx, batches)
        return exported

    # ------------------------------------------------------------------------------------------ export
    def _exporter(self, *, with_cache: bool) -> str:
        """The exporter `auto` stands for: onnxruntime 1.32's transformer fusions find the attention of
        TorchScript-exported encoders only (MiniLM under transformers 5: 6 Attention nodes fused from the
        TorchScript graph with eager attention, none from the dynamo graph with either attention)."""
        cfg: OnnxExportConfig = self.config
        if cfg.exporter != "auto":
            return cfg.exporter
        return "torchscript" if cfg.optimize == "transformer" and not with_cache else "dynamo"

    def _export_torch(self, module: Any, sample: dict[str, Any], names: list[str], output_name: str,
                      path: Path, exporter: str) -> None:
        import torch

        cfg: OnnxExportConfig = self.config
        adapter = output_adapter(module, names).eval()
        args = tuple(sample[n] for n in names)
        text_like = all(v.dim() == 2 and not v.is_floating_point() for v in args)
        axes = {0: "batch", 1: "sequence"} if text_like else {0: "batch"}
        kwargs: dict[str, Any] = {"input_names": names, "output_names": [output_name], "opset_version": cfg.opset}
        if exporter == "torchscript":
            if cfg.dynamic_axes:
                out_axes = {0: "batch", 1: "sequence"} if output_name == "last_hidden_state" else {0: "batch"}
                kwargs["dynamic_axes"] = {**{n: axes for n in names}, output_name: out_axes}
            torch.onnx.export(adapter, args, str(path), dynamo=False, do_constant_folding=True, **kwargs)
            return
        if cfg.dynamic_axes:
            dims = {i: torch.export.Dim.DYNAMIC for i in axes}
            kwargs["dynamic_shapes"] = {"args": tuple(dims for _ in names)}  # the adapter takes *args
        try:
            program = torch.onnx.export(adapter, args, dynamo=True, external_data=True, optimize=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the dynamo exporter raises many kinds
            raise PassError(f"the dynamo exporter failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                            'try exporter = "torchscript"') from None
        program.save(str(path), external_data=_too_big_for_protobuf(module))

    def _export_optimum(self, model: TorchModel, ctx: PassContext, path: Path) -> None:
        try:
            from optimum.exporters.onnx import main_export
        except ImportError:
            raise PassError('exporter = "optimum" needs optimum\'s ONNX exporter: pip install "optitool[optimum]" '
                            "(it pins transformers<4.58)") from None
        if not hasattr(model.module, "save_pretrained"):
            raise PassError('exporter = "optimum" works on Hugging Face models only; use "dynamo" or "torchscript"')
        task = model.origin.get("task") or "feature-extraction"
        with tempfile.TemporaryDirectory(prefix="optitool-optimum-") as tmp:
            model.module.save_pretrained(tmp)
            if model.tokenizer is not None:
                model.tokenizer.save_pretrained(tmp)
            out = Path(tmp) / "onnx"
            main_export(tmp, output=out, task=task, opset=self.config.opset, do_validation=False)
            from optitool import copy_onnx

            copy_onnx(out / "model.onnx", path)

    def _optimize(self, model: TorchModel, path: Path, ctx: PassContext) -> None:
        cfg: OnnxExportConfig = self.config
        if cfg.optimize == "transformer":
            from onnxruntime.transformers.optimizer import optimize_model

            config = getattr(model.module, "config", None)
            if config is None or not hasattr(config, "num_attention_heads"):
                raise PassError('optimize = "transformer" needs a Hugging Face transformer model (BERT-like)')
            from onnxruntime.transformers.fusion_options import FusionOptions

            heads = _live_heads(model.module, config)
            options = FusionOptions(_ort_model_type(config))
            # EmbedLayerNormalization would take the embedding table into an op no int8 quantizer handles:
            # MiniLM's int8 stage kept its 47 MB float table (58.6 MB instead of 22.8)
            options.enable_embed_layer_norm = False
            try:
                optimized = optimize_model(str(path), model_type=_ort_model_type(config), num_heads=heads,
                                           hidden_size=config.hidden_size, opt_level=1, optimization_options=options)
            except Exception as exc:  # noqa: BLE001 - its fusion code asserts on graphs it does not know
                raise PassError(f'optimize = "transformer": onnxruntime\'s transformer optimizer could not fuse '
                                f"this {getattr(config, 'model_type', 'model')!r} graph ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else 'no message'}); its fusions are for "
                                'BERT-style encoders: use optimize = "extended" or "none"') from None
            fused = optimized.get_fused_operator_statistics()
            ctx.metrics["onnx_fusions"] = {k: v for k, v in fused.items() if v}
            optimized.save_model_to_file(str(path), use_external_data_format=_too_big_for_protobuf(model.module))
            return
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[cfg.optimize]
        target = path.with_name("optimized.onnx")
        options.optimized_model_filepath = str(target)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        target.replace(path)

    def _to_fp16(self, path: Path) -> None:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        converted = convert_float_to_float16(onnx.load(str(path)), keep_io_types=self.config.keep_io_float32)
        from optitool import save_onnx

        save_onnx(converted, path)

    # ------------------------------------------------------------------------------------------ verify
    def _verify(self, model: TorchModel, exported: OnnxModel, ctx: PassContext,
                batches: list[dict[str, Any]]) -> None:
        import torch

        from optitool import Executor

        cfg: OnnxExportConfig = self.config
        torch_run, onnx_run = Executor(model, "cpu"), Executor(exported)
        worst, cosines = 0.0, []
        for index, inputs in enumerate(batches):
            _, expected = torch_run.raw(inputs)
            _, got = onnx_run.raw(inputs)
            if expected.shape != got.shape:
                raise PassError(f"the exported model's output has shape {tuple(got.shape)}, the torch model's "
                                f"{tuple(expected.shape)}")
            got = got.float()
            diff = (got - expected).abs()
            worst = max(worst, float(diff.max()))
            cosines.append(float(torch.nn.functional.cosine_similarity(got.flatten(1), expected.flatten(1)).mean()))
            if not torch.allclose(got, expected, atol=cfg.atol, rtol=cfg.rtol):
                bad = int((diff > cfg.atol + cfg.rtol * expected.abs()).sum())
                raise PassError(f"verification failed: the exported model differs from the torch model by up to "
                                f"{worst:.3g} (atol {cfg.atol}, rtol {cfg.rtol}; {bad} of {diff.numel()} values "
                                f"outside) on eval batch {index}; mean cosine {cosines[-1]:.5f}. Loosen atol/rtol "
                                "only if that difference is expected (fp16), otherwise report an exporter bug")
        ctx.metrics.update(export_max_abs_diff=float(f"{worst:.3g}"), export_cosine=round(min(cosines), 6))


def _note_dropped_weights(model: TorchModel, exported: OnnxModel, ctx: PassContext) -> None:
    """An exporter keeps only what the exported output uses (an encoder's pooler is dropped when the
    output is the hidden states) and folds away no-op weights (all-zero biases): say how many weights
    that was, so a reader sees why the counts of the two stages differ."""
    from optitool import parameter_counts

    dropped = parameter_counts(model)[0] - parameter_counts(exported)[0]
    if dropped > 0:
        ctx.metrics["weights_not_exported"] = dropped
        ctx.logger.info("%d weights are not in the exported graph: its output does not use them", dropped)


def _eager_attention(module: Any) -> None:
    """Switch a Hugging Face model to its eager attention (same numbers, the graph pattern fusers know)."""
    setter = getattr(module, "set_attn_implementation", None)
    config = getattr(module, "config", None)
    if setter is not None:
        try:
            setter("eager")
            return
        except (ValueError, TypeError, AttributeError):
            pass
    if config is not None and hasattr(config, "_attn_implementation"):
        config._attn_implementation = "eager"


def _too_big_for_protobuf(module: Any) -> bool:
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    return total > 2 * 1024**3 - 256 * 1024**2


def _ort_model_type(config: Any) -> str:
    known = {"bert", "bart", "gpt2", "t5", "vit", "clip"}
    return config.model_type if config.model_type in known else "bert"


def _live_heads(module: Any, config: Any) -> int:
    """The head count after head pruning (0 lets onnxruntime read it from the graph when layers differ)."""
    counts = {getattr(m, "num_attention_heads", None) for m in module.modules()
              if type(m).__name__.endswith("SelfAttention")}
    counts.discard(None)
    return counts.pop() if len(counts) == 1 else 0
