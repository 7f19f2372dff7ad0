from __future__ import annotations

import json
import types

import pytest

import optitool
from optitool.errors import ConfigError, RunError
from optitool.testing import run_snippet

MLP = """
seed = 3
[model]
source = "python"
factory = "optitool.testing:tiny_mlp"
[model.inputs]
x = ["batch", 16]
"""


def test_stages_artifacts_and_report(tmp_path):
    result = run_snippet(MLP + '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\n', tmp_path)
    run = result.run_dir
    report = json.loads((run / "report.json").read_text())
    assert report["schema_version"] == 1 and report["status"] == "finished"
    assert [s["name"] for s in report["stages"]] == ["baseline", "magnitude_prune"]
    stage = report["stages"][1]
    assert stage["artifact"] == "01-magnitude_prune/model.safetensors"
    assert (run / stage["artifact"]).is_file() and (run / "01-magnitude_prune" / "stage.json").is_file()
    assert {"parameters", "nonzero_parameters", "sparsity", "size_bytes", "fidelity"} <= set(stage["metrics"])
    assert stage["metrics"]["covered_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert report["stages"][0]["metrics"]["fidelity"] == 1.0
    assert {"torch", "python", "cpu"} <= set(report["environment"])
    assert (run / "report.md").is_file()
    assert result.hook_calls == ["optitool_pipeline_start", "optitool_pass_finished", "optitool_report_written"]
    assert not list(run.glob(".*partial"))


def test_earlier_stages_are_not_changed_by_later_passes(tmp_path):
    result = run_snippet(MLP + '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.9\n', tmp_path)
    baseline = result.stages[0].artifact.module
    assert float((baseline[0].weight == 0).float().mean()) < 0.05


def test_seeded_runs_are_reproducible(tmp_path):
    snippet = MLP + '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\n'
    a = run_snippet(snippet, tmp_path / "a").report["stages"][1]["metrics"]
    b = run_snippet(snippet, tmp_path / "b").report["stages"][1]["metrics"]
    assert a["fidelity"] == b["fidelity"] and a["nonzero_parameters"] == b["nonzero_parameters"]


class Explodes(optitool.Pass):
    name = "acme.explode"
    takes = "torch"
    gives = "torch"

    def run(self, model, ctx):
        raise ValueError("kaboom")


class WrongKind(optitool.Pass):
    name = "acme.liar"
    takes = "torch"
    gives = "onnx"

    def run(self, model, ctx):
        return model


def _plugin(cls):
    module = types.ModuleType(f"acme_{cls.__name__.lower()}")
    module.optitool_register_passes = optitool.hookimpl(lambda registry: registry.add(cls))
    return module


def test_a_failing_plugin_keeps_earlier_stages(tmp_path):
    snippet = MLP + '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\n[[passes]]\npass = "acme.explode"\n'
    with pytest.raises(RunError) as err:
        run_snippet(snippet, tmp_path, plugins=(_plugin(Explodes),))
    message = str(err.value)
    assert "acme_explodes" in message and "acme.explode" in message and "kaboom" in message
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "failed" and [s["name"] for s in report["stages"]] == ["baseline", "magnitude_prune"]
    assert (tmp_path / "run" / "01-magnitude_prune" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "02-acme.explode").exists()
    assert not list((tmp_path / "run").glob(".*partial"))


def test_a_pass_returning_the_wrong_kind_is_caught(tmp_path):
    with pytest.raises(RunError, match="declares that it gives a onnx model"):
        run_snippet(MLP + '[[passes]]\npass = "acme.liar"\n', tmp_path, plugins=(_plugin(WrongKind),))


def test_interrupt_leaves_no_partial_stage(tmp_path):
    class Interrupt(Explodes):
        name = "acme.interrupt"

        def run(self, model, ctx):
            (ctx.stage_dir / "half.bin").write_bytes(b"x")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_snippet(MLP + '[[passes]]\npass = "acme.interrupt"\n', tmp_path, plugins=(_plugin(Interrupt),))
    run = tmp_path / "run"
    assert json.loads((run / "report.json").read_text())["status"] == "interrupted"
    assert not list(run.glob(".*partial")) and not (run / "01-acme.interrupt").exists()


def test_existing_run_folder_is_refused(tmp_path):
    from optitool.config import parse_pipeline_text
    from optitool.plugins import get_plugin_manager
    from optitool.runner import prepare_run_dir

    spec = parse_pipeline_text(MLP, get_plugin_manager(autoload=False).registry, base_dir=tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="--overwrite"):
        prepare_run_dir(spec, str(tmp_path / "out"), overwrite=False)
    assert prepare_run_dir(spec, str(tmp_path / "out"), overwrite=True) == (tmp_path / "out").absolute()


def test_benchmark_fills_stats_and_speedups(tmp_path):
    snippet = MLP + ('[[passes]]\npass = "onnx_export"\n[benchmark]\nbatch_sizes = [4]\nmin_iterations = 5\n'
                     'max_iterations = 8\nmin_seconds = 0\nwarmup = 1\nmemory = false\n')
    report = run_snippet(snippet, tmp_path, benchmark=True).report
    onnx = report["stages"][1]["benchmarks"][0]
    assert onnx["runtime"] == "onnxruntime" and onnx["iterations"] >= 5
    assert {"median_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "throughput_per_s"} <= set(onnx)
    assert onnx["speedup_vs_baseline"]["stage"] == "baseline"
    assert (tmp_path / "run" / "plots" / "size_latency.png").is_file()


def test_an_onnx_model_file_runs_through_onnx_passes(tmp_path):
    import torch

    from optitool.testing import tiny_mlp

    torch.onnx.export(tiny_mlp(hidden=128).eval(), (torch.randn(2, 16),), str(tmp_path / "m.onnx"), input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    snippet = ('[model]\nsource = "onnx"\npath = "m.onnx"\n[model.inputs]\nx = ["batch", 16]\n'
               '[[passes]]\npass = "int8_quantize"\n')
    report = run_snippet(snippet, tmp_path).report
    assert report["stages"][0]["origin"]["path"] == str((tmp_path / "m.onnx").resolve())
    assert report["stages"][1]["kind"] == "onnx" and report["stages"][1]["metrics"]["fidelity"] > 0.98
