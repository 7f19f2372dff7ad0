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
