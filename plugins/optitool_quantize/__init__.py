"""Built-in plugin: `int8_quantize` (ONNX through onnxruntime, torch) and `weight_only_quantize` (4- or
8-bit block-wise ONNX weights, MatMulNBits)."""

from __future__ import annotations

import optitool
from optitool_quantize.int8 import Int8Quantize
from optitool_quantize.weight_only import WeightOnlyQuantize

OPTITOOL_API_VERSION = 1
__version__ = optitool.__version__


@optitool.hookimpl
def optitool_register_passes(registry: optitool.PluginRegistry) -> None:
    registry.add(Int8Quantize)
    registry.add(WeightOnlyQuantize)
