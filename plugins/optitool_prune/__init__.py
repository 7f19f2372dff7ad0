"""Built-in plugin: `magnitude_prune` (unstructured, N:M and structured pruning that removes what it prunes)."""

from __future__ import annotations

from typing import Any

import optitool
from optitool_prune.magnitude import MagnitudePrune

OPTITOOL_API_VERSION = 1
__version__ = optitool.__version__


@optitool.hookimpl
def optitool_register_passes(registry: Any) -> None:
    registry.add(MagnitudePrune)
