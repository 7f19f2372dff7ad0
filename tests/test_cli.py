from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from optitool.cli import cli
from tests.conftest import MLP_PIPELINE


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_help_and_passes_do_not_import_torch():
    code = ("import sys; from click.testing import CliRunner; from optitool.cli import cli; "
            "r = CliRunner().invoke(cli, ['passes']); assert r.exit_code == 0, r.output; "
            "bad = [m for m in ('torch', 'onnxruntime', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_passes_json_lists_builtins_with_kinds_and_schema():
    result = invoke("passes", "--json")
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["onnx_export"]["takes"] == ["torch"] and rows["onnx_export"]["gives"] == "onnx"
    assert rows["magnitude_prune"]["plugin"] == "prune"
    assert "sparsity" in rows["magnitude_prune"]["schema"]["properties"]
    assert set(rows["int8_quantize"]["takes"]) == {"torch", "onnx"}


def test_passes_schema_of_one_pass():
    schema = json.loads(invoke("passes", "--schema", "magnitude_prune").stdout)
    assert schema["additionalProperties"] is False


def test_plugins_lists_origin_and_registrations():
    out = invoke("plugins").output
    assert "built-in" in out and "passes: depth_prune, magnitude_prune, structured_prune" in out and "loaders:" in out


@pytest.mark.parametrize("body, extra, fragment", [
    ("[model\n", (), "not valid TOML"),
    (MLP_PIPELINE + '[[passes]]\npass = "no_such_pass"\n', (), "unknown pass 'no_such_pass'"),
    (MLP_PIPELINE + '[[passes]]\npass = "magnitude_prune"\nsparsity = 2\n', (), "sparsity"),
    (MLP_PIPELINE + '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\nsparsty = 1\n', (), "unknown key 'sparsty'"),
    ('[model]\nsource = "hf"\npath = "does/not/exist"\n', (), "does not exist"),
    ('[model]\nsource = "python"\nfactory = "models:missing"\n', (), "no callable named 'missing'"),
    (MLP_PIPELINE + '[[passes]]\npass = "onnx_export"\n[[passes]]\npass = "distill"\n', (),
     "takes torch models, but passes[0] (pass 'onnx_export') gives an onnx model"),
    (MLP_PIPELINE + '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\n', ("--set", "passes.0.nope=1"),
     "--set passes.0.nope"),
])
def test_bad_input_exits_2_with_one_message_and_writes_nothing(write, mlp_module, tmp_path, body, extra, fragment):
    pipeline = write("bad.toml", body)
    result = CliRunner().invoke(cli, ["run", str(pipeline), "--output", str(tmp_path / "out"), *extra])
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_missing_pipeline_file(tmp_path):
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_validate_prints_the_chain(mlp_pipeline):
    result = invoke("validate", str(mlp_pipeline))
    assert result.exit_code == 0 and "magnitude_prune (torch->torch)" in result.output


def test_run_writes_report_and_table_and_refuses_to_overwrite(mlp_pipeline, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(mlp_pipeline), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "magnitude_prune" in result.output and (out / "report.json").is_file()
    again = CliRunner().invoke(cli, ["run", str(mlp_pipeline), "-o", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert (out / "report.json").is_file()
    assert CliRunner().invoke(cli, ["run", str(mlp_pipeline), "-o", str(out), "--overwrite"]).exit_code == 0


def test_budget_failure_exits_1_naming_budget_limit_and_value(write, mlp_module, tmp_path):
    pipeline = write("p.toml", MLP_PIPELINE + '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.9\n'
                     "[budget]\nmin_fidelity = 0.999\n")
    result = CliRunner().invoke(cli, ["run", str(pipeline), "-o", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "min_fidelity FAILED: measured" in result.output and "limit 0.999" in result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["budget"]["passed"] is False


def test_device_cuda_without_gpu_is_a_usage_error(mlp_pipeline, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = CliRunner().invoke(cli, ["run", str(mlp_pipeline), "-o", str(tmp_path / "r"), "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA GPU" in result.output


def test_relative_output_folder_with_onnx_passes(write, mlp_module, tmp_path, monkeypatch):
    pipeline = write("p.toml", MLP_PIPELINE + '[[passes]]\npass = "onnx_export"\n[[passes]]\npass = "int8_quantize"\n')
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["run", str(pipeline), "-o", "relative-run", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "relative-run" / "report.json").read_text())
    assert [s["kind"] for s in report["stages"]] == ["torch", "onnx", "onnx"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".data", ".onnx")) == []


@pytest.mark.parametrize("setting, fragment", [
    ("benchmark.batch_sizes=[0]", "benchmark.batch_sizes[0]"),
    ("benchmark.sequence_lengths=[-16]", "benchmark.sequence_lengths[0]"),
    ("benchmark.batch_sizes=[]", "benchmark.batch_sizes"),
    ('benchmark.stages=["prune"]', "[benchmark].stages names 'prune', which is not a stage"),
    ('budget.stage="prune"', "[budget].stage names 'prune'"),
    ('output.dir="runs/{nme}"', "unknown placeholder {nme}"),
    ('model.inputs.x=["batch", 0]', "at least 1"),
    ('budget.max_latency_ms={ "9x9" = 10 }', "shape '9x9', which [benchmark] does not measure"),
])
def test_configuration_errors_are_found_by_validate(mlp_pipeline, tmp_path, setting, fragment):
    for command in (["validate", str(mlp_pipeline)], ["run", str(mlp_pipeline), "-o", str(tmp_path / "out")]):
        result = CliRunner().invoke(cli, [*command, "--set", setting, "--set", "benchmark.enabled=true"])
        assert result.exit_code == 2, result.output
        assert fragment in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file_or_lies_under_one_is_refused_by_validate(mlp_pipeline, tmp_path):
    afile = tmp_path / "report.txt"
    afile.write_text("keep me")
    for output in (afile, afile / "run"):
        for command in ("validate", "run"):
            result = CliRunner().invoke(cli, [command, str(mlp_pipeline), "--output", str(output)])
            assert result.exit_code == 2 and "file" in result.output, result.output
    assert afile.read_text() == "keep me"


def test_a_folder_given_as_the_pipeline_is_named_as_a_folder(tmp_path):
    result = CliRunner().invoke(cli, ["validate", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in result.output


def test_a_model_that_cannot_take_its_declared_inputs_names_the_key(write, mlp_module, tmp_path):
    pipeline = write("p.toml", MLP_PIPELINE.replace('x = ["batch", 16]', 'x = ["batch", 7]'))
    result = CliRunner().invoke(cli, ["run", str(pipeline), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "[model.inputs]" in result.output and "x: [16, 7]" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_failing_data_function_names_the_key(write, mlp_module, tmp_path):
    (tmp_path / "failingdata.py").write_text("def rows():\n    raise OSError('disk gone')\n")
    pipeline = write("p.toml", MLP_PIPELINE + '[data]\nsource = "python"\nfunction = "failingdata:rows"\n')
    result = CliRunner().invoke(cli, ["run", str(pipeline), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "[data].function = 'failingdata:rows' raised OSError: disk gone" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("files, data, fragment", [
    ({"d.jsonl": '{"text": "a b", "label": "x"}\n{"text": "c d"}\n'},
     '[data]\nsource = "jsonl"\npath = "d.jsonl"\n', "1 of 2 examples have no 'label' (the first: example 2)"),
    ({"d.csv": b"\xff\xfe\x00garbage"}, '[data]\nsource = "csv"\npath = "d.csv"\n',
     "d.csv could not be read as csv: UnicodeDecodeError"),
    ({"d.jsonl": '{"text": "a b"}\n{"text": "c d"}\n'},
     '[data]\nsource = "jsonl"\npath = "d.jsonl"\nlabel_field = ""\n', "[data] gives text, but the model has no tokenizer"),
])
def test_data_the_model_or_the_reader_cannot_use_is_a_clear_error(write, mlp_module, tmp_path, files, data, fragment):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    pipeline = write("p.toml", MLP_PIPELINE + data)
    result = CliRunner().invoke(cli, ["run", str(pipeline), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "unexpected" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_hugging_face_folder_with_a_broken_config_is_named(tmp_path, write):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{not json")
    pipeline = write("p.toml", '[model]\nsource = "hf"\npath = "model"\n')
    result = CliRunner().invoke(cli, ["run", str(pipeline), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Hugging Face model folder" in result.output and "config" in result.output


@pytest.mark.parametrize("setting, fragment", [
    ("budget.min_speedup=2", "[budget].min_speedup needs the benchmark, and [benchmark] enabled = false"),
    ("budget.max_latency_ms=10", "[budget].max_latency_ms needs the benchmark"),
])
def test_a_budget_the_benchmark_cannot_measure_is_found_by_validate(mlp_pipeline, setting, fragment):
    result = CliRunner().invoke(cli, ["validate", str(mlp_pipeline), "--set", setting])
    assert result.exit_code == 2 and fragment in result.output


def test_a_run_folder_template_may_start_at_home(mlp_pipeline, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(cli, ["run", str(mlp_pipeline), "--set", 'output.dir="~/runs/{name}"'])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "home" / "runs" / "mlp" / "report.json").is_file()
