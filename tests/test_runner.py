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


def test_seeded_runs_are_reproducible(tmp_path, optitool_tiny_bert, optitool_text_folder):
    """The seed decides everything random in a run: a new head's initial weights, dropout, the order of
    training batches. Same seed, same numbers; another seed, other numbers (so the seed is really used)."""
    def run(seed: int, folder: str) -> dict:
        snippet = (f'seed = {seed}\n[model]\nsource = "hf"\npath = "{optitool_tiny_bert}"\n'
                   'task = "text-classification"\nnum_labels = 3\nmax_length = 16\n'
                   f'[data]\nsource = "folder"\npath = "{optitool_text_folder}"\n'
                   'splits = { train = 0.5, eval = 0.3 }\n'
                   '[[passes]]\npass = "distill"\nalpha = 0\nmax_steps = 3\nbatch_size = 4\nkeep_best = false\n')
        return run_snippet(snippet, tmp_path / folder).report["stages"][1]["metrics"]

    a, b, other = run(7, "a"), run(7, "b"), run(8, "c")
    assert a["distill_loss_first"] == b["distill_loss_first"] and a["distill_loss_last"] == b["distill_loss_last"]
    assert a["accuracy"] == b["accuracy"]
    assert other["distill_loss_first"] != a["distill_loss_first"]


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
    (tmp_path / "out" / "report.json").write_text("{}")  # an earlier run's folder: --overwrite may replace it
    assert prepare_run_dir(spec, str(tmp_path / "out"), overwrite=True) == (tmp_path / "out").absolute()


def test_overwrite_never_deletes_a_folder_that_is_not_a_run_folder(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from optitool.cli import cli

    project = tmp_path / "my-project"
    project.mkdir()
    (project / "train.py").write_text("precious")
    (project / "p.toml").write_text(MLP)
    monkeypatch.chdir(project)
    result = CliRunner().invoke(cli, ["run", "p.toml", "--output", ".", "--overwrite"])
    assert result.exit_code == 2 and "not an optitool run folder" in result.output
    assert (project / "train.py").read_text() == "precious"


def test_a_run_folder_that_cannot_be_created_is_a_clear_error(tmp_path):
    from click.testing import CliRunner

    from optitool.cli import cli

    (tmp_path / "p.toml").write_text(MLP)
    for output in ("/sys/optitool-test/run", "/proc/optitool-test"):  # not even root may create these
        result = CliRunner().invoke(cli, ["run", str(tmp_path / "p.toml"), "--output", output])
        assert result.exit_code == 2, result.output
        assert "cannot create the run folder" in result.output or "not writable" in result.output
        assert "unexpected" not in result.output


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


def _readme_plugin() -> types.ModuleType:
    """The plugin printed in README.md, exactly as printed."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Writing a plugin"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("readme_plugin")
    exec(compile(code, "README.md", "exec"), module.__dict__)
    return module


def test_the_readme_plugin_runs_as_printed_and_its_half_model_is_evaluated_and_benchmarked(tmp_path):
    snippet = MLP + ('[[passes]]\npass = "acme.half"\n[benchmark]\nbatch_sizes = [2]\nwarmup = 1\n'
                     'min_iterations = 3\nmax_iterations = 3\nmin_seconds = 0\nmemory = false\n')
    report = run_snippet(snippet, tmp_path, plugins=(_readme_plugin(),), benchmark=True).report
    stage = report["stages"][1]
    assert stage["metrics"]["fidelity"] > 0.999  # float16 weights, evaluated on float16 inputs
    assert stage["benchmarks"][0]["iterations"] == 3


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    from optitool.atomic import FolderLock

    with FolderLock(tmp_path / "run"):
        with pytest.raises(RunError, match=r"another optitool run \(pid \d+\) is writing to"):
            run_snippet(MLP, tmp_path)
    assert not (tmp_path / "run").exists()
    assert run_snippet(MLP, tmp_path).report["status"] == "finished"  # the lock went with its owner


def test_a_lock_left_by_a_killed_process_is_free(tmp_path):
    """The lock is an flock: it dies with its holder, SIGKILL included, with no stale-pid guesswork."""
    import signal
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from optitool.atomic import FolderLock; lock = FolderLock(Path(sys.argv[1])); "
                               "lock.__enter__(); print('held', flush=True); time.sleep(600)", str(tmp_path / "run")],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunError, match=rf"another optitool run \(pid {holder.pid}\)"):
        run_snippet(MLP, tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (tmp_path / ".run.optitool-lock").exists()  # the file stays; the lock went with its process
    assert run_snippet(MLP, tmp_path).report["status"] == "finished"


def test_two_concurrent_cli_runs_on_one_folder_do_not_mix(tmp_path):
    """Two `optitool run` at once into one folder: the second refuses and writes nothing there."""
    import subprocess
    import sys
    import time

    (tmp_path / "slowzoo.py").write_text("import time\nfrom optitool.testing import tiny_mlp\n"
                                         "def make():\n    time.sleep(5)\n    return tiny_mlp()\n")
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(MLP.replace("optitool.testing:tiny_mlp", "slowzoo:make")
                        + '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\n[benchmark]\nenabled = false\n')
    command = [sys.executable, "-m", "optitool.cli", "run", str(pipeline), "-o", str(tmp_path / "out"),
               "--overwrite", "--quiet"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".out.optitool-lock"
    deadline = time.monotonic() + 60
    while not lock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    second = subprocess.run(command, capture_output=True, text=True)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 1 and f"another optitool run (pid {first.pid})" in second.stderr
    report = __import__("json").loads((tmp_path / "out" / "report.json").read_text())
    assert report["status"] == "finished" and [s["name"] for s in report["stages"]] == ["baseline", "magnitude_prune"]
    from optitool.locks import FileLock

    assert FileLock(lock).acquire(blocking=False)  # released when the first run ended


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time

    pipeline = tmp_path / "p.toml"  # the second pass waits inside its stage until the signal comes
    pipeline.write_text(MLP + '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\n'
                        '[[passes]]\npass = "acme.wait"\n[benchmark]\nenabled = false\n')
    (tmp_path / "acme_wait.py").write_text(
        "import time\nimport optitool\n"
        "class Wait(optitool.Pass):\n    name = 'acme.wait'\n    takes = 'torch'\n    gives = 'torch'\n"
        "    def run(self, model, ctx):\n        (ctx.stage_dir / 'half.bin').write_bytes(b'x')\n"
        "        time.sleep(120)\n        return model\n"
        "@optitool.hookimpl\ndef optitool_register_passes(registry):\n    registry.add(Wait)\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import acme_wait; from optitool import plugins; "
            "real = plugins.get_plugin_manager; "
            "plugins.get_plugin_manager = lambda **kw: real(**{**kw, 'modules': (acme_wait,)}); "
            "from optitool.cli import cli; cli(sys.argv[2:], prog_name='optitool')")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), "run", str(pipeline), "-o",
                             str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out").glob(".02-acme.wait.*.partial/half.bin")) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["status"] == "interrupted" and [s["name"] for s in report["stages"]] == ["baseline", "magnitude_prune"]
    assert not list((tmp_path / "out").glob(".*partial")) and not (tmp_path / "out" / "02-acme.wait").exists()


def test_run_folders_follow_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        run = run_snippet(MLP + '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\n', tmp_path).run_dir
    finally:
        os.umask(old)
    for path in (run / "report.json", run / "01-magnitude_prune" / "stage.json", run / "01-magnitude_prune"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
