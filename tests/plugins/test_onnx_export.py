from __future__ import annotations

import onnx
import pytest
from onnx import numpy_helper
from optitool_onnx.export import OnnxExport

from optitool.errors import RunError
from optitool.testing import TINY_MLP_TOML, check_pass_contract, run_snippet

MLP = TINY_MLP_TOML


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_verifies_and_has_dynamic_batch(tmp_path, exporter):
    result = run_snippet(MLP + f'[[passes]]\npass = "onnx_export"\nexporter = "{exporter}"\n', tmp_path)
    stage = result.report["stages"][1]
    assert stage["kind"] == "onnx" and stage["metrics"]["export_max_abs_diff"] < 1e-4
    graph = onnx.load(result.run_dir / stage["artifact"]).graph
    assert graph.input[0].name == "x"
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis


def test_planted_mismatch_fails_the_pass(tmp_path, monkeypatch):
    from optitool_onnx import export as export_module

    original = export_module.OnnxExport._export_torch

    def corrupt(self, module, sample, names, output_name, path, exporter):
        original(self, module, sample, names, output_name, path, exporter)
        model = onnx.load(path)
        biggest = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
        array = numpy_helper.to_array(biggest) * 1.5
        biggest.CopyFrom(numpy_helper.from_array(array, biggest.name))
        onnx.save(model, path)

    monkeypatch.setattr(export_module.OnnxExport, "_export_torch", corrupt)
    with pytest.raises(RunError, match="verification failed"):
        run_snippet(MLP + '[[passes]]\npass = "onnx_export"\nexporter = "torchscript"\n', tmp_path)
    assert not (tmp_path / "run" / "01-onnx_export").exists()


def test_text_model_export_with_transformer_fusions(tmp_path, optitool_tiny_bert):
    snippet = f'[model]\nsource = "hf"\npath = "{optitool_tiny_bert}"\nmax_length = 16\n' \
              '[[passes]]\npass = "onnx_export"\noptimize = "transformer"\n'
    result = run_snippet(snippet, tmp_path)
    metrics = result.report["stages"][1]["metrics"]
    assert metrics["fidelity"] > 0.9999 and metrics["export_cosine"] > 0.9999
    # exporter "auto" picks the graph onnxruntime can fuse: attention included, whatever transformers' version
    assert metrics["exporter"] == "torchscript" and metrics["onnx_fusions"].get("Attention") == 2


def test_contract(tmp_path):
    check_pass_contract(OnnxExport, tmp_path=tmp_path)


def test_parameters_are_counted_alike_in_every_kind(tmp_path):
    """torch parameters, ONNX weight initializers and int8 weights must be the same number for the same
    model: quantization scales, zero points and shape constants are not weights."""
    snippet = ('[model]\nsource = "python"\nfactory = "optitool.testing:tiny_mlp"\nkwargs = { hidden = 64 }\n'
               '[model.inputs]\nx = ["batch", 16]\n[[passes]]\npass = "onnx_export"\n'
               '[[passes]]\npass = "int8_quantize"\nname = "dynamic"\n'
               '[[passes]]\npass = "int8_quantize"\nname = "static"\nmode = "static"\ncalibration_data = "random"\n')
    stages = run_snippet(snippet, tmp_path).report["stages"]
    counts = {s["name"]: s["metrics"]["parameters"] for s in stages}
    assert len(set(counts.values())) == 1, counts
    assert stages[0]["metrics"]["sparsity"] == 0.0 and "weights_not_exported" not in stages[1]["metrics"]


def test_weights_an_export_drops_are_reported(tmp_path, optitool_tiny_bert):
    snippet = (f'[model]\nsource = "hf"\npath = "{optitool_tiny_bert}"\nmax_length = 16\n'
               '[[passes]]\npass = "onnx_export"\n')
    base, onnx_stage = run_snippet(snippet, tmp_path).report["stages"]
    dropped = onnx_stage["metrics"]["weights_not_exported"]
    # the pooler (its output is not the exported last_hidden_state), and the all-zero biases and all-one
    # norm weights of a freshly initialised model, which the exporter's optimizer folds away as no-ops
    assert dropped >= 32 * 32 + 32
    assert base["metrics"]["parameters"] - onnx_stage["metrics"]["parameters"] == dropped
    assert onnx_stage["metrics"]["export_cosine"] <= 1.0


def test_transformer_fusions_on_a_decoder_are_refused_cleanly(tmp_path):
    from optitool.testing import tiny_causal_lm_dir

    folder = tiny_causal_lm_dir(tmp_path / "lm", family="gpt2", train_steps=1)
    snippet = (f'[model]\nsource = "hf"\npath = "{folder}"\nmax_length = 16\n[benchmark]\nsequence_lengths = [16]\n'
               '[[passes]]\npass = "onnx_export"\noptimize = "transformer"\n')
    with pytest.raises(RunError, match="could not fuse this 'gpt2' graph .*use optimize = \"extended\""):
        run_snippet(snippet, tmp_path)
    assert not (tmp_path / "run" / "01-onnx_export").exists()
