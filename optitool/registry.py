"""What plugins registered: passes, loaders, runtimes and metrics, each with the plugin that added it."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optitool.errors import PluginError
from optitool.passes import KINDS, Pass, PassConfig

if TYPE_CHECKING:
    from optitool.architectures import Architecture
    from optitool.bench.runtimes import Runtime
    from optitool.metrics import Evaluation
    from optitool.models.base import Loader


@dataclass(frozen=True)
class Registered:
    name: str
    obj: Any
    plugin: str


@dataclass
class Registry:
    """Everything registered in one plugin manager. Built per run; there is no global registry."""

    passes: dict[str, Registered] = field(default_factory=dict)
    loaders: dict[str, Registered] = field(default_factory=dict)
    runtimes: dict[str, Registered] = field(default_factory=dict)
    metrics: dict[str, Registered] = field(default_factory=dict)
    architectures: dict[str, Registered] = field(default_factory=dict)

    def loader_view(self) -> LoaderView:
        return LoaderView(self)

    def bound(self, plugin: str) -> PluginRegistry:
        return PluginRegistry(self, plugin)

    def pass_class(self, name: str) -> type[Pass]:
        return self.passes[name].obj

    def _tables(self) -> dict[str, dict[str, Registered]]:
        return {"passes": self.passes, "loaders": self.loaders, "runtimes": self.runtimes, "metrics": self.metrics,
                "architectures": self.architectures}

    def registered_by(self, plugin: str) -> dict[str, list[str]]:
        return {what: sorted(n for n, r in items.items() if r.plugin == plugin) for what, items in self._tables().items()}

    def remove_plugin(self, plugin: str) -> None:
        """Forget everything `plugin` registered (its registration failed part-way)."""
        for items in self._tables().values():
            for name in [n for n, r in items.items() if r.plugin == plugin]:
                del items[name]


def _check_pass_class(cls: Any) -> None:
    if not (inspect.isclass(cls) and issubclass(cls, Pass)):
        raise PluginError(f"{cls!r} is not a subclass of optitool.Pass")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"pass class {cls.__qualname__} has no `name` string")
    if not (inspect.isclass(cls.Config) and issubclass(cls.Config, PassConfig)):
        raise PluginError(f"pass {name!r}: `Config` must subclass optitool.PassConfig")
    bad = [k for k in cls.accepted_kinds() if k not in KINDS]
    if bad or not cls.accepted_kinds():
        raise PluginError(f"pass {name!r}: `takes` must be one of {KINDS} (or a tuple of them), not {cls.takes!r}")
    if cls.gives not in (*KINDS, "same"):
        raise PluginError(f"pass {name!r}: `gives` must be one of {KINDS} or 'same', not {cls.gives!r}")
    if cls.run is Pass.run:
        raise PluginError(f"pass {name!r} does not implement run(self, model, ctx)")


class LoaderView(Mapping):
    """The registry's loaders by name, live: loaders registered later are seen too."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def __getitem__(self, name: str) -> Any:
        return self._registry.loaders[name].obj

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry.loaders)

    def __len__(self) -> int:
        return len(self._registry.loaders)


class PluginRegistry:
    """The registry as one plugin sees it: every addition is recorded under that plugin's name."""

    def __init__(self, registry: Registry, plugin: str) -> None:
        self._registry, self.plugin = registry, plugin

    def _put(self, table: dict[str, Registered], what: str, name: str, obj: Any) -> None:
        if name in table:
            raise PluginError(
                f"{what} {name!r} is registered twice: by plugin {table[name].plugin!r} and by plugin "
                f"{self.plugin!r}; block one of them (OPTITOOL_BLOCK_PLUGINS={self.plugin}) or rename the {what}"
            )
        table[name] = Registered(name, obj, self.plugin)

    def add(self, pass_class: type[Pass]) -> None:
        _check_pass_class(pass_class)
        self._put(self._registry.passes, "pass", pass_class.name, pass_class)

    @property
    def loaders(self) -> LoaderView:
        """Every loader registered in this run (a loader that rebuilds saved stages needs the others)."""
        return self._registry.loader_view()

    def add_loader(self, loader: Loader) -> None:
        """A loader has `name`, `kind`, `load(spec, base_dir)` and optionally `validate(spec, base_dir, where)`."""
        self._put(self._registry.loaders, "loader", loader.name, loader)

    def add_runtime(self, runtime: type[Runtime]) -> None:
        self._put(self._registry.runtimes, "runtime", runtime.name, runtime)

    def add_metric(self, name: str, fn: Callable[[Evaluation], float | None]) -> None:
        self._put(self._registry.metrics, "metric", name, fn)

    def add_architecture(self, architecture: Architecture) -> None:
        """A model family's layout by role (`optitool.Architecture`), for the passes that find layers by role."""
        self._put(self._registry.architectures, "architecture", architecture.family, architecture)
