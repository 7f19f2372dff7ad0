"""The built-in model loaders: hf, python, torchvision, torchscript, exported_program, onnx and stage."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import json
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optitool.artifacts import ModelArtifact, OnnxModel, TorchModel
from optitool.errors import ConfigError, RunError
from optitool.models.base import (
    Loader,
    apply_checkpoint,
    apply_overrides,
    apply_structure,
    check_fits,
    load_state_dict,
    unreadable,
)
from optitool.models.onnx_files import read_onnx_graph
from optitool.paths import resolve_path
from optitool.user_code import resolve_callable

if TYPE_CHECKING:
    from optitool.spec import ModelSpec

HF_TASKS = {
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "fill-mask": "AutoModelForMaskedLM",
    "text-generation": "AutoModelForCausalLM",
    "image-classification": "AutoModelForImageClassification",
}


class HfLoader(Loader):
    """A Hugging Face model from a local folder (offline) or a hub id; `task` picks the AutoModel class."""

    name = "hf"
    needs = ()

    def validate(self, spec: ModelSpec, base_dir: Path, where: str) -> None:
        if not spec.path and not spec.name:
            raise ConfigError(f"{where}: [model] with source = 'hf' needs `path` (a local folder) or `name` "
                              "(a hub id)")
        task = spec.task or "feature-extraction"
        if task not in HF_TASKS:
            raise ConfigError(f"{where}: [model].task = {task!r} is not supported; use one of "
                              f"{', '.join(HF_TASKS)}")
        if spec.path:
            folder = self.existing(spec.path, base_dir, f"{where}: [model].path")
            if not (folder / "config.json").is_file():
                raise ConfigError(f"{where}: [model].path = {spec.path!r}: {folder} has no config.json, so it "
                                  "is not a Hugging Face model folder")
        super().validate(spec.model_copy(update={"path": None}), base_dir, where)

    def task(self, spec: ModelSpec, base_dir: Path) -> str | None:
        if spec.task:
            return spec.task
        return default_task(resolve_path(spec.path, base_dir, where="[model].path")) if spec.path else None

    def context_length(self, spec: ModelSpec, base_dir: Path) -> int | None:
        if not spec.path:
            return None
        config = hf_config(resolve_path(spec.path, base_dir, where="[model].path"))
        found = [config.get(k) for k in ("max_position_embeddings", "n_positions", "max_seq_len")]
        return next((int(v) for v in found if isinstance(v, int) and v > 0), None)

    def weight_widths(self, spec: ModelSpec, base_dir: Path) -> dict[str, int] | None:
        if not spec.path:
            return None
        return config_widths(hf_config(resolve_path(spec.path, base_dir, where="[model].path")))

    def generates(self, spec: ModelSpec, base_dir: Path) -> bool:
        """Whether this will load as a causal LM (benchmarked in generation), read from the folder's config."""
        if spec.task:
            return spec.task == "text-generation"
        return bool(spec.path) and default_task(resolve_path(spec.path, base_dir, where="[model].path")) == \
            "text-generation"

    def load(self, spec: ModelSpec, base_dir: Path) -> ModelArtifact:
        import transformers

        where = str(resolve_path(spec.path, base_dir, where="[model].path")) if spec.path else spec.name
        local = spec.path is not None
        task = spec.task or (default_task(Path(where)) if local else "feature-extraction")
        auto = getattr(transformers, HF_TASKS[task])
        kwargs = dict(spec.kwargs)
        if spec.num_labels is not None:
            kwargs["num_labels"] = spec.num_labels
        try:
            module = auto.from_pretrained(where, local_files_only=local, **kwargs)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for bad folders and files
            if not local:
                raise RunError(f"could not load Hugging Face model {where!r}: {exc}. Without network access, "
                               "point [model].path at a local folder.") from None
            weights = _weights_file(Path(where))
            said = f"{type(exc).__name__}: {exc} {exc.__cause__ or exc.__context__ or ''}"
            if weights.is_file() and (weights.name in said or "weights_only" in said or "safetensor" in said.lower()):
                raise unreadable(weights, exc, "the Hugging Face model's weights") from None
            raise unreadable(Path(where), exc, "the Hugging Face model folder") from None
        module.eval()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(where, local_files_only=local)
        except (OSError, ValueError, TypeError):
            tokenizer = None
        if spec.checkpoint:
            apply_checkpoint(module, resolve_path(spec.checkpoint, base_dir, where="[model].checkpoint"))
        names = list(getattr(tokenizer, "model_input_names", []) or [])
        return TorchModel(module, origin=self.origin(spec, base_dir), tokenizer=tokenizer, input_names=names)


class PythonLoader(Loader):
    """`factory = "module:callable"` returning an nn.Module, with an optional weights-only checkpoint."""

    name = "python"
    needs = ("factory",)

    def validate(self, spec: ModelSpec, base_dir: Path, where: str) -> None:
        super().validate(spec, base_dir, where)
        resolve_callable(spec.factory, base_dir, f"{where}: [model].factory")

    def load(self, spec: ModelSpec, base_dir: Path) -> ModelArtifact:
        import torch

        factory = resolve_callable(spec.factory, base_dir, "[model].factory")
        try:
            module = factory(**spec.kwargs)
        except Exception as exc:  # noqa: BLE001
            raise RunError(f"[model].factory {spec.factory!r} raised {type(exc).__name__}: {exc}") from None
        if not isinstance(module, torch.nn.Module):
            raise RunError(f"[model].factory {spec.factory!r} returned a {type(module).__name__}, not a "
                           "torch.nn.Module")
        if spec.checkpoint:
            apply_checkpoint(module, resolve_path(spec.checkpoint, base_dir, where="[model].checkpoint"))
        module.eval()
        return TorchModel(module, origin=self.origin(spec, base_dir), input_names=list(spec.inputs))


class TorchvisionLoader(Loader):
    """A torchvision architecture by name, with weights from a local file (no download)."""

    name = "torchvision"
    needs = ("name",)

    def task(self, spec: ModelSpec, base_dir: Path) -> str | None:
        return "image-classification"

    def validate(self, spec: ModelSpec, base_dir: Path, where: str) -> None:
        super().validate(spec, base_dir, where)
        if importlib.util.find_spec("torchvision") is None:
            raise ConfigError(f"{where}: [model] source = 'torchvision' needs torchvision (pip install torchvision)")

    def load(self, spec: ModelSpec, base_dir: Path) -> ModelArtifact:
        import torchvision

        if spec.name not in torchvision.models.list_models():
            raise ConfigError(f"[model].name = {spec.name!r} is not a torchvision model")
        module = torchvision.models.get_model(spec.name, weights=None, **spec.kwargs)
        if spec.checkpoint:
            apply_checkpoint(module, resolve_path(spec.checkpoint, base_dir, where="[model].checkpoint"))
        module.eval()
        inputs = list(spec.inputs) or ["x"]
        return TorchModel(module, origin=self.origin(spec, base_dir), input_names=inputs)


GGUF_MAGIC = b"GGUF"


def gguf_architecture(path: Path, where: str) -> str:
    """The architecture a GGUF file declares, read from its header (memory-mapped, no weights loaded)."""
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ConfigError(f"{where} = {str(path)!r}: cannot read it: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ConfigError(f"{where} = {str(path)!r} is not a GGUF file (it does not start with 'GGUF'); "
                          "it may be corrupt or of another format")
    try:
        return str(gguf_field(path, "general.architecture"))
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in many ways inside the reader
        raise unreadable(path, exc, "GGUF file") from None


def gguf_field(path: Path, key: str) -> str | int | None:
    """One metadata value of a GGUF file's header (a string or a number), or None when it is absent."""
    import gguf

    stat = path.stat()
    field = _gguf_fields(str(path), stat.st_mtime_ns, stat.st_size).get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types and field.types[0] == gguf.GGUFValueType.STRING else int(value[0])


@functools.lru_cache(maxsize=4)
def _gguf_fields(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    """A GGUF file's header fields, read once per file version: validate asks for several (architecture,
    context length, layer widths) and each read parses every tensor's entry."""
    import gguf

    return dict(gguf.GGUFReader(path).fields)


class GgufLoader(Loader):
    """A GGUF file (llama.cpp's format): its weights dequantized to float32 by transformers, its tokenizer
    and chat template with it. A model from a 4-bit file is judged against that dequantized model."""

    name = "gguf"

    def validate(self, spec: ModelSpec, base_dir: Path, where: str) -> None:
        super().validate(spec, base_dir, where)
        path = resolve_path(spec.path, base_dir, where=f"{where}: [model].path")
        if not path.is_file():
            raise ConfigError(f"{where}: [model].path = {spec.path!r}: {path} is not a file")
        if importlib.util.find_spec("gguf") is None:
            raise ConfigError(f"{where}: [model] source = 'gguf' needs the gguf package (pip install "
                              "\"optitool[llm]\")")
        architecture = gguf_architecture(path, f"{where}: [model].path")
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
            known = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
            raise ConfigError(f"{where}: [model].path = {spec.path!r} holds a {architecture!r} model, which this "
                              f"transformers cannot load from GGUF; it loads {known}")

    def task(self, spec: ModelSpec, base_dir: Path) -> str | None:
        return "text-generation"  # transformers loads GGUF files as causal LMs only

    def context_length(self, spec: ModelSpec, base_dir: Path) -> int | None:
        path = resolve_path(spec.path, base_dir, where="[model].path")
        try:
            length = gguf_field(path, f"{gguf_field(path, 'general.architecture')}.context_length")
        except Exception:  # noqa: BLE001 - validate already refused a file it cannot read
            return None
        return length if isinstance(length, int) else None

    def weight_widths(self, spec: ModelSpec, base_dir: Path) -> dict[str, int] | None:
        path = resolve_path(spec.path, base_dir, where="[model].path")
        try:
            arch = gguf_field(path, "general.architecture")
            hidden, mlp, heads, key_length = (gguf_field(path, f"{arch}.{key}") for key in (
                "embedding_length", "feed_forward_length", "attention.head_count", "attention.key_length"))
        except Exception:  # noqa: BLE001 - validate already refused a file it cannot read
            return None
        if not isinstance(hidden, int):
            return None
        attention = heads * key_length if isinstance(heads, int) and isinstance(key_length, int) else hidden
        return {"hidden": hidden, "attention": attention} | ({"mlp": mlp} if isinstance(mlp, int) else {})

    def generates(self, spec: ModelSpec, base_dir: Path) -> bool:
        return True  # a GGUF file holds a causal LM

    def load(self, spec: ModelSpec, base_dir: Path) -> ModelArtifact:
        import torch
        import transformers

        path = resolve_path(spec.path, base_dir, where="[model].path")
        try:
            module = transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True, **spec.kwargs)
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                   local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for what it cannot convert
            raise unreadable(path, exc, "GGUF file") from None
        module.eval()
        return TorchModel(module, origin=self.origin(spec, base_dir), tokenizer=tokenizer,
                          input_names=["input_ids", "attention_mask"])


class TorchScriptLoader(Loader):
    name = "torchscript"

    def load(self, spec: ModelSpec, base_dir: Path) -> ModelArtifact:
        import torch

        module = torch.jit.load(str(resolve_path(spec.path, base_dir, where="[model].path")), map_location="cpu")
        module.eval()
        return TorchModel(module, origin=self.origin(spec, base_dir), input_names=list(spec.inputs),
                          reloadable=False)


class ExportedProgramLoader(Loader):
    name = "exported_program"

    def load(self, spec: ModelSpec, base_dir: Path) -> ModelArtifact:
        import torch

        program = torch.export.load(str(resolve_path(spec.path, base_dir, where="[model].path")))
        return TorchModel(program.module(), origin=self.origin(spec, base_dir), input_names=list(spec.inputs),
                          reloadable=False)


class OnnxLoader(Loader):
    name = "onnx"
    kind = "onnx"

    def load(self, spec: ModelSpec, base_dir: Path) -> ModelArtifact:

        path = resolve_path(spec.path, base_dir, where="[model].path")
        graph = read_onnx_graph(path)
        initializers = {i.name for i in graph.initializer}
        names = [i.name for i in graph.input if i.name not in initializers]
        tokenizer = None
        if spec.name:  # a tokenizer folder or id for text models exported elsewhere
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(spec.name, local_files_only=True)
        return OnnxModel(path, tokenizer=tokenizer, input_names=names)


class StageLoader(Loader):
    """A stage folder saved by an earlier run (`01-<stage>/`): rebuilt from its origin, then its weights."""

    name = "stage"

    def __init__(self, loaders: Mapping[str, Loader] | None = None) -> None:
        self._loaders = loaders

    def validate(self, spec: ModelSpec, base_dir: Path, where: str) -> None:
        super().validate(spec, base_dir, where)
        folder = resolve_path(spec.path, base_dir, where=where)
        if not (folder / "model.json").is_file() and not (folder / "model.onnx").is_file():
            raise ConfigError(f"{where}: [model].path = {spec.path!r} is not a stage folder of an optitool run "
                              "(it has neither model.json nor model.onnx)")

    def weight_widths(self, spec: ModelSpec, base_dir: Path) -> dict[str, int] | None:
        """A torch stage's widths as saved: its recorded config sizes, which structural passes keep current."""
        folder = resolve_path(spec.path, base_dir, where="[model].path")
        try:
            structure = _stage_meta(folder).get("structure") or {}
        except ConfigError:
            return None
        return config_widths(structure.get("config") or {})

    def load(self, spec: ModelSpec, base_dir: Path) -> ModelArtifact:
        return load_stage(resolve_path(spec.path, base_dir, where="[model].path"), self._loaders or LOADERS)


def config_widths(config: dict[str, Any]) -> dict[str, int] | None:
    """Input widths by role from a Hugging Face config's fields (None when it names no hidden width)."""
    hidden = _first_int(config, "hidden_size", "n_embd", "d_model", "dim")
    if hidden is None:
        return None
    heads = _first_int(config, "num_attention_heads", "n_head")
    head_dim = _first_int(config, "head_dim")
    mlp = _first_int(config, "intermediate_size", "n_inner", "ffn_dim", "hidden_dim")
    if mlp is None and config.get("model_type") == "gpt2":
        mlp = 4 * hidden  # GPT-2's n_inner = null means four times the width
    widths = {"hidden": hidden, "attention": heads * head_dim if heads and head_dim else hidden}
    return widths | ({"mlp": mlp} if mlp else {})


def _first_int(config: dict[str, Any], *keys: str) -> int | None:
    """The first of `keys` the config sets to a positive integer (families name the same width differently)."""
    return next((config[k] for k in keys if isinstance(config.get(k), int) and config[k] > 0), None)


def hf_config(folder: Path) -> dict[str, Any]:
    """A Hugging Face folder's config.json as a dict ({} when it cannot be read: load says why)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def default_task(folder: Path) -> str:
    """The task a Hugging Face folder's own config names: a causal LM is loaded with its LM head (a bare
    AutoModel would drop it), anything else as a feature extractor."""
    from optitool.lm import CAUSAL_LM_SUFFIXES

    architectures = hf_config(folder).get("architectures") or []
    return "text-generation" if any(a.endswith(CAUSAL_LM_SUFFIXES) for a in architectures) else "feature-extraction"


def _weights_file(folder: Path) -> Path:
    """The file a Hugging Face folder keeps its weights in (for messages about it)."""
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt"):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    return folder


@contextmanager
def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _stage_meta(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / "model.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{folder} has no model.json, so it is not a stage folder optitool saved") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder / 'model.json'} cannot be read ({exc}); the stage folder is damaged") from None
    return meta if isinstance(meta, dict) else {}


def load_stage(folder: Path, loaders: Mapping[str, Loader], base: TorchModel | None = None) -> ModelArtifact:
    """A saved stage as a model again. A torch stage is its origin model rebuilt to the recorded structure
    with the saved weights; `base` (that origin, already loaded) saves loading it again."""
    import copy

    from optitool.spec import ModelSpec

    if (folder / "model.onnx").is_file():
        meta = json.loads((folder / "model.json").read_text()) if (folder / "model.json").is_file() else {}
        tokenizer = None
        if meta.get("tokenizer"):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(meta["tokenizer"], local_files_only=True)
        return OnnxModel(folder / "model.onnx", tokenizer=tokenizer, input_names=meta.get("input_names", []),
                         task=meta.get("task"))
    meta = _stage_meta(folder)
    if meta.get("kind") == "onnx":
        raise ConfigError(f"stage {folder} is an ONNX stage whose model.onnx is missing; the folder is incomplete")
    if not meta.get("reloadable", True):
        raise ConfigError(f"stage {folder} was saved for the record only ({meta.get('why', 'not reloadable')})")
    if "origin" not in meta or not (folder / "model.safetensors").is_file():
        missing = "an origin in its model.json" if "origin" not in meta else "model.safetensors"
        raise ConfigError(f"stage {folder} has no {missing}; the folder is incomplete or not a stage optitool saved")
    origin = ModelSpec.model_validate(meta["origin"])
    if origin.source not in loaders:
        raise ConfigError(f"stage {folder} was made from a model loaded by {origin.source!r}, a loader no plugin "
                          "registers now; install or unblock the plugin that provides it")
    if base is not None:
        base = dataclasses.replace(base, module=copy.deepcopy(base.module), masks={}, overrides={})
    else:
        with _quiet_transformers():  # the saved weights replace what it would warn about (e.g. a new head)
            base = loaders[origin.source].load(origin.model_copy(update={"checkpoint": None}), Path("/"))
    state = load_state_dict(folder / "model.safetensors")
    apply_structure(base.module, meta.get("structure", {}))
    apply_overrides(base.module, meta.get("overrides", {}))
    check_fits(base.module, state, f"stage {folder}")
    base.module.load_state_dict(state, strict=False)
    base.overrides = meta.get("overrides", {})
    return base


LOADERS: dict[str, Loader] = {
    loader.name: loader
    for loader in (HfLoader(), PythonLoader(), TorchvisionLoader(), TorchScriptLoader(), ExportedProgramLoader(),
                   OnnxLoader(), GgufLoader(), StageLoader())
}
