"""onnxruntime-genai's model builder as an exporter for the decoder families it knows (Llama, Mistral,
Qwen, Phi, Gemma, ...). It writes the attention as onnxruntime's fused GroupQueryAttention and the
projections as plain MatMuls (q, k and v packed in one), which decodes faster on CPU than the op-by-op
graph torch.onnx writes; its graph keeps the same past/present layout, so optitool runs, verifies and
quantizes it like its own. The builder is given float32 weights: quantization stays a separate pass.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path
from typing import Any

from optitool import PassError, TorchModel

BUILDER_FILES = ("genai_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def export_genai(model: TorchModel, path: Path, log: Any) -> None:
    """Save the model as a Hugging Face folder, run the builder on it (fp32, CPU) and leave model.onnx
    (+ model.onnx.data and the builder's genai_config.json) in path's folder."""
    try:
        from onnxruntime_genai.models import builder
    except ImportError:
        raise PassError('exporter = "genai" needs onnxruntime-genai\'s model builder: pip install "optitool[genai]"'
                        ) from None
    module = model.module
    if not hasattr(module, "save_pretrained") or not hasattr(module, "config"):
        raise PassError('exporter = "genai" works on Hugging Face causal LMs only; use exporter = "dynamo"')
    architecture = (getattr(module.config, "architectures", None) or [type(module).__name__])[0]
    config = module.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % 16:
        raise PassError(f'exporter = "genai": onnxruntime\'s GroupQueryAttention, which the builder writes, needs a '
                        f"head size that is a multiple of 16; this model's is {head_dim}: use exporter = \"dynamo\"")
    with tempfile.TemporaryDirectory(prefix="optitool-genai-") as tmp:
        source, built = Path(tmp) / "hf", Path(tmp) / "onnx"
        _save_plain(module, source)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(source)
        log.info("onnxruntime-genai's model builder on %s (fp32, cpu)", architecture)
        chatter = io.StringIO()
        try:
            with contextlib.redirect_stdout(chatter):
                cache = str(Path(tmp) / "cache")
                options = builder.parse_extra_options(None, str(source), str(built), "fp32", "cpu", cache, [])
                builder.create_model(None, str(source), str(built), "fp32", "cpu", cache, **options)
        except NotImplementedError as exc:
            raise PassError(f'exporter = "genai": onnxruntime-genai\'s model builder does not support '
                            f"{architecture} ({exc}); use exporter = \"dynamo\"") from None
        except Exception as exc:  # noqa: BLE001 - the builder raises bare Exceptions for what it refuses
            raise PassError(f'exporter = "genai": onnxruntime-genai\'s model builder failed on {architecture} '
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'}); "
                            'use exporter = "dynamo"') from None
        finally:
            log.debug("model builder output:\n%s", chatter.getvalue())
        head_dim = json.loads((built / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
        _stamp_head_dim(built / "model.onnx", int(head_dim), path)
        for name in BUILDER_FILES:
            if (built / name).is_file():
                (path.parent / name).write_bytes((built / name).read_bytes())


def _save_plain(module: Any, folder: Path) -> None:
    """save_pretrained, without the GGUF quantizer transformers attaches when it dequantized a GGUF file
    (it refuses to serialise the model otherwise; the weights are plain float32 by then)."""
    quantizer = getattr(module, "hf_quantizer", None)
    quant_config = getattr(module.config, "quantization_config", None)
    try:
        if quantizer is not None:
            module.hf_quantizer = None
        if quant_config is not None:
            del module.config.quantization_config
        module.save_pretrained(folder)
    finally:
        if quantizer is not None:
            module.hf_quantizer = quantizer
        if quant_config is not None:
            module.config.quantization_config = quant_config


def _stamp_head_dim(built: Path, head_dim: int, target: Path) -> None:
    """The builder leaves the cache's head size symbolic; record it in the graph's metadata, so that the
    graph (and every quantized copy of it) says its cache layout without the builder's config beside it."""
    import onnx

    from optitool import KV_HEAD_DIM_METADATA, save_onnx

    graph = onnx.load(str(built))  # external data loaded: it is written again, next to the target
    del graph.metadata_props[:]
    graph.metadata_props.add(key=KV_HEAD_DIM_METADATA, value=str(head_dim))
    save_onnx(graph, target)
