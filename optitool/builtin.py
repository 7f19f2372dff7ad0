"""The core's own plugin: model loaders, benchmark runtimes, metrics and model families, registered through the same hooks
third-party plugins use. It knows no particular pass."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from optitool.registry import PluginRegistry

hookimpl = pluggy.HookimplMarker("optitool")


@hookimpl
def optitool_register_loaders(registry: PluginRegistry) -> None:
    from optitool.models.loaders import LOADERS, StageLoader

    for loader in LOADERS.values():
        # A saved stage is rebuilt by the loader it came from, which may be another plugin's.
        registry.add_loader(StageLoader(registry.loaders) if isinstance(loader, StageLoader) else loader)


@hookimpl
def optitool_register_runtimes(registry: PluginRegistry) -> None:
    from optitool.bench.runtimes import BUILTIN_RUNTIMES

    for runtime in BUILTIN_RUNTIMES:
        registry.add_runtime(runtime)


@hookimpl
def optitool_register_metrics(registry: PluginRegistry) -> None:
    from optitool.metrics import BUILTIN_METRICS

    for name, fn in BUILTIN_METRICS.items():
        registry.add_metric(name, fn)


@hookimpl
def optitool_register_architectures(registry: PluginRegistry) -> None:
    from optitool.architectures import BUILTIN_ARCHITECTURES

    for architecture in BUILTIN_ARCHITECTURES:
        registry.add_architecture(architecture)
