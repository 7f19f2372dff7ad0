"""Built-in plugin: `int8_quantize`, on ONNX models through onnxruntime and on torch models."""

from __future__ import annotations

import optitool
from optitool_quantize.int8 import Int8Quantize

OPTITOOL_API_VERSION = 1
__version__ = optitool.__version__


@optitool.hookimpl
def optitool_register_passes(registry: optitool.PluginRegistry) -> None:
    registry.add(Int8Quantize)
