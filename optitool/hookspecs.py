"""Every hook a plugin may implement. Keep this set small: a hook is added only when a real plugin needs it.

Registration hooks receive a registry bound to the calling plugin, so a name clash can name both plugins.
Lifecycle hooks are notifications (for experiment trackers and the like); their return values are ignored.
An implementation may take fewer arguments than the specification names, as with any pluggy hook.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from optitool.config import PipelineSpec
    from optitool.registry import PluginRegistry

hookspec = pluggy.HookspecMarker("optitool")


@hookspec
def optitool_register_passes(registry: PluginRegistry) -> None:
    """Add pass classes with `registry.add(PassClass)`."""


@hookspec
def optitool_register_loaders(registry: PluginRegistry) -> None:
    """Add model loaders with `registry.add_loader(loader)`; see `optitool.Loader`."""


@hookspec
def optitool_register_runtimes(registry: PluginRegistry) -> None:
    """Add benchmark runtimes with `registry.add_runtime(Runtime)`; see `optitool.Runtime`."""


@hookspec
def optitool_register_metrics(registry: PluginRegistry) -> None:
    """Add evaluation metrics with `registry.add_metric(name, fn)`; `fn(evaluation: optitool.Evaluation) -> float | None`."""


@hookspec
def optitool_register_architectures(registry: PluginRegistry) -> None:
    """Describe a model family's layers by role with `registry.add_architecture(optitool.Architecture(...))`,
    so pruning and distillation work on it; see `optitool.Architecture`."""


@hookspec
def optitool_pipeline_start(spec: PipelineSpec, run_dir: Path) -> None:
    """Called once the pipeline is validated and the run folder exists, before the model is loaded."""


@hookspec
def optitool_pass_finished(stage: dict[str, Any], run_dir: Path) -> None:
    """Called after each pass with the stage's record (the dict that becomes its entry in report.json)."""


@hookspec
def optitool_report_written(report: dict[str, Any], path: Path) -> None:
    """Called after report.json is written, with its content and its path."""
