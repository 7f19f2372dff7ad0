from __future__ import annotations

import json
import random

import pytest
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
    return {"schema_version": 1, "stages": [
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


def test_a_change_within_the_drift_between_runs_is_not_called_real():
    from optitool.bench.stats import relative_spread
    from optitool.compare import DRIFT_FACTOR

    def one(center: float) -> dict:
        samples = [center * (1 + 0.04 * (i - 30) / 30) for i in range(61)]  # +-4 %: rel. MAD about 3 %
        return {"schema_version": 1, "stages": [{"name": "m", "metrics": {}, "benchmarks": [
            {"runtime": "ort", "shape": "1", "median_ms": center, "samples_ms": samples}]}]}

    floor = DRIFT_FACTOR * relative_spread(one(100)["stages"][0]["benchmarks"][0]["samples_ms"])
    within = compare_reports(one(100), one(100 * (1 + 0.8 * floor)), max_regression=0.01)["rows"][0]
    assert within["interval"][0] > 0 and within["verdict"] == "unchanged"  # real within one run, not beyond drift
    beyond = compare_reports(one(100), one(100 * (1 + 1.5 * floor)), max_regression=0.01)["rows"][0]
    assert beyond["verdict"] == "regression"


def test_a_uniform_slowdown_is_flagged_despite_descheduling_spikes():
    """The case the standard deviation got wrong: a tiny model (0.08 ms) with a few 16-32 ms spikes had a
    relative std above 50, so no slowdown of any size was ever flagged."""
    import random

    rng = random.Random(3)
    samples = [rng.gauss(0.08, 0.002) for _ in range(300)]
    for i, spike in zip((17, 90, 151, 260), (16.0, 32.0, 20.0, 24.0), strict=True):
        samples[i] = spike

    def one(values: list[float]) -> dict:
        entry = {"runtime": "torch_eager", "shape": "1", "median_ms": sorted(values)[len(values) // 2],
                 "samples_ms": values}
        return {"schema_version": 1, "stages": [{"name": "mlp", "metrics": {}, "benchmarks": [entry]}]}

    slower = compare_reports(one(samples), one([s * 1.3 for s in samples]), max_regression=0.05)
    row = slower["rows"][0]
    assert row["verdict"] == "regression" and row["spikes"] == [4, 4] and slower["failed"]
    again = [rng.gauss(0.08, 0.002) for _ in range(300)]
    assert compare_reports(one(samples), one(again))["rows"][0]["verdict"] == "unchanged"


def test_compare_fails_closed_on_what_it_cannot_match(tmp_path):
    base = report(100)
    new = report(100, seed=1)
    new["stages"][1]["benchmarks"][0]["shape"] = "1x128"  # measured at another shape
    new["stages"].append({"name": "extra", "metrics": {}, "benchmarks": []})
    del new["stages"][0]  # and the baseline is gone
    result = compare_reports(base, new)
    verdicts = {(r["stage"], r["what"]): r["verdict"] for r in result["rows"]}
    assert verdicts[("int8", "latency onnxruntime 8x128")] == "missing"
    assert verdicts[("int8", "latency onnxruntime 1x128")] == "new"
    assert verdicts[("baseline", "stage")] == "missing" and verdicts[("extra", "stage")] == "new"
    assert result["failed"] and not compare_reports(base, new, allow_missing=True)["failed"]
    (tmp_path / "b.json").write_text(json.dumps(base))
    (tmp_path / "n.json").write_text(json.dumps(new))
    out = CliRunner().invoke(cli, ["compare", str(tmp_path / "b.json"), str(tmp_path / "n.json")])
    assert out.exit_code == 1 and "missing from the new report" in out.output and "int8: latency" in out.output
    allowed = CliRunner().invoke(cli, ["compare", str(tmp_path / "b.json"), str(tmp_path / "n.json"),
                                       "--allow-missing"])
    assert allowed.exit_code == 0, allowed.output


@pytest.mark.parametrize("content, fragment", [
    ('{"hello": "world"}', "is not an optitool report"),
    ("[1, 2, 3]", "is not an optitool report"),
    ('{"schema_version": 99, "stages": []}', "schema version 99"),
    ('{"schema_version": 1, "stages": [{"nom": "x"}]}', "stages[0] has no name"),
    ("not json", "is not valid JSON"),
])
def test_compare_refuses_what_is_not_an_optitool_report_with_exit_2(tmp_path, content, fragment):
    (tmp_path / "b.json").write_text(json.dumps(report(100)))
    (tmp_path / "other.json").write_text(content)
    result = CliRunner().invoke(cli, ["compare", str(tmp_path / "b.json"), str(tmp_path / "other.json")])
    assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output


def test_reports_with_nothing_in_common_are_refused(tmp_path):
    other = report(100)
    for stage in other["stages"]:
        stage["name"] += "-renamed"
    (tmp_path / "b.json").write_text(json.dumps(report(100)))
    (tmp_path / "o.json").write_text(json.dumps(other))
    result = CliRunner().invoke(cli, ["compare", str(tmp_path / "b.json"), str(tmp_path / "o.json")])
    assert result.exit_code == 2 and "no stage in common" in result.output


def with_tasks(acc: float, perplexity: float) -> dict:
    r = report(100)
    r["stages"][1]["tasks"] = {"bbc_topic": {"metrics": {"acc": acc}, "main_metric": "acc", "higher_is_better": {"acc": True}},
                               "words": {"metrics": {"word_perplexity": perplexity}, "main_metric": "word_perplexity",
                                         "higher_is_better": {"word_perplexity": False}}}
    return r


def test_lm_eval_task_scores_are_compared_whichever_way_their_metric_points():
    rows = {r["what"]: r for r in compare_reports(with_tasks(0.80, 10.0), with_tasks(0.78, 10.5),
                                                  max_metric_drop=0.01)["rows"]}
    assert rows["bbc_topic acc"]["verdict"] == "regression" and rows["bbc_topic acc"]["change"] == pytest.approx(-0.02)
    assert rows["words word_perplexity"]["verdict"] == "regression"  # lower is better: a rise regresses
    better = {r["what"]: r for r in compare_reports(with_tasks(0.80, 10.0), with_tasks(0.81, 9.0))["rows"]}
    assert better["bbc_topic acc"]["verdict"] == better["words word_perplexity"]["verdict"] == "unchanged"
    missing = compare_reports(with_tasks(0.80, 10.0), report(100))
    assert missing["failed"] and any(r["what"] == "bbc_topic acc" and r["verdict"] == "missing" for r in missing["rows"])


def test_task_budgets_fail_closed_when_a_task_was_not_paired():
    verdict = check_budget(report(100), BudgetSpec(max_task_drop={"bbc_topic": 0.02}, no_significant_task_drop=True))
    assert not verdict["passed"] and len(verdict["checks"]) == 2
    assert not any(c["passed"] for c in verdict["checks"])
    assert all("cannot be shown to hold" in c["message"] for c in verdict["checks"])
