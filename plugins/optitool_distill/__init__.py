"""Built-in plugin: `distill`, knowledge distillation (and plain fine-tuning) with pruning masks kept."""

from __future__ import annotations

import optitool
from optitool_distill.distill import Distill

OPTITOOL_API_VERSION = 1
__version__ = optitool.__version__


@optitool.hookimpl
def optitool_register_passes(registry: optitool.PluginRegistry) -> None:
    registry.add(Distill)
