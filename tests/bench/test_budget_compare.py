from __future__ import annotations

import json
import random

from click.testing import CliRunner

from optitool.budget import check_budget
from optitool.cli import cli
from optitool.compare import compare_reports
from optitool.spec import BudgetSpec


def bench(median: float, spread: float, seed: int, runtime: str = "onnxruntime", shape: str = "8x128") -> dict:
    rng = random.Random(seed)
    samples = [rng.gauss(median, spread) for _ in range(30)]
    return {"runtime": runtime, "shape": shape, "median_ms": sorted(samples)[15], "samples_ms": samples,
            "memory": {"peak_rss_mb": 900.0}}


def report(median: float, fidelity: float = 0.99, seed: int = 0, spread: float = 5.0) -> dict:
    return {"stages": [
        {"name": "baseline", "metrics": {"accuracy": 0.97, "fidelity": 1.0, "size_bytes": 90e6},
         "benchmarks": [bench(200, 5, seed + 100)]},
        {"name": "int8", "metrics": {"accuracy": 0.965, "fidelity": fidelity, "size_bytes": 23e6},
         "benchmarks": [{**bench(median, spread, seed),
                         "speedup_vs_baseline": {"ratio": 200 / median, "low": 190 / median, "high": 210 / median}}]}]}


def test_budget_checks_name_limit_and_measured_value():
    verdict = check_budget(report(100), BudgetSpec(max_accuracy_drop=0.01, min_fidelity=0.995, max_size_mb=30,
                                                   min_speedup=1.5, max_latency_ms={"8x128": 90},
                                                   max_peak_memory_mb=1000))
    by_name = {c["budget"]: c for c in verdict["checks"]}
    assert not verdict["passed"]
    assert by_name["max_accuracy_drop"]["passed"] and by_name["max_size_mb"]["passed"]
    assert not by_name["min_fidelity"]["passed"] and "limit 0.995" in by_name["min_fidelity"]["message"]
    assert not by_name["max_latency_ms[8x128]"]["passed"]
    assert by_name["min_speedup"]["passed"] and by_name["max_peak_memory_mb"]["passed"]


def test_an_unmeasured_budget_fails():
    r = report(100)
    del r["stages"][1]["metrics"]["accuracy"]
    check = check_budget(r, BudgetSpec(max_accuracy_drop=0.01))["checks"][0]
    assert not check["passed"] and "not measured" in check["message"]


def test_compare_separates_noise_from_regressions():
    same = compare_reports(report(100, seed=0), report(101, seed=1), max_regression=0.05)
    assert same["regressions"] == 0
    slow = compare_reports(report(100, seed=0), report(130, seed=1), max_regression=0.05)
    assert slow["regressions"] == 1
    row = next(r for r in slow["rows"] if r["verdict"] == "regression")
    assert row["interval"][0] > 0 and row["change"] > 0.25


def test_small_but_real_slowdown_under_the_threshold_passes():
    result = compare_reports(report(100, seed=0, spread=0.5), report(103, seed=1, spread=0.5), max_regression=0.05)
    row = next(r for r in result["rows"] if r["stage"] == "int8" and r["what"].startswith("latency"))
    assert row["interval"][0] > 0  # real (outside the noise) but under the 5 % threshold
    assert result["regressions"] == 0


def test_quality_drop_is_a_regression():
    assert compare_reports(report(100), report(100, fidelity=0.95))["regressions"] == 1


def test_compare_cli_exit_codes_and_markdown(tmp_path):
    base, new, slow = tmp_path / "b.json", tmp_path / "n.json", tmp_path / "s.json"
    base.write_text(json.dumps(report(100, seed=0)))
    new.write_text(json.dumps(report(100.5, seed=1)))
    slow.write_text(json.dumps(report(130, seed=1)))
    ok = CliRunner().invoke(cli, ["compare", str(base), str(new), "--markdown"])
    assert ok.exit_code == 0 and "| stage |" in ok.output
    bad = CliRunner().invoke(cli, ["compare", str(base), str(slow), "--max-regression", "10%"])
    assert bad.exit_code == 1 and "regression" in bad.output
    missing = CliRunner().invoke(cli, ["compare", str(base), str(tmp_path / "nope.json")])
    assert missing.exit_code == 2


def test_size_and_memory_growth_beyond_the_threshold_are_regressions():
    bigger = report(100)
    bigger["stages"][1]["metrics"]["size_bytes"] = 30e6
    bigger["stages"][1]["benchmarks"][0]["memory"] = {"peak_rss_mb": 1200.0}
    rows = {r["what"]: r["verdict"] for r in compare_reports(report(100), bigger)["rows"] if r["stage"] == "int8"}
    assert rows["size MB"] == "regression" and rows["peak memory MB onnxruntime 8x128"] == "regression"


def test_a_change_within_one_runs_spread_is_not_called_real():
    def one(center: float) -> dict:
        # median = center, std ~ 10 % of it: 15 % slower is outside the bootstrap interval but within the drift
        samples = [center - 17 + 34 * i / 60 for i in range(61)]
        return {"stages": [{"name": "m", "metrics": {}, "benchmarks": [
            {"runtime": "ort", "shape": "1", "median_ms": center, "samples_ms": samples}]}]}

    drift = compare_reports(one(100), one(115), max_regression=0.05)["rows"][0]
    assert drift["interval"][0] > 0 and drift["noise_floor"] > 0.19 and drift["verdict"] == "unchanged"
    assert compare_reports(one(100), one(130), max_regression=0.05)["rows"][0]["verdict"] == "regression"
