"""`optitool search` as users and CI see it: the spec refused before anything runs, trials as runs, results
that reproduce, a killed search that resumes, and a stage cache that trials and searches share."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from optitool.cli import cli

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "counting_plugin"

PIPELINE = """
name = "tiny-search"
seed = 0
[model]
source = "python"
factory = "optitool.testing:tiny_mlp"
kwargs = { hidden = 64 }
[model.inputs]
x = ["batch", 16]
[[passes]]
pass = "magnitude_prune"
sparsity = 0.5
[[passes]]
pass = "magnitude_prune"
name = "again"
sparsity = 0.6
[benchmark]
batch_sizes = [4]
runtimes = ["torch_eager"]
min_iterations = 3
min_seconds = 0
warmup = 1
memory = false  # peak memory is a fresh process per stage: 8 s a trial, and no test here reads it
[budget]
min_fidelity = 0.9
[search]
sampler = "grid"
objectives = { latency_ms = "minimize", fidelity = "maximize" }
[search.parameters]
"passes.0.sparsity" = [0.2, 0.97]
"passes.1.sparsity" = [0.3, 0.4]
"""


@pytest.fixture
def counting(tmp_path, monkeypatch):
    """Trials load the counting plugin (OPTITOOL_PLUGINS reaches their fresh processes); returns a reader of
    its lines."""
    count = tmp_path / "count.txt"
    monkeypatch.setenv("OPTITOOL_PLUGINS", "optitool_count_passes")
    monkeypatch.setenv("OPTITOOL_COUNT_FILE", str(count))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(FIXTURES))

    def lines() -> list[list[str]]:
        return [line.split() for line in count.read_text().splitlines()] if count.is_file() else []

    return lines


def search(*args: str):
    return CliRunner().invoke(cli, ["search", *map(str, args)], catch_exceptions=False)


@pytest.mark.slow
def test_a_grid_search_finds_the_feasible_trials_and_best_toml_reproduces_the_chosen_one(tmp_path, counting):
    (tmp_path / "p.toml").write_text(PIPELINE)
    folder, cache = tmp_path / "s1", tmp_path / "cache"
    result = search(tmp_path / "p.toml", "-o", folder, "--cache", cache)
    assert result.exit_code == 0, result.output
    assert "re-measuring" in result.output and "Pareto front" in result.output
    found = json.loads((folder / "search.json").read_text())
    statuses = {(t["params"]["passes.0.sparsity"], t["params"]["passes.1.sparsity"]): t["status"]
                for t in found["trials"]}
    assert statuses == {(0.2, 0.3): "feasible", (0.2, 0.4): "feasible", (0.97, 0.3): "infeasible",
                        (0.97, 0.4): "infeasible"}
    best = next(t for t in found["trials"] if t["number"] == found["best"])
    assert found["best"] in found["pareto"] and found["remeasured"][str(found["best"])]["median_ms"] > 0
    assert (folder / "search.md").read_text().count("| feasible |") == 2
    assert (folder / "plots" / "latency_vs_quality.png").is_file()
    # the stage cache: the first pass ran once per value (2), the second once per trial (4) ...
    computed = [line[1] for line in counting() if line[2] == "computed"]
    assert sorted(computed) == ["again"] * 4 + ["magnitude_prune"] * 2
    # the chosen pipeline, run as users would: the same fidelity exactly
    run = CliRunner().invoke(cli, ["run", str(folder / "best.toml"), "-o", str(tmp_path / "again"), "--quiet"])
    assert run.exit_code == 0, run.output
    stages = json.loads((tmp_path / "again" / "report.json").read_text())["stages"]
    assert stages[-1]["metrics"]["fidelity"] == best["metrics"]["fidelity"]
    # ... and a second search over the same space, sharing the cache, computes no stage at all
    before = len(counting())
    again = search(tmp_path / "p.toml", "-o", tmp_path / "s2", "--cache", cache)
    assert again.exit_code == 0, again.output
    new = counting()[before:]
    assert [line for line in new if line[2] == "computed"] == [] and len([x for x in new if x[2] == "cached"]) == 8


@pytest.mark.slow
def test_ray_runs_two_trials_at_once_finds_the_same_feasible_trials_and_survives_a_dead_worker(
        tmp_path, counting, monkeypatch):
    """Local Ray, two trials at a time; the worker under the last trial is killed: that trial fails, the
    search finishes, and the feasible trials are those the local executor finds."""
    pytest.importorskip("ray")
    monkeypatch.setenv("OPTITOOL_KILL_PARENT_OF", "003")
    (tmp_path / "p.toml").write_text(PIPELINE.replace('sampler = "grid"', 'sampler = "grid"\nconcurrency = 2'))
    result = search(tmp_path / "p.toml", "-o", tmp_path / "s", "--executor", "ray", "--no-cache")
    assert result.exit_code == 0, result.output
    assert "2 trial(s) at a time, ray" in result.output
    trials = json.loads((tmp_path / "s" / "search.json").read_text())["trials"]
    feasible = {(t["params"]["passes.0.sparsity"], t["params"]["passes.1.sparsity"]) for t in trials
                if t["status"] == "feasible"}
    assert feasible == {(0.2, 0.3), (0.2, 0.4)}
    dead = next(t for t in trials if t["number"] == 3)
    assert dead["status"] == "failed" and "Ray task failed" in dead["error"]


@pytest.mark.slow
def test_no_feasible_trial_exits_1_for_ci(tmp_path):
    (tmp_path / "p.toml").write_text(PIPELINE.replace("min_fidelity = 0.9", "min_fidelity = 0.99999")
                                     .replace("[0.2, 0.97]", "[0.97]").replace("[0.3, 0.4]", "[0.4]"))
    result = search(tmp_path / "p.toml", "-o", tmp_path / "s", "--no-cache")
    assert result.exit_code == 1 and "no trial met the budget" in result.output
    assert not (tmp_path / "s" / "best.toml").exists()
    assert json.loads((tmp_path / "s" / "search.json").read_text())["counts"]["infeasible"] == 1


def _descendants(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL to the group", "SIGTERM to the search alone"])
def test_a_stopped_search_resumes_and_runs_every_grid_point_once(tmp_path, counting, how):
    """SIGTERM (a CI cancel, `timeout`) reaches only optitool: its trial process must stop with it, and on
    resuming the interrupted point runs again and so does every point not yet run."""
    import psutil

    (tmp_path / "p.toml").write_text(PIPELINE)
    folder = tmp_path / "s"
    command = [sys.executable, "-m", "optitool.cli", "search", str(tmp_path / "p.toml"), "-o", str(folder),
               "--no-cache"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (folder / "trials" / "001").exists():
        time.sleep(0.2)  # trial 0 finished, trial 1 started
    children = _descendants(process.pid)
    if how.startswith("SIGKILL"):
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    else:
        assert children, "trial 1 runs in a child process"
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 143 and "terminated" in err and "Traceback" not in err
        alive = [pid for pid in children if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        assert not alive, f"trial processes outlived the search: {alive}"
    assert (folder / "trials" / "000" / "report.json").is_file()
    result = search(tmp_path / "p.toml", "-o", folder, "--no-cache")
    assert result.exit_code == 0, result.output
    assert "continuing the search: 1 trials already finished" in result.output
    trials = json.loads((folder / "search.json").read_text())["trials"]
    assert {t["status"] for t in trials} <= {"feasible", "infeasible", "failed", "interrupted"}, trials
    finished = [t for t in trials if t["status"] != "interrupted"]
    points = sorted(tuple(sorted(t["params"].items())) for t in finished)
    grid = sorted((("passes.0.sparsity", a), ("passes.1.sparsity", b)) for a in (0.2, 0.97) for b in (0.3, 0.4))
    assert points == grid  # every grid point exactly once
    started = [Path(line[2]).name for line in counting() if line[1] == "start"]
    assert started.count("000") == 1  # trial 0 ran once: before the stop


@pytest.mark.slow
def test_a_second_search_on_a_running_searchs_folder_is_refused(tmp_path):
    (tmp_path / "p.toml").write_text(PIPELINE)
    folder = tmp_path / "s"
    process = subprocess.Popen([sys.executable, "-m", "optitool.cli", "search", str(tmp_path / "p.toml"), "-o",
                                str(folder), "--no-cache"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (folder / "trials" / "000").exists():
            time.sleep(0.2)
        result = search(tmp_path / "p.toml", "-o", folder, "--no-cache")
        assert result.exit_code == 1 and "another optitool search" in result.output, result.output
    finally:
        process.wait(timeout=600)
    assert process.returncode == 0
    trials = json.loads((folder / "search.json").read_text())["trials"]
    assert sorted(t["status"] for t in trials).count("interrupted") == 0 and len(trials) == 4


@pytest.mark.parametrize(("change", "message"), [
    ('"passes.5.sparsity" = [0.1]', "the pipeline has 2 passes"),
    ('"passes.0.sparsity" = [0.5, 1.5]', "the value 1.5 is refused"),
    ('"passes.0.bogus" = [1]', "has no setting 'bogus'"),
    ('"sparsity" = [0.1]', "passes.N.setting"),
    ('"passes.0.sparsity" = { low = 0.1, high = 0.9 }', "needs a step"),
    ('"passes.0.sparsity" = { low = 0.9, high = 0.1, step = 0.1 }', "must be above low"),
])
def test_a_bad_search_spec_exits_2_and_writes_nothing(tmp_path, change, message):
    text = PIPELINE.split("[search.parameters]")[0] + f"[search.parameters]\n{change}\n"
    (tmp_path / "p.toml").write_text(text)
    for command in (["validate", str(tmp_path / "p.toml")], ["search", str(tmp_path / "p.toml"), "-o",
                                                            str(tmp_path / "s")]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "s").exists()


def test_a_misspelt_objective_exits_2_before_any_trial(tmp_path):
    (tmp_path / "p.toml").write_text(PIPELINE.replace('fidelity = "maximize"', 'fidelty = "maximize"'))
    result = CliRunner().invoke(cli, ["search", str(tmp_path / "p.toml"), "-o", str(tmp_path / "s")])
    assert result.exit_code == 2 and "objective 'fidelty' is no metric" in result.output, result.output
    assert not (tmp_path / "s").exists()


def test_search_without_a_search_table_or_length_is_a_usage_error(tmp_path):
    (tmp_path / "p.toml").write_text(PIPELINE.split("[search]")[0])
    result = CliRunner().invoke(cli, ["search", str(tmp_path / "p.toml"), "-o", str(tmp_path / "s")])
    assert result.exit_code == 2 and "no [search] table" in result.output
    (tmp_path / "q.toml").write_text(PIPELINE.replace('sampler = "grid"', 'sampler = "tpe"'))
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "q.toml")])
    assert result.exit_code == 2 and "trials = N" in result.output
    assert not (tmp_path / "s").exists()


def test_a_value_refused_in_the_middle_of_a_range_exits_2(tmp_path):
    text = ('[model]\nsource = "python"\nfactory = "optitool.testing:tiny_mlp"\n[model.inputs]\nx = ["batch", 16]\n'
            '[[passes]]\npass = "onnx_export"\n[[passes]]\npass = "weight_only_quantize"\n'
            '[search]\ntrials = 2\n[search.parameters]\n"passes.1.block_size" = { low = 16, high = 32 }\n')
    (tmp_path / "p.toml").write_text(text)
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "p.toml")])
    assert result.exit_code == 2 and "the value 17 is refused" in result.output, result.output
    (tmp_path / "p.toml").write_text(text.replace("{ low = 16, high = 32 }", "[16, 32]"))
    assert CliRunner().invoke(cli, ["validate", str(tmp_path / "p.toml")]).exit_code == 0


@pytest.mark.parametrize(("family", "objective", "message"), [
    ("llama", "fidelity", "objective 'fidelity' is measured on classifiers and encoders"),
    ("bert", "perplexity", "objective 'perplexity' is measured for causal language models only"),
])
def test_an_objective_the_models_task_never_reports_exits_2(tmp_path, optitool_tiny_bert, family, objective, message):
    from optitool.testing import tiny_causal_lm_dir

    folder = (tiny_causal_lm_dir(tmp_path / "lm", family="llama", train_steps=0) if family == "llama"
              else optitool_tiny_bert)
    (tmp_path / "p.toml").write_text(
        f'[model]\nsource = "hf"\npath = "{folder}"\nmax_length = 16\n[benchmark]\nsequence_lengths = [16]\n'
        '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\n'
        f'[search]\ntrials = 2\nobjectives = {{ {objective} = "minimize" }}\n[search.parameters]\n'
        '"passes.0.sparsity" = [0.2, 0.4]\n')
    result = CliRunner().invoke(cli, ["search", str(tmp_path / "p.toml"), "-o", str(tmp_path / "s")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "s").exists()


def test_unusable_storage_and_absent_cluster_are_usage_errors_before_any_folder_is_made(tmp_path):
    import time

    (tmp_path / "p.toml").write_text(PIPELINE)
    out = tmp_path / "s"
    bad_url = CliRunner().invoke(cli, ["search", str(tmp_path / "p.toml"), "-o", str(out), "--storage", "nodb://x/y"])
    assert bad_url.exit_code == 2 and "--storage nodb://x/y: the database cannot be used" in bad_url.output
    start = time.monotonic()
    absent = CliRunner().invoke(cli, ["search", str(tmp_path / "p.toml"), "-o", str(out), "--executor", "ray",
                                      "--address", "127.0.0.1:9"])
    assert absent.exit_code == 2 and "no Ray cluster answers at 127.0.0.1:9" in absent.output, absent.output
    assert time.monotonic() - start < 30
    assert not out.exists()


def test_a_damaged_study_database_is_named(tmp_path):
    from optitool.search.study import STUDY_DB

    (tmp_path / "p.toml").write_text(PIPELINE)
    out = tmp_path / "s"
    out.mkdir()
    (out / STUDY_DB).write_bytes(b"this is not an SQLite database" * 100)
    result = CliRunner().invoke(cli, ["search", str(tmp_path / "p.toml"), "-o", str(out)])
    assert result.exit_code == 2 and f"study database {out / STUDY_DB} cannot be read" in result.output, result.output


@pytest.mark.slow
def test_a_search_on_a_two_node_ray_cluster_checks_every_node_and_finishes(tmp_path, counting):
    """A real multi-node cluster on this machine (ray.cluster_utils): every node is checked to see the
    pipeline's files and the trials folder at this machine's paths, then every trial runs there."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        (tmp_path / "p.toml").write_text(PIPELINE.replace('sampler = "grid"', 'sampler = "grid"\nconcurrency = 2'))
        result = search(tmp_path / "p.toml", "-o", tmp_path / "s", "--executor", "ray", "--address",
                        cluster.address, "--no-cache")
        assert result.exit_code == 0, result.output
        assert "ray on 2 node(s), each seeing the search's files" in result.output
        trials = json.loads((tmp_path / "s" / "search.json").read_text())["trials"]
        assert sorted(t["status"] for t in trials) == ["feasible", "feasible", "infeasible", "infeasible"]
        assert all((tmp_path / "s" / "trials" / f"{t['number']:03d}" / "report.json").is_file() for t in trials)
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_node_that_sees_other_files_is_named_with_what_differs(tmp_path):
    from optitool.search.shared_storage import fingerprint, node_problems

    pipeline, folder = tmp_path / "p.toml", tmp_path / "data"
    pipeline.write_text("a")
    folder.mkdir()
    expected = {str(pipeline): fingerprint(pipeline), str(folder): "folder"}
    assert node_problems(expected, [str(tmp_path / "trials")]) == []
    pipeline.write_text("b")  # what another node would see on storage that is not shared
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    problems = node_problems({**expected, str(tmp_path / "gone"): "folder"}, [str(locked)])
    assert any(f"{pipeline} is another file there" in p for p in problems)
    assert any(f"{tmp_path / 'gone'} does not exist there" in p for p in problems)
    import os

    if os.geteuid() != 0:  # root writes anywhere
        assert any(f"{locked} cannot be written there" in p for p in problems)
