"""Built-in plugin: `int8_quantize` (ONNX through onnxruntime, torch), `weight_only_quantize` (4- or
8-bit block-wise ONNX weights, MatMulNBits), and the data-aware roundings that prepare torch weights for it,
`gptq` and `imatrix`."""

from __future__ import annotations

import optitool
from optitool_quantize.data_aware import Gptq, Imatrix
from optitool_quantize.int8 import Int8Quantize
from optitool_quantize.weight_only import WeightOnlyQuantize

OPTITOOL_API_VERSION = 1
__version__ = optitool.__version__


@optitool.hookimpl
def optitool_register_passes(registry: optitool.PluginRegistry) -> None:
    registry.add(Int8Quantize)
    registry.add(WeightOnlyQuantize)
    registry.add(Gptq)
    registry.add(Imatrix)
