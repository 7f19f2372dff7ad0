from __future__ import annotations

import json

from click.testing import CliRunner

from optitool.cli import cli
from optitool.testing import run_snippet


def test_bench_a_run_folder_then_compare_its_report(tmp_path, optitool_tiny_bert):
    snippet = (f'[model]\nsource = "hf"\npath = "{optitool_tiny_bert}"\nmax_length = 16\n'
               '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\n[[passes]]\npass = "onnx_export"\n')
    run = run_snippet(snippet, tmp_path).run_dir
    result = CliRunner().invoke(cli, ["bench", str(run), "--batch-sizes", "2", "--sequence-lengths", "16",
                                      "--min-iterations", "5", "--min-seconds", "0", "-o", str(tmp_path / "a.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "a.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["baseline", "magnitude_prune", "onnx_export"]
    onnx = report["stages"][2]["benchmarks"][0]
    assert onnx["runtime"] == "onnxruntime" and onnx["iterations"] >= 5 and "speedup_vs_parent" in onnx
    # Timing is not asserted (tests never time); a report compared with itself has no regression.
    compared = CliRunner().invoke(cli, ["compare", str(tmp_path / "a.json"), str(tmp_path / "a.json")])
    assert compared.exit_code == 0 and "0 regression(s)" in compared.output


def test_bench_errors(tmp_path):
    missing = CliRunner().invoke(cli, ["bench", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    bad = CliRunner().invoke(cli, ["bench", str(tmp_path), "--batch-sizes", "x"])
    assert bad.exit_code == 2 and "--batch-sizes" in bad.output
