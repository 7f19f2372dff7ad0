from __future__ import annotations

from optitool.bench.suite import attach_speedups


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
