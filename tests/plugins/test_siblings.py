"""MatMulNBits nodes reading one tensor merged into one: the same outputs, the same stored weights, and only
nodes that can be merged are."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

K = 64
BLOCK = 16


def _matmul_nbits(rng, name: str, source: str, width: int, *, bits: int = 4, zero_points: bool = True,
                  accuracy_level: int = 4, weight: str | None = None) -> tuple[object, list[object]]:
    """A MatMulNBits node with random codes, scales and (optionally) zero points; `weight` names codes shared
    with another node instead of its own."""
    from onnx import helper, numpy_helper

    blocks = K // BLOCK
    arrays = {f"{name}_codes": rng.integers(0, 256, size=(width, blocks, BLOCK * bits // 8), dtype=np.uint8),
              f"{name}_scales": (rng.random(width * blocks, dtype=np.float32) + 0.5) / 64}
    if zero_points:
        per_byte = 8 // bits
        arrays[f"{name}_zeros"] = rng.integers(0, 256, size=width * -(-blocks // per_byte), dtype=np.uint8)
    inputs = [source, weight or f"{name}_codes", f"{name}_scales", *([f"{name}_zeros"] if zero_points else [])]
    if weight:
        del arrays[f"{name}_codes"]
    node = helper.make_node("MatMulNBits", inputs, [f"{name}_out"], name=name, domain="com.microsoft", K=K, N=width,
                            bits=bits, block_size=BLOCK, accuracy_level=accuracy_level)
    return node, [numpy_helper.from_array(a, n) for n, a in arrays.items()]


def _graph(opset: int = 21):
    """x feeds q/k/v-like siblings (merged), a pair in other bits (merged apart), one with other accuracy (alone);
    y feeds a node whose codes another node reads too (alone), and a symmetric pair (merged)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    specs = [("q", "x", 32, {}), ("k", "x", 16, {}), ("v", "x", 16, {}),
             ("gate8", "x", 24, {"bits": 8}), ("up8", "x", 24, {"bits": 8}),
             ("alone", "x", 16, {"accuracy_level": 0}),
             ("shared", "y", 16, {}), ("reader", "y", 16, {"weight": "shared_codes"}),
             ("sym_a", "y", 16, {"zero_points": False}), ("sym_b", "y", 32, {"zero_points": False})]
    nodes, initializers = [], []
    for name, source, width, options in specs:
        node, arrays = _matmul_nbits(rng, name, source, width, **options)
        nodes.append(node)
        initializers += arrays
    outputs = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, [1, 3, width])
               for n, (_, _, width, _) in zip(nodes, specs, strict=True)]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, K]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "siblings", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _run(model, feed):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in model.graph.output]
    return dict(zip(names, session.run(names, feed), strict=True))


@pytest.mark.parametrize("opset", [21, 11])  # the Split's sizes an input from opset 13, an attribute before
def test_merged_siblings_compute_what_the_separate_nodes_did(opset):
    import copy

    from onnx import numpy_helper
    from optitool_quantize.siblings import fuse_sibling_matmuls, unfused_weights

    model = _graph(opset)
    merged = copy.deepcopy(model)
    assert fuse_sibling_matmuls(merged) == 3  # q/k/v, the 8-bit pair, the symmetric pair
    onnx.checker.check_model(merged)
    nodes = {n.name: n for n in merged.graph.node if n.op_type == "MatMulNBits"}
    assert set(nodes) == {"q+k+v", "gate8+up8", "alone", "shared", "reader", "sym_a+sym_b"}
    assert len(nodes["sym_a+sym_b"].input) == 3  # no zero points appear where there were none

    rng = np.random.default_rng(1)
    feed = {name: rng.standard_normal((1, 3, K)).astype(np.float32) for name in ("x", "y")}
    before, after = _run(model, feed), _run(merged, feed)
    assert before.keys() == after.keys()
    for name, value in before.items():
        np.testing.assert_allclose(after[name], value, rtol=1e-5, atol=1e-5 * np.abs(value).max(), err_msg=name)

    def arrays(m):
        return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}

    separate, stored = unfused_weights(model.graph, arrays(model)), unfused_weights(merged.graph, arrays(merged))
    assert stored.keys() == separate.keys()
    for name, weight in separate.items():
        np.testing.assert_array_equal(stored[name], weight, err_msg=name)


def test_a_graph_without_siblings_is_left_as_it_was():
    import copy

    from optitool_quantize.siblings import fuse_sibling_matmuls

    model = _graph()
    keep = {"alone", "shared", "reader"}
    kept = [n for n in model.graph.node if n.name in keep]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    outputs = [o for o in model.graph.output if o.name in {n.output[0] for n in kept}]
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    before = copy.deepcopy(model)
    assert fuse_sibling_matmuls(model) == 0
    assert model == before
