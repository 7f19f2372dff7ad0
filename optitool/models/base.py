"""What every loader shares: path checks at validation time and the artifact's recorded origin."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

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
        table = spec.model_dump(exclude_none=True)
        for key in ("path", "checkpoint"):
            if key in table:
                table[key] = str(resolve_path(table[key], base_dir, where="[model]").resolve())
        return table


def load_state_dict(path: Path) -> dict[str, Any]:
    """Weights only: safetensors, or torch.load(weights_only=True); never unpickle arbitrary objects."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for unsafe or corrupt files
        raise ConfigError(f"checkpoint {path} could not be loaded as weights only ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0]}); optitool never unpickles arbitrary objects. Save a "
                          "state_dict with safetensors or torch.save(model.state_dict()).") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return state


def apply_checkpoint(module: Any, path: Path) -> None:
    state = load_state_dict(path)
    fit_to_state_dict(module, state)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or (missing and len(missing) == len(list(module.state_dict()))):
        raise ConfigError(f"checkpoint {path} does not fit the model: {len(unexpected)} unexpected keys "
                          f"(e.g. {unexpected[:3]}), {len(missing)} missing (e.g. {missing[:3]})")


def fit_to_state_dict(module: Any, state: dict[str, Any]) -> None:
    """Give Linear, Conv and norm layers the shapes of a saved state dict (structured pruning changes them)."""
    import torch

    for name, sub in list(module.named_modules()):  # a shallower student keeps fewer layers of a list
        if isinstance(sub, torch.nn.ModuleList) and len(sub):
            prefix = f"{name}." if name else ""
            present = {int(k[len(prefix):].split(".")[0]) for k in state
                       if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
            if present and max(present) + 1 < len(sub):
                del sub[max(present) + 1:]
    for name, sub in list(module.named_modules()):
        weight = state.get(f"{name}.weight" if name else "weight")
        if weight is None or not hasattr(sub, "weight") or sub.weight is None:
            continue
        if tuple(sub.weight.shape) == tuple(weight.shape):
            continue
        bias = getattr(sub, "bias", None) is not None
        if isinstance(sub, torch.nn.Linear):
            new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
        elif isinstance(sub, torch.nn.Conv2d):
            new = torch.nn.Conv2d(weight.shape[1] * sub.groups, weight.shape[0], sub.kernel_size, sub.stride,
                                  sub.padding, sub.dilation, sub.groups, bias=bias)
        elif isinstance(sub, torch.nn.BatchNorm2d):
            new = torch.nn.BatchNorm2d(weight.shape[0])
        elif isinstance(sub, torch.nn.LayerNorm):
            new = torch.nn.LayerNorm(weight.shape[0], eps=sub.eps)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, new)


def apply_overrides(module: Any, overrides: dict[str, dict[str, Any]]) -> None:
    for name, attrs in overrides.items():
        target = module.get_submodule(name) if name else module
        for attr, value in attrs.items():
            setattr(target, attr, value)
