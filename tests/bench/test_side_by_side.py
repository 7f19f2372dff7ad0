from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from optitool.bench.stats import paired_ratio_interval, speedup_interval
from optitool.cli import cli
from optitool.compare import compare_reports
from optitool.testing import run_snippet


def test_paired_ratios_cancel_what_the_machine_did_during_each_round():
    # Every round is slowed by the machine alike (from 1x to 3x), the new model is always exactly 8 % slower.
    rng = np.random.default_rng(0)
    machine = rng.uniform(1.0, 3.0, 60)
    base, new = list(10.0 * machine), list(10.8 * machine)
    paired = paired_ratio_interval(new, base)
    assert paired.ratio == pytest.approx(1.08) and paired.low == pytest.approx(1.08)
    assert paired.high == pytest.approx(1.08)
    assert speedup_interval(new, base).low < 1.0  # the ratio of medians cannot tell this from noise
    with pytest.raises(ValueError):
        paired_ratio_interval([1.0, 2.0], [1.0])


def _entry(samples: list[float], loop: str | None) -> dict:
    return {"runtime": "onnxruntime", "shape": "1x16", "median_ms": float(np.median(samples)),
            "samples_ms": samples, "loop": loop}


def _report(entry: dict) -> dict:
    return {"schema_version": 1, "stages": [{"name": "int8", "metrics": {}, "benchmarks": [entry]}]}


def test_one_loop_is_judged_round_by_round_without_the_drift_allowance():
    rng = np.random.default_rng(1)
    machine = rng.uniform(1.0, 1.3, 40)  # a relative spread far above 10 %/4.5
    base, new = list(10.0 * machine), list(11.0 * machine)
    together = compare_reports(_report(_entry(base, "1x16#a")), _report(_entry(new, "1x16#a")))
    row = together["rows"][0]
    assert row["side_by_side"] and row["verdict"] == "regression" and row["noise_floor"] == pytest.approx(0.05)
    assert row["change"] == pytest.approx(0.10)
    # The same samples from two separate runs: the drift between runs could be that large, so not flagged.
    apart = compare_reports(_report(_entry(base, "1x16#a")), _report(_entry(new, "1x16#b")))
    assert not apart["rows"][0]["side_by_side"] and apart["rows"][0]["verdict"] == "unchanged"


def _plant(stage: Path, links: int) -> None:
    """Outputs unchanged, work multiplied: MatMuls by 32x1024 and 1024x32 matrices, times zero, added back."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(stage / "model.onnx"))
    graph, output = model.graph, model.graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{output}_kept" if o == output else o for o in node.output]
    rng = np.random.default_rng(0)
    graph.initializer.extend([numpy_helper.from_array(rng.standard_normal((32, 1024)).astype(np.float32) / 32, "up"),
                              numpy_helper.from_array(rng.standard_normal((1024, 32)).astype(np.float32) / 32, "down"),
                              numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    current = f"{output}_kept"
    for i in range(links):
        graph.node.extend([helper.make_node("MatMul", [current, "up"], [f"wide{i}"]),
                           helper.make_node("MatMul", [f"wide{i}", "down"], [f"narrow{i}"])])
        current = f"narrow{i}"
    graph.node.extend([helper.make_node("Mul", [current, "zero"], ["nothing"]),
                       helper.make_node("Add", [f"{output}_kept", "nothing"], [output])])
    onnx.save(model, str(stage / "model.onnx"))


@pytest.fixture
def tiny_run(tmp_path, optitool_tiny_bert) -> Path:
    snippet = (f'[model]\nsource = "hf"\npath = "{optitool_tiny_bert}"\nmax_length = 16\n'
               '[[passes]]\npass = "onnx_export"\n'
               '[benchmark]\nbatch_sizes = [2]\nsequence_lengths = [16]\nmin_iterations = 5\nmin_seconds = 0\n'
               'memory = false\n')
    return run_snippet(snippet, tmp_path, benchmark=True).run_dir


def _remeasure(base: Path, new: Path, *extra: str) -> object:
    return CliRunner().invoke(cli, ["compare", "--remeasure", str(base), str(new), "--min-seconds", "0",
                                    "--min-iterations", "20", "--json", *extra])


def test_remeasure_times_both_runs_in_one_loop_and_flags_a_planted_slowdown(tmp_path, tiny_run):
    same, slow = tmp_path / "same", tmp_path / "slow"
    shutil.copytree(tiny_run, same)
    shutil.copytree(tiny_run, slow)
    _plant(slow / "01-onnx_export", links=40)  # tens of times the model's own work: no machine hides that
    unchanged = _remeasure(tiny_run, same, "--max-regression", "50%")
    assert unchanged.exit_code == 0, unchanged.output
    rows = json.loads(unchanged.stdout)["rows"]
    latency = [r for r in rows if r["what"].startswith("latency")]
    assert [r["stage"] for r in latency] == ["onnx_export"] and latency[0]["side_by_side"]
    assert latency[0]["what"] == "latency onnxruntime 2x16"
    planted = _remeasure(tiny_run, slow, "--max-regression", "50%")
    assert planted.exit_code == 1, planted.output
    flagged = [r for r in json.loads(planted.stdout)["rows"] if r["what"].startswith("latency")]
    assert flagged[0]["verdict"] == "regression" and flagged[0]["side_by_side"]
    # A named stage is timed instead of the final one; the baseline is loaded from its origin.
    baseline = _remeasure(tiny_run, same, "--stage", "baseline", "--max-regression", "50%")
    assert baseline.exit_code == 0, baseline.output
    assert {r["stage"] for r in json.loads(baseline.stdout)["rows"]} == {"baseline"}


def test_remeasure_refuses_what_it_cannot_time_with_exit_2(tmp_path, tiny_run):
    file_only = _remeasure(tiny_run / "report.json", tiny_run)
    assert file_only.exit_code == 2 and "run folders" in file_only.output and "report.json" in file_only.output
    unknown = _remeasure(tiny_run, tiny_run, "--stage", "int8")
    assert unknown.exit_code == 2 and "'int8'" in unknown.output and "onnx_export" in unknown.output
    no_flag = CliRunner().invoke(cli, ["compare", str(tiny_run), str(tiny_run), "--stage", "baseline"])
    assert no_flag.exit_code == 2 and "--remeasure" in no_flag.output
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    (broken / "01-onnx_export" / "model.onnx").unlink()
    missing = _remeasure(tiny_run, broken)
    assert missing.exit_code == 2 and "onnx_export" in missing.output and "broken" in missing.output


def test_remeasure_pairs_a_decoders_ttft_and_decode_rounds(tmp_path, optitool_tiny_causal_lm, optitool_text_folder):
    snippet = (f'[model]\nsource = "hf"\npath = "{optitool_tiny_causal_lm}"\nmax_length = 16\n'
               f'[data]\nsource = "folder"\npath = "{optitool_text_folder}"\nlabel_field = ""\nsplits = {{ eval = 0.5 }}\n'
               '[[passes]]\npass = "onnx_export"\n[benchmark]\nbatch_sizes = [1]\nsequence_lengths = [16]\n'
               'new_tokens = 8\nmin_iterations = 3\nmin_seconds = 0\nmemory = false\n')
    run = run_snippet(snippet, tmp_path, benchmark=True).run_dir
    shutil.copytree(run, tmp_path / "copy")
    result = _remeasure(run, tmp_path / "copy", "--max-regression", "50%")
    assert result.exit_code == 0, result.output
    latency = {r["what"]: r for r in json.loads(result.stdout)["rows"] if r["what"].startswith("latency")}
    assert set(latency) == {"latency onnxruntime 1x16 ttft", "latency onnxruntime 1x16 decode"}
    assert all(r["side_by_side"] for r in latency.values())
