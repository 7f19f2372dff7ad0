"""Tasks scored in a run: every stage on the same items as the baseline, the drop paired item by item."""

from __future__ import annotations

import json
import types

import pytest
from click.testing import CliRunner

import optitool
from optitool.cli import cli
from optitool.testing import tiny_task_file


class Copy(optitool.Pass):
    """An identical model: its paired change must be exactly 0."""

    name = "acme.copy"
    takes = "torch"
    gives = "torch"

    def run(self, model, ctx):
        return model


class Scramble(optitool.Pass):
    """A planted degradation: the token embedding's rows (tied to the head) permuted, seeded."""

    name = "acme.scramble"
    takes = "torch"
    gives = "torch"

    def run(self, model, ctx):
        import torch

        embedding = model.module.get_input_embeddings().weight
        order = torch.randperm(embedding.shape[0], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            embedding.copy_(embedding[order])
        return model


def plugin():
    module = types.ModuleType("acme_task_passes")
    module.optitool_register_passes = optitool.hookimpl(lambda registry: (registry.add(Copy), registry.add(Scramble)))
    return module


@pytest.fixture
def scored_run(bpe_causal_lm, tmp_path):
    from optitool.testing import run_snippet

    tiny_task_file(tmp_path / "tasks", items=20)
    toml = (f'[model]\nsource = "hf"\npath = "{bpe_causal_lm}"\nmax_length = 32\n[benchmark]\nenabled = false\n'
            '[[passes]]\npass = "acme.copy"\nname = "copy"\n[[passes]]\npass = "acme.scramble"\nname = "broken"\n'
            '[evaluation]\ntasks = ["tasks/tiny_multiple_choice.yaml"]\nstages = ["baseline", "copy", "final"]\n'
            '[budget]\nmax_task_drop = { tiny_multiple_choice = 0.05 }\nno_significant_task_drop = true\n')
    return run_snippet(toml, tmp_path, plugins=(plugin(),))


def test_a_copy_is_not_worse_and_a_planted_degradation_is(scored_run):
    stages = {s["name"]: s for s in scored_run.report["stages"]}
    base = stages["baseline"]["tasks"]["tiny_multiple_choice"]
    assert base["items"] == 20 and base["main_metric"] == "acc" and base["metrics"]["acc"] >= 0.8
    same = stages["copy"]["task_changes"]["tiny_multiple_choice"]
    assert same["difference"] == same["low"] == same["high"] == 0 and not same["significantly_worse"]
    assert stages["copy"]["tasks"]["tiny_multiple_choice"]["metrics"] == base["metrics"]
    broken = stages["broken"]["task_changes"]["tiny_multiple_choice"]
    assert broken["high"] < 0 and broken["significantly_worse"] and broken["drop"] > 0.3
    assert broken["mcnemar_p"] < 0.05


def test_task_budgets_fail_on_the_degraded_stage(scored_run):
    budget = scored_run.report["budget"]
    assert budget["stage"] == "broken" and not budget["passed"]
    checks = {c["budget"]: c for c in budget["checks"]}
    assert not checks["max_task_drop[tiny_multiple_choice]"]["passed"]
    assert not checks["no_significant_task_drop[tiny_multiple_choice]"]["passed"]
    assert "significantly worse" in checks["no_significant_task_drop[tiny_multiple_choice]"]["message"]


def test_reports_and_kept_items(scored_run):
    from optitool.lm_tasks.scoring import load_scores, paired_changes

    run_dir = scored_run.run_dir
    markdown = (run_dir / "report.md").read_text()
    assert "## lm-eval tasks" in markdown and "tiny_multiple_choice acc" in markdown and " worse |" in markdown
    items = json.loads((run_dir / "02-broken" / "task_items.json").read_text())["tiny_multiple_choice"]
    assert len(items) == 20 and set(items["0"]) == {"acc"}
    again = paired_changes(load_scores(run_dir / "00-baseline"), load_scores(run_dir / "02-broken"), seed=0)
    assert again == scored_run.report["stages"][-1]["task_changes"]
    assert json.loads((run_dir / "01-copy" / "stage.json").read_text())["tasks"]["tiny_multiple_choice"]["items"] == 20
    assert "tasks_seconds" in scored_run.report["stages"][0]


def test_the_run_command_shows_task_scores_and_exits_1_on_a_task_budget(bpe_causal_lm, tmp_path):
    tiny_task_file(tmp_path / "tasks", items=20)
    pipeline = tmp_path / "pipeline.toml"
    pipeline.write_text(f'[model]\nsource = "hf"\npath = "{bpe_causal_lm}"\nmax_length = 32\n[benchmark]\n'
                        'enabled = false\n[[passes]]\npass = "magnitude_prune"\nsparsity = 0.3\n'
                        '[evaluation]\ntasks = ["tasks/tiny_multiple_choice.yaml"]\n'
                        '[budget]\nmax_task_drop = { tiny_multiple_choice = 0.0 }\n'
                        'no_significant_task_drop = ["tiny_multiple_choice"]\n')
    result = CliRunner().invoke(cli, ["run", str(pipeline), "-o", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    change = report["stages"][-1]["task_changes"]["tiny_multiple_choice"]
    assert result.exit_code == (0 if change["drop"] <= 0 else 1), result.output
    assert "tiny_multiple_choice acc" in result.output and "lm-eval tasks" in result.output
    assert "no_significant_task_drop[tiny_multiple_choice]" in result.output


def test_an_onnx_stage_scores_the_items_its_torch_parent_scores(bpe_causal_lm, tmp_path):
    """The exported graph (through its KV cache) on a 20-item task of each kind, paired with the torch model."""
    from optitool.testing import run_snippet

    for kind in ("multiple_choice", "loglikelihood", "generate_until"):
        tiny_task_file(tmp_path / "tasks", items=20, output_type=kind)
    toml = (f'[model]\nsource = "hf"\npath = "{bpe_causal_lm}"\nmax_length = 32\n[benchmark]\nenabled = false\n'
            '[[passes]]\npass = "onnx_export"\n[evaluation]\ntasks = ["tasks/tiny_multiple_choice.yaml", '
            '"tasks/tiny_loglikelihood.yaml", "tasks/tiny_generate_until.yaml"]\n')
    stages = run_snippet(toml, tmp_path).report["stages"]
    assert [s["kind"] for s in stages] == ["torch", "onnx"]
    base, onnx = stages
    for task, scores in base["tasks"].items():
        assert onnx["tasks"][task]["items"] == scores["items"] == 20
        for metric, value in scores["metrics"].items():
            assert onnx["tasks"][task]["metrics"][metric] == pytest.approx(value, rel=1e-3), (task, metric)
        assert onnx["task_changes"][task]["difference"] == 0, task  # the same answer on every item
