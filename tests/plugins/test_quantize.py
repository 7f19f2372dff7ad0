from __future__ import annotations

import numpy as np
import onnx
import pytest
from optitool_quantize.int8 import Int8Quantize

from optitool.errors import ConfigError
from optitool.testing import check_pass_contract, run_snippet

MLP = """
[model]
source = "python"
factory = "optitool.testing:tiny_mlp"
kwargs = { hidden = 128 }
[model.inputs]
x = ["batch", 16]
[[passes]]
pass = "onnx_export"
"""


RANDOM = 'calibration_data = "random"'


@pytest.mark.parametrize("settings, op", [('mode = "dynamic"', "DynamicQuantizeLinear"),
                                          (f'mode = "static"\ncalibration = "minmax"\n{RANDOM}', "QuantizeLinear"),
                                          (f'mode = "static"\ncalibration = "percentile"\n{RANDOM}', "QuantizeLinear")])
def test_onnx_int8_shrinks_and_stays_close(tmp_path, settings, op):
    result = run_snippet(MLP + f'[[passes]]\npass = "int8_quantize"\n{settings}\n', tmp_path)
    stage = result.report["stages"][2]
    assert stage["metrics"]["size_ratio"] < 0.5
    assert stage["metrics"]["fidelity"] > 0.98
    ops = {n.op_type for n in onnx.load(result.run_dir / stage["artifact"]).graph.node}
    assert op in ops
    assert any("random inputs" in f for f in stage["flags"]) == ("static" in settings)


def test_static_int8_without_a_calibration_split_is_refused_before_running(tmp_path):
    with pytest.raises(ConfigError, match="needs a 'calibration' split"):
        run_snippet(MLP + '[[passes]]\npass = "int8_quantize"\nmode = "static"\n', tmp_path)
    assert not (tmp_path / "run").exists()


def test_fused_transformer_graph_still_quantizes_and_leaves_no_files_behind(tmp_path, optitool_tiny_bert,
                                                                            monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # onnxruntime's shape inference writes temporary files into the current folder
    snippet = (f'[model]\nsource = "hf"\npath = "{optitool_tiny_bert}"\nmax_length = 16\n'
               '[[passes]]\npass = "onnx_export"\nexporter = "dynamo"\noptimize = "transformer"\n'
               '[[passes]]\npass = "int8_quantize"\n')
    result = run_snippet(snippet, tmp_path)
    assert result.report["stages"][2]["metrics"]["size_ratio"] < 0.6
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in (result.run_dir / "02-int8_quantize").iterdir()) == [
        "model.json", "model.onnx", "stage.json"]


def test_torch_dynamic_int8_on_cpu(tmp_path):
    snippet = MLP.replace('[[passes]]\npass = "onnx_export"\n', "") + '[[passes]]\npass = "int8_quantize"\n'
    result = run_snippet(snippet, tmp_path)
    stage = result.report["stages"][1]
    assert stage["kind"] == "torch" and stage["metrics"]["fidelity"] > 0.98


def test_torch_dynamic_int8_keeps_a_tied_lm_head_tied_so_the_model_does_not_grow(
        tmp_path, optitool_tiny_causal_lm, optitool_text_folder):
    snippet = (f'[model]\nsource = "hf"\npath = "{optitool_tiny_causal_lm}"\nmax_length = 16\n'
               f'[data]\nsource = "folder"\npath = "{optitool_text_folder}"\nlabel_field = ""\n'
               'splits = { eval = 0.5 }\n[benchmark]\nsequence_lengths = [16]\n[[passes]]\npass = "int8_quantize"\n')
    base, quantized = (s["metrics"] for s in run_snippet(snippet, tmp_path).report["stages"])
    # a quantized copy of the head beside the float table was a second vocab x hidden matrix (GPT-2 grew
    # 21.3 -> 23.4 MB); the file of a tiny model is mostly pickling overhead, so count the weights
    assert quantized["parameters"] == base["parameters"] and quantized["tied_kept_float"] == ["lm_head"]


def test_weight_only_on_onnx_is_refused_before_running(tmp_path):
    from optitool.errors import ConfigError

    with pytest.raises(ConfigError, match="weight_only"):
        run_snippet(MLP + '[[passes]]\npass = "int8_quantize"\nmode = "weight_only"\n', tmp_path)


def test_contract(tmp_path):
    check_pass_contract(Int8Quantize, tmp_path=tmp_path)


@pytest.mark.parametrize("bits, max_rise", [(8, 0.01), (4, 0.5)])
def test_weight_only_quantization_of_a_language_model(tmp_path, optitool_text_folder, bits, max_rise):
    from optitool.testing import tiny_causal_lm_dir

    folder = tiny_causal_lm_dir(tmp_path / "lm", family="llama")
    snippet = (f'[model]\nsource = "hf"\npath = "{folder}"\nmax_length = 16\n[benchmark]\nsequence_lengths = [16]\n'
               f'[data]\nsource = "folder"\npath = "{optitool_text_folder}"\nlabel_field = ""\nsplits = {{ eval = 0.5 }}\n'
               f'[[passes]]\npass = "onnx_export"\n[[passes]]\npass = "weight_only_quantize"\nbits = {bits}\n'
               'block_size = 16\nop_types = ["MatMul", "Gather"]\n')
    result = run_snippet(snippet, tmp_path)
    base, exported, quantized = (s["metrics"] for s in result.report["stages"])
    ops = {n.op_type for n in onnx.load(result.run_dir / result.report["stages"][2]["artifact"]).graph.node}
    assert "MatMulNBits" in ops and quantized["quantized_nodes"] >= 2 * 7  # 7 projections per layer
    assert quantized["parameters"] == exported["parameters"]  # 4-bit blocks count as the weights they hold
    assert quantized["size_after_bytes"] < quantized["size_before_bytes"]  # a tiny graph's file is mostly structure
    assert quantized["perplexity"] / base["perplexity"] - 1 < max_rise and quantized["token_agreement"] > 0.5
    from optitool_quantize.weight_only import default_accuracy_level

    graph = onnx.load(result.run_dir / result.report["stages"][2]["artifact"]).graph
    levels = {next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
              for n in graph.node if n.op_type == "MatMulNBits"}  # a decoder gets the device's default too
    assert levels == {quantized["accuracy_level"]} == {default_accuracy_level(result.report["device"])}


def test_weight_only_quantizes_gemm_layers_too_and_refuses_odd_blocks(tmp_path):
    result = run_snippet(MLP + '[[passes]]\npass = "weight_only_quantize"\nblock_size = 16\n', tmp_path)
    stage = result.report["stages"][2]
    assert stage["metrics"]["gemm_rewritten_as_matmul"] == 3 and stage["metrics"]["fidelity"] > 0.99
    with pytest.raises(ConfigError, match="power of 2"):
        run_snippet(MLP + '[[passes]]\npass = "weight_only_quantize"\nblock_size = 48\n', tmp_path)


@pytest.mark.parametrize("setting, level", [("", 4), ("accuracy_level = 0\n", 0), ("accuracy_level = 1\n", 1)])
def test_weight_only_on_the_cpu_takes_int8_activations_unless_told_otherwise(tmp_path, setting, level):
    # the float paths of MatMulNBits dequantize whole weights per call on a CPU (8-bit: about 18x slower), so a
    # model quantized for one gets the int8 kernels unless the user asks for another level
    snippet = MLP + f'[[passes]]\npass = "weight_only_quantize"\nblock_size = 16\n{setting}'
    result = run_snippet(snippet + '[benchmark]\ndevice = "cpu"\n', tmp_path)
    stage = result.report["stages"][2]
    levels = {next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
              for n in onnx.load(result.run_dir / stage["artifact"]).graph.node if n.op_type == "MatMulNBits"}
    assert levels == {level} and stage["metrics"]["accuracy_level"] == level


def test_weight_only_leaves_the_accuracy_level_unset_for_a_gpu():
    from optitool_quantize.weight_only import default_accuracy_level

    assert [default_accuracy_level(d) for d in ("cpu", "cuda", "cuda:1")] == [4, 0, 0]


def test_weight_only_contract(tmp_path):
    from optitool_quantize.weight_only import WeightOnlyQuantize

    check_pass_contract(WeightOnlyQuantize, settings={"block_size": 16}, tmp_path=tmp_path)


def _snap_to_block_grids(folder, block: int) -> None:
    """Make a tiny Llama look dequantized from a GGUF file: every projection on a 4-bit grid (Q4_1: a minimum
    and a step per block of input channels), the tied embedding on an 8-bit symmetric one (Q8_0)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for module in model.modules():
            weight = module.weight if isinstance(module, torch.nn.Linear) else None
            if weight is None or weight is model.get_input_embeddings().weight:
                continue
            blocks = weight.view(weight.shape[0], -1, block)
            low = blocks.amin(-1, keepdim=True)
            step = (blocks.amax(-1, keepdim=True) - low) / 15
            blocks.copy_(low + step * torch.round((blocks - low) / step))
        table = model.get_input_embeddings().weight.view(-1, block)
        step = table.abs().amax(-1, keepdim=True) / 127
        table.copy_(step * torch.round(table / step))
    model.save_pretrained(folder)


def _stored_weights(path) -> dict[str, np.ndarray]:
    """Each quantized MatMul's weight [K, N] as the graph computes with it, by the original MatMul's name: the
    MatMulNBits blocks dequantized, plus the per-block offset term of a source grid (its sums of x times
    offsets [blocks, N] are a weight constant within each block)."""
    from onnx import numpy_helper
    from optitool_quantize.siblings import unfused_weights

    graph = onnx.load(path).graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    weights = {name.rsplit("_Q", 1)[0]: weight for name, weight in unfused_weights(graph, arrays).items()}
    for node in graph.node:
        if node.op_type == "MatMul" and node.name.endswith("_off"):
            offsets = arrays[node.input[1]]
            name = node.name[: -len("_off")]
            block = weights[name].shape[0] // offsets.shape[0]
            weights[name] = weights[name] + np.repeat(offsets, block, axis=0)
    return weights


@pytest.mark.parametrize("grid", ["source", "minmax"])
def test_int4_on_the_grid_the_weights_came_from_is_lossless(tmp_path, optitool_text_folder, grid):
    """grid = "source" recovers each block's step and minimum: weights dequantized from a Q4_1/Q8_0 file come
    back exactly (the Q8_0 head in 8 bits); min/max with an integer zero point rounds them a second time. The
    tied LM head is quantized too. Asserted on the stored weights, which every machine computes alike, not on
    perplexity, which onnxruntime's kernels for each CPU decide (a second rounding of a tiny random model's
    weights can move it either way)."""
    from onnx import numpy_helper

    from optitool.testing import tiny_causal_lm_dir

    folder = tiny_causal_lm_dir(tmp_path / "lm", family="llama")
    _snap_to_block_grids(folder, 16)
    snippet = (f'[model]\nsource = "hf"\npath = "{folder}"\nmax_length = 16\n[benchmark]\nsequence_lengths = [16]\n'
               f'[data]\nsource = "folder"\npath = "{optitool_text_folder}"\nlabel_field = ""\nsplits = {{ eval = 0.5 }}\n'
               f'[[passes]]\npass = "onnx_export"\n[[passes]]\npass = "weight_only_quantize"\nbits = 4\n'
               f'block_size = 16\ngrid = "{grid}"\n')
    result = run_snippet(snippet, tmp_path)
    _, exported, quantized = (s["metrics"] for s in result.report["stages"])
    graph = onnx.load(result.run_dir / result.report["stages"][2]["artifact"])
    ops = [n.op_type for n in graph.graph.node]
    # 7 projections a block, the tied head; q/k/v and gate/up each read one input and are merged into one node
    assert quantized["fused_matmul_groups"] == 2 * 2 and ops.count("Split") == 2 * 2
    assert ops.count("MatMulNBits") == 2 * 4 + 1 and "Transpose" not in [
        n.op_type for n in graph.graph.node if n.input and n.input[0] in {i.name for i in graph.graph.initializer}]
    source = onnx.load(result.run_dir / result.report["stages"][1]["artifact"]).graph
    arrays = {i.name: numpy_helper.to_array(i) for i in source.initializer}
    originals = {n.name: arrays[n.input[1]] for n in source.node if n.op_type == "MatMul" and n.input[1] in arrays}
    originals.update({f"{n.name}_matmul": arrays[n.input[1]] for n in source.node if n.op_type == "Gemm"})
    stored = _stored_weights(result.run_dir / result.report["stages"][2]["artifact"])
    assert len(stored) == 2 * 7 + 1 and set(stored) <= set(originals)
    errors = {name: float(np.abs(w - originals[name]).max() / np.abs(originals[name]).max()) for name, w in stored.items()}
    if grid == "source":
        assert quantized["blocks_on_source_grid"] == 1.0 and len(quantized["weights_in_8_bits"]) == 1
        assert max(errors.values()) < 1e-5, errors  # the source grid: no error beyond float rounding
    else:
        assert min(errors.values()) > 1e-3, errors  # a second rounding: every weight moved
    assert quantized["perplexity"] > 1 and exported["perplexity"] > 1


def test_a_tied_head_exported_as_a_transpose_of_the_embedding_is_materialized_and_quantized():
    """torch.onnx writes SmolLM2's tied head as MatMul(h, Transpose(embedding)): the quantizer takes only
    initializer weights, so the largest matrix stayed float and was transposed on every call."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from optitool_quantize.weight_only import transposed_weights_as_initializers

    table = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["h"]), helper.make_node("Transpose", ["table"], ["head"], perm=[1, 0]),
         helper.make_node("MatMul", ["h", "head"], ["logits"])], "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 64])], [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph)
    assert transposed_weights_as_initializers(model) == 1
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert [n.op_type for n in model.graph.node] == ["Gather", "MatMul"] and np.array_equal(weights["head"], table.T)


@pytest.mark.parametrize("head_block", [None, 32])
@pytest.mark.parametrize("head_bits", [8, 4])
@pytest.mark.parametrize("layout", ["two tables", "gather from the head's transpose"])
@pytest.mark.parametrize("on_grid", [True, False])
def test_a_tied_embedding_shares_the_heads_codes_and_the_graph_computes_with_exactly_those_values(on_grid, layout,
                                                                                                  head_bits, head_block):
    """Gather(table) ... MatMul(h, table^T), the table stored twice (torch.onnx) or once as the head's weight
    with the Gather reading its Transpose (onnxruntime-genai's builder): the head becomes MatMulNBits (8 bits:
    on the table's own Q8_0-like grid, or rounded to nearest when it is on none), the Gather becomes
    GatherBlockQuantized reading the same packed codes, and the graph's output equals a numpy computation with
    those dequantized values. With head_block_size both read the head's own (wider) blocks."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from optitool_quantize.nbits import dequantize
    from optitool_quantize.source_grid import quantize_embeddings, quantize_matmuls_on_source_grid

    rng = np.random.default_rng(0)
    vocab, hidden = 64, 32
    table = rng.standard_normal((vocab, hidden)).astype(np.float32)
    if on_grid:  # symmetric 8-bit blocks of 16, as GGUF's Q8_0
        blocks = table.reshape(vocab, -1, 16)
        step = np.abs(blocks).max(-1, keepdims=True) / 127
        table = (step * np.rint(blocks / step)).reshape(vocab, hidden).astype(np.float32)
    if layout == "two tables":
        nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed")]
        weights = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(table.T.copy(), "head")]
    else:
        nodes = [helper.make_node("Transpose", ["head"], ["table_t"], name="embed_t", perm=[1, 0]),
                 helper.make_node("Gather", ["table_t", "ids"], ["h"], name="embed")]
        weights = [numpy_helper.from_array(table.T.copy(), "head")]
    graph = helper.make_graph(
        [*nodes, helper.make_node("MatMul", ["h", "head"], ["logits"], name="lm_head")], "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5, vocab])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    found = quantize_matmuls_on_source_grid(model, 4, 16, 0, [], head_bits=head_bits, head_block_size=head_block)
    embedded = quantize_embeddings(model, 4, 16, head_bits=head_bits, replaced=found.replaced)
    assert found.nodes == 1 and embedded.tables == 1 and embedded.shared_with_head == 1
    sizes = {n.op_type: helper.get_attribute_value(next(a for a in n.attribute if a.name == "block_size"))
             for n in model.graph.node if n.op_type != "Reshape"}
    assert sizes == {"MatMulNBits": head_block or 16, "GatherBlockQuantized": head_block or 16}
    assert embedded.bits == [head_bits]  # a head on an 8-bit grid still goes to 4 bits when asked
    ops = {n.op_type: n for n in model.graph.node}
    assert set(ops) == {"GatherBlockQuantized", "Reshape", "MatMulNBits"}  # the Transpose went with the Gather
    assert ops["GatherBlockQuantized"].input[0] == ops["MatMulNBits"].input[1]  # stored once
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    head = dequantize(ops["MatMulNBits"], arrays)  # [hidden, vocab]
    if on_grid and head_bits == 8 and head_block is None:
        np.testing.assert_allclose(head, table.T, rtol=0, atol=1e-6)
    ids = np.array([[1, 5, 9, 63, 0]])
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    np.testing.assert_allclose(out, head.T[ids] @ head, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("leading", [(3,), (2, 3), (1, 2, 3)])
def test_a_float_minimum_source_grid_computes_the_same_product_for_inputs_of_any_rank(leading):
    """The offset term sums the input per block: it must not assume [batch, sequence, K] inputs."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from optitool_quantize.source_grid import quantize_matmuls_on_source_grid

    rng = np.random.default_rng(0)
    k, n, block = 64, 8, 16
    low = rng.uniform(-1, 0, (k // block, 1, n)).astype(np.float32)  # minimums no integer zero point reaches
    step = rng.uniform(0.01, 0.1, (k // block, 1, n)).astype(np.float32)
    codes = rng.integers(0, 16, (k // block, block, n)).astype(np.float32)
    weight = (low + step * codes).reshape(k, n).astype(np.float32)
    dims = [f"d{i}" for i in range(len(leading))]
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"), helper.make_node("Neg", ["h"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*dims, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*dims, n])], [numpy_helper.from_array(weight, "w")]),
        opset_imports=[helper.make_opsetid("", 18)])
    found = quantize_matmuls_on_source_grid(model, 4, block, 0, exclude=[], head_bits=8)
    assert found.with_offsets == ["w"]
    x = rng.standard_normal((*leading, k)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x})[0]
    assert y.shape == (*leading, n)
    np.testing.assert_allclose(y, -(x @ weight), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_every_block_of_an_integer_grid_stored_in_float32_is_recovered_exactly(bits):
    """The grids gptq/imatrix leave, as the exported float32 graph holds them: a step recovered from one gap
    carries float error that 8-bit codes (up to 255 steps) multiply; the recovery must not depend on it,
    or which blocks count as on a grid changes with the CPU that ran GPTQ."""
    from optitool_quantize.source_grid import integer_grid

    rng = np.random.default_rng(0)
    k, n, block, top = 256, 64, 16, 2**bits - 1
    scales = rng.uniform(1e-4, 1e-1, (n, k // block, 1))
    zeros = rng.integers(0, top + 1, (n, k // block, 1))
    codes = rng.integers(0, top + 1, (n, k // block, block))
    codes[..., 0], codes[..., 1] = 0, top  # every block spans the code range, as min/max grids do
    weight = (scales * (codes - zeros)).reshape(n, k).T.astype(np.float32)
    found = integer_grid(weight, bits, block)
    assert found.exact_blocks == found.blocks
    rebuilt = (found.scales.reshape(n, -1, 1).astype(np.float64) *
               (found.codes.astype(np.float64) - found.zeros[..., None])).reshape(n, k).T
    np.testing.assert_allclose(rebuilt, weight, rtol=1e-5, atol=1e-7)


def test_head_settings_without_the_source_grid_are_refused_by_validate(tmp_path):
    """head_bits and head_block_size are the source grid's; under onnxruntime's min/max quantizer they would be
    silently ignored, so validate names them (exit 2) instead."""
    from click.testing import CliRunner

    from optitool.cli import cli

    for setting in ("head_bits = 4", "head_block_size = 64"):
        (tmp_path / "p.toml").write_text('[model]\nsource = "python"\nfactory = "optitool.testing:tiny_mlp"\n'
                                         '[model.inputs]\nx = ["batch", 16]\n[[passes]]\npass = "onnx_export"\n'
                                         f'[[passes]]\npass = "weight_only_quantize"\nblock_size = 16\n{setting}\n')
        result = CliRunner().invoke(cli, ["validate", str(tmp_path / "p.toml")])
        assert result.exit_code == 2 and setting.split(" =")[0] in result.output, result.output
        assert 'grid = "source"' in result.output


def test_a_head_block_size_the_head_cannot_take_fails_the_pass_instead_of_leaving_the_head_in_float():
    from onnx import TensorProto, helper, numpy_helper
    from optitool_quantize.source_grid import quantize_matmuls_on_source_grid

    import optitool

    head = np.random.default_rng(0).standard_normal((48, 64)).astype(np.float32)  # input width 48: blocks of 16
    graph = helper.make_graph([helper.make_node("MatMul", ["h", "head"], ["logits"], name="lm_head")], "g",
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 48])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(head, "head")])
    model = helper.make_model(graph)
    with pytest.raises(optitool.PassError, match=r"head_block_size = 32 does not divide the LM head's input width 48; "
                                                 r"choose one that does: \[16\]"):
        quantize_matmuls_on_source_grid(model, 4, 16, 0, [], head_bits=8, head_block_size=32)
