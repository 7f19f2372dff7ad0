from __future__ import annotations

import logging
import subprocess
import sys
import time

import optitool
from optitool.bench.load import LoadReading, classify
from optitool.bench.suite import BenchTarget, attach_speedups, benchmark_targets
from optitool.spec import BenchmarkSpec
from optitool.testing import contract_inputs, run_snippet, tiny_mlp


def stage(name: str, center: float) -> dict:
    samples = [center - 1 + 2 * i / 20 for i in range(21)]
    return {"name": name, "benchmarks": [{"runtime": "ort", "shape": "1x128", "samples_ms": samples}]}


def test_flags_a_stage_slower_than_its_parent_or_than_the_baseline():
    records = [stage("baseline", 20), stage("onnx", 50), stage("int8", 30), stage("fast", 10)]
    attach_speedups(records)
    flags = {r["name"]: r["flags"] for r in records}
    assert flags["baseline"] == []
    assert len(flags["onnx"]) == 1 and "slower than its parent 'baseline'" in flags["onnx"][0]
    assert len(flags["int8"]) == 1 and "slower than the baseline 'baseline'" in flags["int8"][0]
    assert flags["fast"] == []
    assert records[2]["benchmarks"][0]["speedup_vs_parent"]["verdict"] == "faster"


CALLS: list[str] = []


def recording_runtime(runtime_name: str, kind: str) -> type:
    """A runtime that records which stage it ran, to see the order calls were made in."""

    class Recording(optitool.Runtime):
        name = runtime_name
        kinds = (kind,)

        def prepare(self, artifact, device, threads):
            label = f"{getattr(artifact, 'label', '?')}@{runtime_name}"

            def call(inputs):
                CALLS.append(label)
                time.sleep(0.0005)

            return call

    return Recording


def test_every_speedup_comes_from_one_interleaved_loop_across_runtimes(tmp_path):
    """Torch and ONNX stages of one shape must be timed in one loop, one call at a time, so a speedup
    across runtimes compares calls made moments apart (not one runtime's minute against another's)."""
    from optitool.registry import Registry

    registry = Registry()
    bound = registry.bound("test")
    bound.add_runtime(recording_runtime("fake_torch", "torch"))
    bound.add_runtime(recording_runtime("fake_onnx", "onnx"))
    torch_model = optitool.TorchModel(tiny_mlp())
    torch_model.label = "baseline"
    onnx_a, onnx_b = optitool.OnnxModel(tmp_path / "a.onnx"), optitool.OnnxModel(tmp_path / "b.onnx")
    onnx_a.label, onnx_b.label = "export", "int8"
    targets = [BenchTarget(n, a, {"name": n, "benchmarks": [], "flags": []}, None)
               for n, a in (("baseline", torch_model), ("export", onnx_a), ("int8", onnx_b))]
    spec = BenchmarkSpec(runtimes=["fake_torch", "fake_onnx"], batch_sizes=[1, 2], warmup=0, min_iterations=6,
                         max_iterations=6, min_seconds=0, memory=False)
    CALLS.clear()
    benchmark_targets(targets, spec, registry, "cpu", contract_inputs(), logging.getLogger("test"))
    per_shape = [CALLS[:18], CALLS[18:]]
    for calls in per_shape:
        for round_start in range(0, 18, 3):  # each round calls every stage once, whatever its runtime
            assert sorted(calls[round_start:round_start + 3]) == ["baseline@fake_torch", "export@fake_onnx",
                                                                  "int8@fake_onnx"]
        firsts = {calls[i] for i in range(0, 18, 3)}
        assert len(firsts) == 3  # the order rotates: no stage always goes first
    for target in targets[1:]:
        for entry in target.record["benchmarks"]:
            base = next(b for b in targets[0].record["benchmarks"] if b["shape"] == entry["shape"])
            assert entry["loop"] == base["loop"]
            assert entry["speedup_vs_baseline"]["interleaved"] is True
            assert entry["speedup_vs_baseline"]["runtime"] == "fake_torch"
            assert "baseline @ fake_torch" in entry["interleaved_with"]


def test_load_classification():
    quiet = classify(LoadReading(wall_s=2, cpu_count=2, own_cores=1.9, other_cores=0.1, steal_share=0.0,
                                 load_average=2.0))
    busy = classify(LoadReading(wall_s=2, cpu_count=2, own_cores=1.0, other_cores=1.0, steal_share=0.0,
                                load_average=3.0))
    stolen = classify(LoadReading(wall_s=2, cpu_count=16, own_cores=8, other_cores=0.5, steal_share=0.2,
                                  load_average=8.0))
    assert quiet.quiet and quiet.reasons == []
    assert not busy.quiet and "1.0 of 2 cores" in busy.reasons[0]
    assert not stolen.quiet and "steal" in stolen.reasons[0]


def test_a_benchmark_on_a_busy_machine_is_flagged_in_the_report_the_summary_and_the_terminal(tmp_path):
    import os

    from click.testing import CliRunner

    from optitool.cli import cli

    (tmp_path / "models.py").write_text("from optitool.testing import tiny_mlp\n\ndef make():\n    return tiny_mlp()\n")
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('[model]\nsource = "python"\nfactory = "models:make"\n[model.inputs]\nx = ["batch", 16]\n'
                        '[benchmark]\nruntimes = ["torch_eager"]\nbatch_sizes = [4]\nmin_iterations = 20\n'
                        'min_seconds = 2.0\nmax_iterations = 100000\nmemory = false\nthreads = 1\n')
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)
        result = CliRunner().invoke(cli, ["run", str(pipeline), "-o", str(tmp_path / "run")])
    finally:
        for spinner in spinners:
            spinner.kill()
    assert result.exit_code == 0, result.output
    import json

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    load = report["stages"][0]["benchmarks"][0]["load"]
    assert load["quiet"] is False and load["other_cores"] > 0.5, load
    assert any(f.startswith("busy machine while timing 4") for f in report["stages"][0]["flags"])
    assert "busy machine while timing 4" in (tmp_path / "run" / "report.md").read_text()
    assert "busy machine while timing 4" in result.output


def test_the_embedded_style_table_fits_120_columns_and_progress_is_shown(tmp_path):
    from click.testing import CliRunner

    from optitool.cli import cli
    from optitool.report.table import terminal_table

    snippet = ('name = "tablewidth"\n[model]\nsource = "python"\nfactory = "optitool.testing:tiny_mlp"\n'
               '[model.inputs]\nx = ["batch", 16]\n[[passes]]\npass = "onnx_export"\nname = "onnx_export"\n'
               '[[passes]]\npass = "int8_quantize"\n[benchmark]\nruntimes = ["torch_eager", "onnxruntime"]\n'
               'batch_sizes = [1, 24]\nwarmup = 1\nmin_iterations = 3\nmax_iterations = 3\nmin_seconds = 0\n'
               'memory = false\n')
    report = run_snippet(snippet, tmp_path, benchmark=True).report
    text = terminal_table(report, width=120)
    table = text.split("\n! ")[0]
    assert max(len(line) for line in table.splitlines()) <= 120, text
    assert "int8_quantize" in table and "1.00x" not in table.splitlines()[2]  # baseline has no speedup
    (tmp_path / "p.toml").write_text(snippet)
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "p.toml"), "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    for step in ("loading the model", "evaluating the baseline", "[1/2] onnx_export", "[2/2] int8_quantize",
                 "benchmarking of 3 stages", "timed shape 1 (1/2)", "timed shape 24 (2/2)"):
        assert step in result.output, step
