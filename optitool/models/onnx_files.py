"""ONNX files on disk: their true size (external data included), copies, and saving past 2 GB."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

from optitool.errors import ConfigError

TWO_GB = 2 * 1024**3


def read_onnx_graph(path: Path) -> onnx.GraphProto:
    """The graph of an ONNX file (without its external data), or a ConfigError naming the file."""
    import onnx

    from optitool.models.base import unreadable

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others for damaged files
        raise unreadable(path, exc, "ONNX file") from None
    if not model.graph.node:
        raise ConfigError(f"ONNX file {path} could not be read: it has no graph nodes (truncated or empty?)")
    return model.graph


def external_files(path: Path) -> list[Path]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    found = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    found.add(path.parent / entry.value)
    return sorted(found)


def onnx_size_bytes(path: Path) -> int:
    return path.stat().st_size + sum(f.stat().st_size for f in external_files(path) if f.exists())


# Files beside a graph that a runtime reads to run it: onnxruntime-genai's genai_config.json (which names
# model.onnx, its inputs and the search settings) and the Hugging Face config and tokenizer files that
# onnxruntime-genai and Optimum load from the same folder.
COMPANION_FILES = ("genai_config.json", "config.json", "generation_config.json", "tokenizer.json",
                   "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja")


def carry_companions(source: Path, target: Path) -> list[str]:
    """Copy the companion files beside graph `source` to the folder of graph `target` when the two graphs
    take and give the same named inputs and outputs; returns the names copied.

    A pass that rewrites a graph's weights (quantization) leaves what a runtime's config describes intact,
    so the quantized folder runs in onnxruntime-genai as the exported one did; a pass that changes the
    graph's interface would leave such a config describing another graph, so nothing is carried then."""
    if source.parent.resolve() == target.parent.resolve():
        return []
    present = [name for name in COMPANION_FILES if (source.parent / name).is_file()
               and not (target.parent / name).exists()]
    if not present or _interface(source) != _interface(target):
        return []
    for name in present:
        shutil.copy2(source.parent / name, target.parent / name)
    return present


def _interface(path: Path) -> tuple[list[str], list[str]]:
    graph = read_onnx_graph(path)
    initializers = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in initializers], [o.name for o in graph.output]


def copy_onnx(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dest)
    for extra in external_files(src):
        shutil.copy2(extra, dest.parent / extra.name)
    return dest


def save_onnx(model: onnx.ModelProto, path: Path) -> Path:
    """Save a ModelProto, with its weights as external data when the file would pass protobuf's 2 GB limit."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() > TWO_GB - 64 * 1024**2 if _fits_bytesize(model) else True
    if large:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def _fits_bytesize(model: Any) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # noqa: BLE001 - protobuf refuses ByteSize() past 2 GB
        return False


# Inputs of quantized operators that carry quantization parameters (scales, zero points), not weights:
# counted as weights they made an int8 model look larger than the float one it came from.
QUANT_PARAM_INPUTS = {
    "QuantizeLinear": {1, 2}, "DequantizeLinear": {1, 2}, "DynamicQuantizeMatMul": {2, 3},
    "MatMulIntegerToFloat": {2, 3, 4, 5}, "MatMulInteger": {2, 3}, "ConvInteger": {2, 3},
    "QLinearMatMul": {1, 2, 4, 5, 6, 7}, "QLinearConv": {1, 2, 4, 5, 6, 7}, "QGemm": {1, 2, 4, 5, 7, 8},
    "QAttention": {3, 4, 6, 7}, "MatMulNBits": {2, 3, 4}, "GatherBlockQuantized": {2, 3},
}
# onnxruntime's quantizers name the parameters they add <tensor>_scale and <tensor>_zero_point; some reach
# the graph through ordinary ops (a dynamic MatMul multiplies its input's scale by the weight's in a Mul).
QUANT_PARAM_SUFFIXES = ("_scale", "_zero_point", "_scales", "_zero_points")
WEIGHT_TYPES = ("FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE", "INT8", "UINT8", "INT4", "UINT4")


def onnx_parameter_counts(path: Path) -> tuple[int, int]:
    """(weights, nonzero weights), counted as for a torch model's parameters: the elements of the float
    and quantized weight tensors. Quantization scales and zero points, shape constants and index
    tensors (integer types other than quantized weights) are not weights. A 4-bit block-quantized
    matrix (MatMulNBits) counts its K x N logical elements, not its packed bytes."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    slots: dict[str, set[tuple[str, int]]] = {}
    nbits_shape: dict[str, int] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            slots.setdefault(name, set()).add((node.op_type, index))
        if node.op_type == "MatMulNBits" and len(node.input) > 1:
            attrs = {a.name: a.i for a in node.attribute}
            nbits_shape[node.input[1]] = attrs.get("K", 0) * attrs.get("N", 0)
    weight_types = {getattr(onnx.TensorProto, name) for name in WEIGHT_TYPES if hasattr(onnx.TensorProto, name)}
    total = nonzero = 0
    for tensor in model.graph.initializer:
        uses = slots.get(tensor.name, set())
        if tensor.data_type not in weight_types or tensor.name.endswith(QUANT_PARAM_SUFFIXES) or (uses and all(
                i in QUANT_PARAM_INPUTS.get(op, set()) for op, i in uses)):
            continue
        array = numpy_helper.to_array(tensor)
        if array.size <= 1:
            continue
        if tensor.name in nbits_shape:
            total += nbits_shape[tensor.name]
            nonzero += nbits_shape[tensor.name]  # packed: zeros cannot be told without the zero points
            continue
        total += int(array.size)
        nonzero += int(np.count_nonzero(array))
    return total, nonzero
