from __future__ import annotations

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


def test_weight_only_quantizes_gemm_layers_too_and_refuses_odd_blocks(tmp_path):
    result = run_snippet(MLP + '[[passes]]\npass = "weight_only_quantize"\nblock_size = 16\n', tmp_path)
    stage = result.report["stages"][2]
    assert stage["metrics"]["gemm_rewritten_as_matmul"] == 3 and stage["metrics"]["fidelity"] > 0.99
    with pytest.raises(ConfigError, match="power of 2"):
        run_snippet(MLP + '[[passes]]\npass = "weight_only_quantize"\nblock_size = 48\n', tmp_path)


def test_weight_only_contract(tmp_path):
    from optitool_quantize.weight_only import WeightOnlyQuantize

    check_pass_contract(WeightOnlyQuantize, settings={"block_size": 16}, tmp_path=tmp_path)
