"""Built-in plugin: `magnitude_prune` (unstructured, N:M and structured pruning that removes what it prunes)."""

from __future__ import annotations

import optitool
from optitool_prune.magnitude import MagnitudePrune

OPTITOOL_API_VERSION = 1
__version__ = optitool.__version__


@optitool.hookimpl
def optitool_register_passes(registry: optitool.PluginRegistry) -> None:
    registry.add(MagnitudePrune)
