"""What every loader shares: path checks at validation time and the artifact's recorded origin."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from optitool.architectures import is_conv1d
from optitool.errors import ConfigError
from optitool.paths import resolve_path

if TYPE_CHECKING:
    from optitool.artifacts import ModelArtifact
    from optitool.spec import ModelSpec


class Loader:
    """A model loader. `validate` runs before anything loads; `load` builds the artifact."""

    name: str = ""
    kind: str = "torch"
    needs: tuple[str, ...] = ("path",)

    def validate(self, spec: ModelSpec, base_dir: Path, where: str) -> None:
        for key in self.needs:
            if getattr(spec, key) in (None, ""):
                raise ConfigError(f"{where}: [model] with source = {self.name!r} needs `{key}`")
        if spec.path is not None and "path" in self.needs:
            self.existing(spec.path, base_dir, f"{where}: [model].path")
        if spec.checkpoint is not None:
            self.existing(spec.checkpoint, base_dir, f"{where}: [model].checkpoint")

    def context_length(self, spec: ModelSpec, base_dir: Path) -> int | None:
        """The longest sequence the model takes, when its files say so without loading it (None: unknown).
        Sequence lengths asked of the model beyond it are refused before anything loads."""
        return None

    def task(self, spec: ModelSpec, base_dir: Path) -> str | None:
        """What the model does ("text-generation" for a causal LM), when its files say so without loading
        it (None: unknown). Budgets only a language model can meet are refused before anything loads."""
        return None

    def weight_widths(self, spec: ModelSpec, base_dir: Path) -> dict[str, int] | None:
        """The input widths of the model's linear layers by role ("hidden": what the attention projections and
        the MLP's first layers read; "attention": what the attention output projection reads; "mlp": what
        the MLP's last layer reads), when its files say so without loading it (None: unknown). Settings
        these widths cannot take (a quantization block that does not divide them) are refused before
        anything loads."""
        return None

    @staticmethod
    def existing(value: str, base_dir: Path, where: str) -> Path:
        path = resolve_path(value, base_dir, where=where)
        if not path.exists():
            raise ConfigError(f"{where} = {value!r}: {path} does not exist")
        return path

    def load(self, spec: ModelSpec, base_dir: Path) -> ModelArtifact:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def origin(spec: ModelSpec, base_dir: Path) -> dict[str, Any]:
        """The `[model]` table with paths made absolute, so a saved stage can be rebuilt from anywhere."""
        from optitool.user_code import portable_reference

        table = spec.model_dump(exclude_none=True)
        for key in ("path", "checkpoint"):
            if key in table:
                table[key] = str(resolve_path(table[key], base_dir, where="[model]").resolve())
        if isinstance(table.get("factory"), str):
            table["factory"] = portable_reference(table["factory"], base_dir)
        return table


def unreadable(path: Path, exc: BaseException, what: str = "model file") -> ConfigError:
    """One clear message for a model file that cannot be read, whatever library failed to read it.

    Only the first line of the library's own message is kept, and any advice to load with
    `weights_only=False` is dropped: that would execute whatever code the file carries."""
    first = (str(exc).strip().splitlines() or [""])[0]
    chain, seen = [], exc  # libraries wrap the reader's error (transformers 4 in "Unable to load weights")
    while seen is not None and len(chain) < 8:
        chain.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    pickled = any("weights_only" in text or "Unpickler" in text for text in chain)
    if pickled:
        detail = ("it is a pickle holding Python objects other than tensors, and optitool never unpickles "
                  "arbitrary objects; save the weights with safetensors (save_pretrained(..., "
                  "safe_serialization=True) or safetensors.torch.save_file(model.state_dict(), ...))")
    else:
        detail = (f"{type(exc).__name__}: {first}" if first else type(exc).__name__)
        detail += "; the file may be truncated or corrupt, or not of the format its name says"
    return ConfigError(f"{what} {path} could not be read: {detail}")


def load_state_dict(path: Path) -> dict[str, Any]:
    """Weights only: safetensors, or torch.load(weights_only=True); never unpickle arbitrary objects."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - readers raise many types for unsafe or corrupt files
        raise unreadable(path, exc, "checkpoint") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return state


def apply_checkpoint(module: Any, path: Path) -> None:
    """Load a user's checkpoint into the model the pipeline built, strictly: a checkpoint of another
    shape is another model, and optimizing it under the user's model's name would be a lie."""
    state = load_state_dict(path)
    check_fits(module, state, f"checkpoint {path}")
    module.load_state_dict(state, strict=False)


def check_fits(module: Any, state: dict[str, Any], what: str) -> None:
    """Raise a ConfigError naming the first tensor of `state` that does not fit `module`."""
    own = module.state_dict()
    for key, tensor in own.items():  # in the model's order, so "the first" means the first layer
        if key in state and tuple(state[key].shape) != tuple(tensor.shape):
            raise ConfigError(f"{what} does not fit the model: tensor {key!r} has shape {list(state[key].shape)} "
                              f"in the checkpoint but {list(tensor.shape)} in the model")
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise ConfigError(f"{what} does not fit the model: it has {len(unexpected)} tensors the model does not "
                          f"have (the first: {unexpected[0]!r})")
    aliases: dict[int, list[str]] = {}  # a tied weight (an LM head sharing the embedding) has several names
    for name, parameter in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    missing = sorted(names[0] for names in aliases.values() if not any(n in state for n in names))
    if missing:
        raise ConfigError(f"{what} does not fit the model: it lacks {len(missing)} of the model's parameters "
                          f"(the first: {missing[0]!r})")


RESIZABLE = ("Linear", "Conv1d", "Conv2d", "BatchNorm1d", "BatchNorm2d", "LayerNorm", "Embedding")


def describe_structure(module: Any) -> dict[str, Any]:
    """What a pass may have changed in a model's architecture: the length of each layer list and the weight
    shape of each resizable layer. Saved with a stage so reloading rebuilds exactly that architecture."""
    import torch

    lists = {name: len(sub) for name, sub in module.named_modules() if isinstance(sub, torch.nn.ModuleList)}
    resizable = tuple(getattr(torch.nn, kind) for kind in RESIZABLE)
    shapes = {name: list(sub.weight.shape) for name, sub in module.named_modules()
              if (isinstance(sub, resizable) or is_conv1d(sub))
              and isinstance(getattr(sub, "weight", None), torch.Tensor)}
    return {"layer_lists": lists, "weights": shapes, "config": _sizes_in_config(module)}


def _sizes_in_config(module: Any) -> dict[str, Any]:
    """The integer and list fields of a Hugging Face config (layer counts, widths, head counts, per-layer
    lists): what a structural pass changes so that the config keeps describing the model."""
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    return {k: v for k, v in config.to_dict().items() if not k.startswith("_")
            and ((isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, list) and k != "architectures"))}


def apply_structure(module: Any, structure: dict[str, Any]) -> None:
    """Rebuild the architecture a stage recorded (`describe_structure`) on a freshly loaded origin model:
    shorter layer lists (a shallower student keeps the first N, renumbered) and resized layers
    (structured pruning)."""
    import torch

    config = getattr(module, "config", None)
    for key, value in structure.get("config", {}).items():
        if config is not None and getattr(config, key, None) != value:
            setattr(config, key, value)
    for name, length in structure.get("layer_lists", {}).items():
        sub = module.get_submodule(name)
        if isinstance(sub, torch.nn.ModuleList) and length < len(sub):
            del sub[length:]
    for name, shape in structure.get("weights", {}).items():
        try:
            sub = module.get_submodule(name)
        except AttributeError:
            continue
        if tuple(sub.weight.shape) != tuple(shape):
            _replace(module, name, _resized(sub, shape))


def _resized(sub: Any, shape: list[int]) -> Any:
    import torch

    bias = getattr(sub, "bias", None) is not None
    kind = type(sub).__name__
    if is_conv1d(sub):
        return type(sub)(shape[1], shape[0])  # Conv1D(nf = outputs, nx = inputs), weight [inputs, outputs]
    if kind == "Linear":
        return torch.nn.Linear(shape[1], shape[0], bias=bias)
    if kind in ("Conv1d", "Conv2d"):
        cls = getattr(torch.nn, kind)
        return cls(shape[1] * sub.groups, shape[0], sub.kernel_size, sub.stride, sub.padding, sub.dilation,
                   sub.groups, bias=bias)
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        return getattr(torch.nn, kind)(shape[0], eps=sub.eps, momentum=sub.momentum)
    if kind == "LayerNorm":
        return torch.nn.LayerNorm(shape[0], eps=sub.eps, elementwise_affine=True, bias=bias)
    return torch.nn.Embedding(shape[0], shape[1], padding_idx=sub.padding_idx)


def _replace(module: Any, name: str, new: Any) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, child, new)


def apply_overrides(module: Any, overrides: dict[str, dict[str, Any]]) -> None:
    for name, attrs in overrides.items():
        target = module.get_submodule(name) if name else module
        for attr, value in attrs.items():
            setattr(target, attr, value)
