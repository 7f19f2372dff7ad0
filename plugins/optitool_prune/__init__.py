"""Built-in plugin: `magnitude_prune` (mask-based: unstructured and N:M, by magnitude or Wanda),
`structured_prune` (removes MLP channels and attention heads) and `depth_prune` (removes whole blocks)."""

from __future__ import annotations

import optitool
from optitool_prune.magnitude import MagnitudePrune
from optitool_prune.structured_passes import DepthPrune, StructuredPrune

OPTITOOL_API_VERSION = 1
__version__ = optitool.__version__


@optitool.hookimpl
def optitool_register_passes(registry: optitool.PluginRegistry) -> None:
    registry.add(MagnitudePrune)
    registry.add(StructuredPrune)
    registry.add(DepthPrune)
