"""MatMulNBits nodes that read one tensor merged into one node, its output split back.

A SwiGLU MLP's gate and up projections (and a dynamo export's separate q, k and v) read the same tensor. As
separate MatMulNBits nodes, each call rounds that input to int8 blocks again (accuracy_level 4) and pays
onnxruntime's dispatch to its threads, which at batch 1 is a measurable share of a 4-bit projection's time
(SmolLM2's 30 gate/up pairs on a 2-core Intel Xeon: 2.45 -> 2.00 ms per token, one merged node each). Merging is
exact: each output column is computed from its own row of codes, scales and zero points, and the input's
rounding is per block of that input, the same for every column.

A merged node is named after the nodes it replaces, joined by `SEPARATOR`, and its Split gives each of them
its old output name, so the rest of the graph, and a reader looking for a projection by name, still find it.
"""

from __future__ import annotations

from typing import Any

SEPARATOR = "+"


def fuse_sibling_matmuls(model: Any) -> int:
    """Merge, in place, each set of MatMulNBits nodes that read the same input with the same K, bits, block
    size, accuracy level and kind of zero points (weights no other node reads); returns how many sets."""
    import numpy as np
    from onnx import helper, numpy_helper

    from optitool_quantize.source_grid import replace_nodes

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for output in graph.output:
        readers[output.name] = readers.get(output.name, 0) + 1

    groups: dict[tuple[Any, ...], list[Any]] = {}
    for node in graph.node:
        key = _sibling_key(node, initializers, readers)
        if key is not None:
            groups.setdefault(key, []).append(node)
    merged = [nodes for nodes in groups.values() if len(nodes) > 1]
    if not merged:
        return 0

    split_as_input = _default_opset(model) >= 13
    replacement: dict[int, list[Any]] = {}
    dropped: set[int] = set()
    for nodes in merged:
        arrays = [[numpy_helper.to_array(initializers[name]) for name in node.input[1:]] for node in nodes]
        widths = [int(_attributes(node)["N"]) for node in nodes]
        name = SEPARATOR.join(node.name for node in nodes)
        fused_inputs = [nodes[0].input[0]]
        for position, suffix in enumerate(("weight", "scales", "zero_points")[:len(nodes[0].input) - 1]):
            parts = [a[position] for a in arrays]
            stacked = np.concatenate(parts if position == 0 else [p.reshape(-1) for p in parts], axis=0)
            tensor_name = f"{name}_{suffix}"
            graph.initializer.append(numpy_helper.from_array(stacked, tensor_name))
            fused_inputs.append(tensor_name)
        attributes = {**_attributes(nodes[0]), "N": sum(widths)}
        product = f"{name}_output"
        fused = helper.make_node("MatMulNBits", fused_inputs, [product], name=name, domain="com.microsoft",
                                 **attributes)
        outputs = [node.output[0] for node in nodes]
        if split_as_input:
            sizes = f"{name}_split_sizes"
            graph.initializer.append(numpy_helper.from_array(np.array(widths, np.int64), sizes))
            split = helper.make_node("Split", [product, sizes], outputs, name=f"{name}_split", axis=-1)
        else:
            split = helper.make_node("Split", [product], outputs, name=f"{name}_split", axis=-1, split=widths)
        replacement[id(nodes[0])] = [fused, split]
        dropped.update(id(node) for node in nodes[1:])

    kept: list[Any] = []
    for node in graph.node:
        if id(node) in replacement:
            kept.extend(replacement[id(node)])
        elif id(node) not in dropped:
            kept.append(node)
    replace_nodes(model, kept, contrib=True)
    return len(merged)


def unfused_weights(graph: Any, arrays: dict[str, Any]) -> dict[str, Any]:
    """Each MatMulNBits weight as float [K, N], by the name of the node that computed it before any merge
    (`arrays`: initializer name -> numpy array): a merged node's weight cut back at its Split's sizes."""
    import numpy as np

    from optitool_quantize.nbits import dequantize

    splits = {node.input[0]: node for node in graph.node if node.op_type == "Split"}
    weights: dict[str, Any] = {}
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        weight = dequantize(node, arrays)
        names = node.name.split(SEPARATOR)
        if len(names) == 1:
            weights[node.name] = weight
            continue
        split = splits[node.output[0]]
        sizes = (arrays[split.input[1]] if len(split.input) > 1 else _attributes(split)["split"])
        for name, part in zip(names, np.split(weight, np.cumsum(sizes)[:-1], axis=1), strict=True):
            weights[name] = part
    return weights


def _sibling_key(node: Any, initializers: dict[str, Any], readers: dict[str, int]) -> tuple[Any, ...] | None:
    """What a MatMulNBits node must share with another to be merged with it; None when it cannot be (a bias
    or group index input, weights read by another node too: a head shared with the embedding)."""
    if node.op_type != "MatMulNBits" or not 3 <= len(node.input) <= 4 or not all(node.input[1:]):
        return None
    if any(name not in initializers or readers.get(name, 0) != 1 for name in node.input[1:]):
        return None
    attributes = _attributes(node)
    kinds = tuple(initializers[name].data_type for name in node.input[2:])
    return (node.input[0], attributes.get("K"), attributes.get("bits", 4), attributes.get("block_size"),
            attributes.get("accuracy_level", 0), kinds)


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _default_opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
