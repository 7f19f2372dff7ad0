"""Reading an ONNX graph's nodes without its weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


@pytest.mark.parametrize("external", [False, True])
def test_the_nodes_read_without_the_weights_are_the_graphs_nodes(tmp_path, external):
    from optitool.onnx_decoding import graph_nodes

    weight = numpy_helper.from_array(np.arange(64 * 300, dtype=np.float32).reshape(64, 300), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm", domain=""),
             helper.make_node("Relu", ["y"], ["z"], name="relu"),
             helper.make_node("Transpose", ["z"], ["t"], name="tr", perm=[1, 0])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("t", TensorProto.FLOAT, [300, 1])], [weight])
    model = helper.make_model(graph, producer_name="a producer name longer than one byte's worth of varint " * 3)
    path = tmp_path / "m.onnx"
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    read = graph_nodes(path)
    assert [n.SerializeToString() for n in read] == [n.SerializeToString() for n in nodes]
