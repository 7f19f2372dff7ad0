"""get_plugin_manager(): the one place plugins are loaded.

Built-in passes are found through the same `optitool` entry-point group as third-party ones. A plugin
that fails to import, declares another API version, implements an unknown hook or registers a name
twice is reported by name and left out; the others still work.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy

from optitool import hookspecs
from optitool.registry import Registry

ENTRY_POINT_GROUP = "optitool"
API_VERSION = 1
AUTOLOAD_ENV = "OPTITOOL_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_ENV = "OPTITOOL_BLOCK_PLUGINS"
CORE_PLUGIN = "optitool.builtin"
# Used only when optitool runs from a source tree without its entry-point metadata installed.
BUILTIN_PLUGINS = {"prune": "optitool_prune", "quantize": "optitool_quantize",
                   "distill": "optitool_distill", "onnx": "optitool_onnx"}
REGISTRATION_HOOKS = ("optitool_register_passes", "optitool_register_loaders",
                      "optitool_register_runtimes", "optitool_register_metrics")


@dataclass
class PluginInfo:
    name: str
    module: str
    origin: str  # "core", "built-in", "entry point" or "explicit"
    version: str = ""
    error: str | None = None
    blocked: bool = False
    registered: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Plugins:
    """A plugin manager with what its plugins registered and what went wrong."""

    pm: pluggy.PluginManager
    registry: Registry
    infos: list[PluginInfo]

    @property
    def hook(self) -> Any:
        return self.pm.hook

    @property
    def broken(self) -> list[PluginInfo]:
        return [i for i in self.infos if i.error]

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call a lifecycle hook; a plugin that raises there is warned about, never fatal to the run."""
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            try:
                impl.function(**kwargs)
            except Exception as exc:  # noqa: BLE001 - a tracker plugin must not kill a finished run
                warnings.warn(f"plugin {impl.plugin_name!r} failed in {hook_name}: {exc}", stacklevel=2)


def _blocked_names(blocked: tuple[str, ...]) -> set[str]:
    names = {b.strip() for b in os.environ.get(BLOCK_ENV, "").split(",") if b.strip()}
    return names | set(blocked)


def _api_problem(module: ModuleType) -> str | None:
    declared = getattr(module, "OPTITOOL_API_VERSION", None)
    if declared is None:
        return None
    try:
        major = int(str(declared).split(".")[0])
    except ValueError:
        return f"declares OPTITOOL_API_VERSION = {declared!r}, which is not a version number"
    if major != API_VERSION:
        return (f"declares optitool plugin API version {declared}, but this optitool provides version "
                f"{API_VERSION}; install a release of the plugin made for API {API_VERSION}")
    return None


def _unknown_hooks(module: ModuleType) -> list[str]:
    known = {n for n in dir(hookspecs) if n.startswith("optitool_")}
    return sorted(n for n in dir(module) if n.startswith("optitool_") and callable(getattr(module, n))
                  and n not in known)


def _candidates(autoload: bool, extra: tuple[str, ...]) -> list[tuple[str, str, str, str]]:
    """(name, module, origin, version) for each plugin to try, built-ins first."""
    found: list[tuple[str, str, str, str]] = [("core", CORE_PLUGIN, "core", _own_version())]
    builtin, third = [], []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        dist_name = (dist.metadata["Name"] if dist is not None else "") or ""
        version = dist.version if dist is not None else ""
        if dist_name.lower() == "optitool":
            builtin.append((ep.name, ep.value, "built-in", version))
        elif autoload:
            third.append((ep.name, ep.value, "entry point", version))
    if not builtin:
        builtin = [(n, m, "built-in", _own_version()) for n, m in BUILTIN_PLUGINS.items()]
    seen = {b[0] for b in builtin}
    found += builtin + [t for t in third if t[0] not in seen]
    found += [(m, m, "explicit", "") for m in extra]
    return found


def _own_version() -> str:
    from optitool import __version__

    return __version__


def get_plugin_manager(*, autoload: bool | None = None, blocked: tuple[str, ...] = (),
                       plugins: tuple[str, ...] = (), modules: tuple[ModuleType | Any, ...] = ()) -> Plugins:
    """Load plugins and run their registration hooks.

    `autoload=False` (or OPTITOOL_DISABLE_PLUGIN_AUTOLOAD=1) loads only optitool's own plugins;
    `blocked` (and OPTITOOL_BLOCK_PLUGINS=a,b) names plugins never to load; `plugins` names modules
    to load explicitly; `modules` registers already imported objects (used by the test kit).
    """
    if autoload is None:
        autoload = os.environ.get(AUTOLOAD_ENV, "") not in ("1", "true", "yes")
    pm = pluggy.PluginManager("optitool")
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    block = _blocked_names(blocked)
    targets: list[tuple[str, Any, str, str]] = list(_candidates(autoload, plugins))
    targets += [(getattr(m, "__name__", repr(m)), m, "explicit", "") for m in modules]
    for name, target, origin, version in targets:
        module_name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
        info = PluginInfo(name=name, module=module_name, origin=origin, version=version)
        infos.append(info)
        if name in block and origin != "core":
            info.blocked = True
            continue
        try:
            module = importlib.import_module(target) if isinstance(target, str) else target
        except Exception as exc:  # noqa: BLE001 - a broken plugin is reported, not fatal
            info.error = f"import of {module_name!r} failed: {type(exc).__name__}: {exc}"
            continue
        info.version = info.version or str(getattr(module, "__version__", ""))
        problem = _api_problem(module)
        unknown = _unknown_hooks(module)
        if unknown:
            problem = (f"implements {', '.join(unknown)}, which optitool does not define "
                       "(a misspelled hook name?)")
        if problem:
            info.error = problem
            continue
        pm.register(module, name=name)
    pm.check_pending()
    registry = _register(pm, infos)
    _warn_broken(infos)
    return Plugins(pm=pm, registry=registry, infos=infos)


def _register(pm: pluggy.PluginManager, infos: list[PluginInfo]) -> Registry:
    registry = Registry()
    by_name = {i.name: i for i in infos}
    for hook_name in REGISTRATION_HOOKS:
        for impl in getattr(pm.hook, hook_name).get_hookimpls():  # registration order: built-ins first
            info = by_name[impl.plugin_name]
            if info.error:
                continue
            try:
                impl.function(registry=registry.bound(impl.plugin_name))
            except Exception as exc:  # noqa: BLE001
                info.error = f"{hook_name} failed: {type(exc).__name__}: {exc}"
    for info in infos:
        info.registered = registry.registered_by(info.name)
    return registry


def _warn_broken(infos: list[PluginInfo]) -> None:
    for info in infos:
        if info.error:
            warnings.warn(f"optitool plugin {info.name!r} ({info.module}) was left out: {info.error}",
                          stacklevel=3)
