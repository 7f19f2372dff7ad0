"""get_plugin_manager(): the one place plugins are loaded.

Built-in passes are found through the same `optitool` entry-point group as third-party ones. A plugin
that fails to import, declares another API version, implements an unknown hook or a hook with a wrong
signature, or registers a name twice is reported by name and left out; the others still work.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pluggy

from optitool import hookspecs
from optitool.registry import Registry
from optitool.version import API_VERSION, __version__

ENTRY_POINT_GROUP = "optitool"
AUTOLOAD_ENV = "OPTITOOL_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_ENV = "OPTITOOL_BLOCK_PLUGINS"
PLUGINS_ENV = "OPTITOOL_PLUGINS"  # modules to load as plugins, comma-separated (as PYTEST_PLUGINS): reaches the
# fresh processes of search trials, which no command-line flag does
CORE_PLUGIN = "optitool.builtin"
REGISTRATION_HOOKS = ("optitool_register_passes", "optitool_register_loaders",
                      "optitool_register_runtimes", "optitool_register_metrics", "optitool_register_architectures")


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

    def notify(self, hook_name: str, *, on_failure: Callable[[str], None] | None = None, **kwargs: Any) -> None:
        """Call a lifecycle hook in pluggy's order (tryfirst/trylast honoured, each implementation given
        only the arguments it declares); a plugin that raises is reported to `on_failure` (a Python warning
        without one), never fatal to the run."""
        for plugin_name, call in _callers_in_call_order(self.pm, hook_name):
            try:
                call(**kwargs)
            except Exception as exc:  # noqa: BLE001 - a tracker plugin must not kill a finished run
                message = f"plugin {plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {exc}"
                if on_failure is not None:
                    on_failure(message)
                else:
                    warnings.warn(message, stacklevel=2)


def _callers_in_call_order(pm: pluggy.PluginManager, hook_name: str) -> list[tuple[str, Callable[..., Any]]]:
    """One caller per implementing plugin, in the order pluggy itself would call them (it calls the list
    `get_hookimpls()` returns from the end), each going through pluggy so its argument handling applies."""
    impls = getattr(pm.hook, hook_name).get_hookimpls()
    out = []
    for impl in reversed(impls):
        others = [i.plugin for i in impls if i.plugin is not impl.plugin]
        out.append((impl.plugin_name, pm.subset_hook_caller(hook_name, remove_plugins=others)))
    return out


def _blocked_names(blocked: tuple[str, ...]) -> set[str]:
    names = {b.strip() for b in os.environ.get(BLOCK_ENV, "").split(",") if b.strip()}
    return names | set(blocked)


def _api_problem(module: Any) -> str | None:
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


def _unknown_hooks(module: Any) -> list[str]:
    known = {n for n in dir(hookspecs) if n.startswith("optitool_")}
    return sorted(n for n in dir(module) if n.startswith("optitool_") and callable(getattr(module, n))
                  and n not in known)


def _source_tree_entry_points() -> list[tuple[str, str]]:
    """The `optitool` entry points declared in pyproject.toml beside the package, for a source tree used
    without being installed (as on a machine that only got a copy of the repository): the core still
    names no plugin of its own, and the plugins' folder becomes importable."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        return []
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return []
    declared = project.get("entry-points", {}).get(ENTRY_POINT_GROUP, {})
    if declared and str(root / "plugins") not in sys.path:
        sys.path.append(str(root / "plugins"))
    return sorted(declared.items())


def _candidates(autoload: bool, builtins: bool, extra: tuple[str, ...]) -> list[tuple[str, str, str, str]]:
    """(name, module, origin, version) for each plugin to try: the core, built-ins, then the others."""
    found: list[tuple[str, str, str, str]] = [("core", CORE_PLUGIN, "core", __version__)]
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
        builtin = [(n, m, "built-in", __version__) for n, m in _source_tree_entry_points()]
    seen = {b[0] for b in builtin}
    found += (builtin if builtins else []) + [t for t in third if t[0] not in seen]
    found += [(m, m, "explicit", "") for m in extra]
    return found


def get_plugin_manager(*, autoload: bool | None = None, builtins: bool = True, blocked: tuple[str, ...] = (),
                       plugins: tuple[str, ...] = (), modules: tuple[Any, ...] = ()) -> Plugins:
    """Load plugins and run their registration hooks.

    `autoload=False` (or OPTITOOL_DISABLE_PLUGIN_AUTOLOAD=1) loads only optitool's own plugins;
    `builtins=False` leaves out the built-in passes too (the core's loaders, runtimes and metrics stay);
    `blocked` (and OPTITOOL_BLOCK_PLUGINS=a,b) names plugins never to load; `plugins` names modules to
    load explicitly (and OPTITOOL_PLUGINS=mod_a,mod_b); `modules` registers already imported objects (used by
    the test kit).
    """
    plugins = (*plugins, *(m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()))
    if autoload is None:
        autoload = os.environ.get(AUTOLOAD_ENV, "") not in ("1", "true", "yes")
    pm = pluggy.PluginManager("optitool")
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    block = _blocked_names(blocked)
    targets: list[tuple[str, Any, str, str]] = list(_candidates(autoload, builtins, plugins))
    targets += [(getattr(m, "__name__", repr(m)), m, "explicit", "") for m in modules]
    for name, target, origin, version in targets:
        module_name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
        info = PluginInfo(name=name, module=module_name, origin=origin, version=version)
        infos.append(info)
        if name in block and origin != "core":
            info.blocked = True
            continue
        info.error = _load_one(pm, name, target, info)
    pm.check_pending()
    registry = _register(pm, infos)
    _warn_broken(infos)
    return Plugins(pm=pm, registry=registry, infos=infos)


def _load_one(pm: pluggy.PluginManager, name: str, target: Any, info: PluginInfo) -> str | None:
    """Import and register one plugin; what went wrong, or None. Nothing a plugin does here may raise."""
    try:
        module = importlib.import_module(target) if isinstance(target, str) else target
    except BaseException as exc:  # noqa: BLE001 - a broken plugin is reported, not fatal (SystemExit too)
        if isinstance(exc, KeyboardInterrupt):
            raise
        return f"import of {info.module!r} failed: {type(exc).__name__}: {exc}"
    info.version = info.version or str(getattr(module, "__version__", ""))
    unknown = _unknown_hooks(module)
    if unknown:
        return f"implements {', '.join(unknown)}, which optitool does not define (a misspelled hook name?)"
    problem = _api_problem(module)
    if problem:
        return problem
    try:
        pm.register(module, name=name)
    except pluggy.PluginValidationError as exc:
        return f"a hook does not match its specification: {' '.join(str(exc).split())}"
    except Exception as exc:  # noqa: BLE001
        return f"registration failed: {type(exc).__name__}: {exc}"
    return None


def _register(pm: pluggy.PluginManager, infos: list[PluginInfo]) -> Registry:
    """Run the registration hooks plugin by plugin in load order (core, built-ins, then the others), so a
    name clash is blamed on the later plugin and one plugin's failure leaves the others' registrations."""
    registry = Registry()
    for hook_name in REGISTRATION_HOOKS:
        callers = dict(_callers_in_call_order(pm, hook_name))
        for info in infos:
            if info.error or info.name not in callers:
                continue
            try:
                callers[info.name](registry=registry.bound(info.name))
            except Exception as exc:  # noqa: BLE001
                info.error = f"{hook_name} failed: {type(exc).__name__}: {exc}"
                registry.remove_plugin(info.name)  # a plugin is in whole or not at all
                pm.unregister(name=info.name)  # and its lifecycle hooks are not called either
    for info in infos:
        info.registered = registry.registered_by(info.name)
    return registry


def _warn_broken(infos: list[PluginInfo]) -> None:
    for info in infos:
        if info.error:
            warnings.warn(f"optitool plugin {info.name!r} ({info.module}) was left out: {info.error}",
                          stacklevel=3)
