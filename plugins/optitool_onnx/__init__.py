"""Built-in plugin: `onnx_export`, torch -> ONNX with verification against the torch model."""

from __future__ import annotations

import optitool
from optitool_onnx.export import OnnxExport

OPTITOOL_API_VERSION = 1
__version__ = optitool.__version__


@optitool.hookimpl
def optitool_register_passes(registry: optitool.PluginRegistry) -> None:
    registry.add(OnnxExport)
