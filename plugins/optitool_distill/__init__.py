"""Built-in plugin: `distill`, knowledge distillation (and plain fine-tuning) with pruning masks kept."""

from __future__ import annotations

from typing import Any

import optitool
from optitool_distill.distill import Distill

OPTITOOL_API_VERSION = 1
__version__ = optitool.__version__


@optitool.hookimpl
def optitool_register_passes(registry: Any) -> None:
    registry.add(Distill)
