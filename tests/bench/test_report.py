from __future__ import annotations

from optitool.report.markdown import render
from optitool.report.plots import pareto, write_plots
from tests.bench.test_budget_compare import report


def test_markdown_has_the_stage_table_and_environment():
    r = {**report(100), "name": "demo", "status": "finished", "device": "cpu",
         "environment": {"cpu": "Test CPU", "torch": "2.x"}}
    for stage in r["stages"]:
        stage.update(kind="onnx", benchmarks=[{**b, "std_ms": 1.0, "p90_ms": 2.0, "batch_size": 8,
                                                "sequence_length": 128} for b in stage["benchmarks"]])
    text = render(r)
    assert "| stage | kind | runtime | size MB | accuracy | 8x128 p50 ms | speedup | flags |" in text
    assert "| int8 |" in text and "Test CPU" in text


def test_pareto_front():
    assert pareto([(10, 0.9), (5, 0.8), (20, 0.85)]) == [0, 1]


def test_plots_are_written(tmp_path):
    r = {**report(100), "name": "demo"}
    for stage in r["stages"]:
        stage["benchmarks"] = [{**b, "std_ms": 1.0, "batch_size": 8, "sequence_length": 128}
                               for b in stage["benchmarks"]]
    paths = write_plots(r, tmp_path)
    assert {p.name for p in paths} == {"latency_vs_quality.png", "size_latency.png"}
    assert all(p.stat().st_size > 1000 for p in paths)
