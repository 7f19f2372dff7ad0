from __future__ import annotations

import json

import pytest
from optitool_distill.distill import Distill

from optitool.errors import ConfigError, RunError
from optitool.testing import check_pass_contract, run_snippet


def bert_snippet(bert, texts, passes: str, task: str = "text-classification") -> str:
    return f"""
seed = 1
[model]
source = "hf"
path = "{bert}"
task = "{task}"
num_labels = 3
max_length = 16
[data]
source = "folder"
path = "{texts}"
splits = {{ train = 0.6, validation = 0.1, eval = 0.3 }}
{passes}
"""


def test_fine_tuning_learns_and_masks_survive_distillation(tmp_path, optitool_tiny_bert):
    from optitool.testing import text_folder

    texts = text_folder(tmp_path / "more-texts", per_label=40)
    passes = """
[[passes]]
pass = "distill"
name = "finetune"
alpha = 0.0
epochs = 4
lr = 0.002
warmup_ratio = 0.0
batch_size = 8
[[passes]]
pass = "magnitude_prune"
sparsity = 0.5
[[passes]]
pass = "distill"
name = "recover"
teacher = "finetune"
epochs = 2
lr = 0.001
batch_size = 8
"""
    result = run_snippet(bert_snippet(optitool_tiny_bert, texts, passes), tmp_path)
    stages = {s["name"]: s["metrics"] for s in result.report["stages"]}
    tuned = stages["finetune"]
    assert tuned["distill_loss_last"] < tuned["distill_loss_first"]
    assert tuned["accuracy"] > 0.6  # three topics with disjoint vocabularies are learnable
    assert tuned["distill_selected_on"] == "validation"
    recover = stages["recover"]
    assert recover["mask_violations"] == 0
    assert recover["nonzero_parameters"] <= stages["magnitude_prune"]["nonzero_parameters"]


def test_shallow_student_keeps_evenly_spaced_layers_and_reloads(tmp_path, optitool_text_folder):
    from optitool.testing import tiny_bert_dir

    bert = tiny_bert_dir(tmp_path / "bert4", classes=3, layers=4)
    passes = '[[passes]]\npass = "distill"\nstudent = "layers"\nlayers = 2\nmax_steps = 3\n'
    result = run_snippet(bert_snippet(bert, optitool_text_folder, passes), tmp_path)
    assert result.report["stages"][1]["metrics"]["student_layers_from_teacher"] == [0, 3]
    from optitool.models.loaders import LOADERS, load_stage

    reloaded = load_stage(result.run_dir / "01-distill", LOADERS)
    assert len(reloaded.module.bert.encoder.layer) == 2


def test_without_a_train_split_the_error_says_what_to_add(tmp_path):
    snippet = ('[model]\nsource = "python"\nfactory = "optitool.testing:tiny_mlp"\n[model.inputs]\nx = ["batch", 16]\n'
               '[[passes]]\npass = "distill"\n')
    with pytest.raises(ConfigError, match="needs a 'train' split"):  # before anything runs
        run_snippet(snippet, tmp_path)
    assert not (tmp_path / "run").exists()


def test_fine_tuning_on_labels_without_labels_is_refused_before_running(tmp_path, optitool_text_folder):
    snippet = (f'[model]\nsource = "python"\nfactory = "optitool.testing:tiny_mlp"\n[model.inputs]\nx = ["batch", 16]\n'
               f'[data]\nsource = "folder"\npath = "{optitool_text_folder}"\nlabel_field = ""\n'
               '[[passes]]\npass = "distill"\nalpha = 0\n')
    with pytest.raises(ConfigError, match="needs labels in the 'train' split"):
        run_snippet(snippet, tmp_path)


def test_contract(tmp_path):
    check_pass_contract(Distill, tmp_path=tmp_path)


def test_cubic_schedule_reaches_the_target_during_distillation(tmp_path, optitool_tiny_bert, optitool_text_folder):
    passes = """
[[passes]]
pass = "magnitude_prune"
sparsity = 0.6
schedule = "cubic"
frequency = 2
[[passes]]
pass = "distill"
max_steps = 6
batch_size = 8
"""
    result = run_snippet(bert_snippet(optitool_tiny_bert, optitool_text_folder, passes, task="feature-extraction"),
                         tmp_path)
    recover = result.report["stages"][2]
    assert recover["metrics"]["gradual_final_sparsity"] == 0.6 and recover["metrics"]["mask_violations"] == 0
    student = result.stages[2].artifact
    covered = [p for n, p in student.module.named_parameters() if n in student.masks]
    zeros, total = sum(int((p == 0).sum()) for p in covered), sum(p.numel() for p in covered)
    assert zeros == round(0.6 * total)  # exactly the target, to the nearest weight


def test_cubic_schedule_without_distill_fails_the_run(tmp_path):
    snippet = ('[model]\nsource = "python"\nfactory = "optitool.testing:tiny_mlp"\n[model.inputs]\nx = ["batch", 16]\n'
               '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\nschedule = "cubic"\n')
    with pytest.raises(RunError, match="no distill pass followed it"):
        run_snippet(snippet, tmp_path)


def test_labels_the_head_cannot_take_are_a_config_error(tmp_path, optitool_tiny_bert, optitool_text_folder):
    from optitool.errors import ConfigError

    snippet = bert_snippet(optitool_tiny_bert, optitool_text_folder, "").replace("num_labels = 3", "num_labels = 2")
    with pytest.raises(ConfigError, match="the data has 3 labels .* head has 2 outputs"):
        run_snippet(snippet, tmp_path)
    assert not (tmp_path / "run").exists()  # a configuration error writes nothing


def test_a_tied_lm_head_keeps_its_pruning_mask_through_distillation(tmp_path, optitool_text_folder):
    """The head's mask is keyed lm_head.weight, a name named_parameters() leaves out for a tied weight: it was
    silently dropped (sparsity 0.197 -> 0) while the report said mask_violations: 0."""
    from optitool.testing import tiny_causal_lm_dir

    folder = tiny_causal_lm_dir(tmp_path / "lm", family="llama", train_steps=20)
    snippet = (f'seed = 1\n[model]\nsource = "hf"\npath = "{folder}"\nmax_length = 16\n'
               f'[benchmark]\nsequence_lengths = [16]\n[data]\nsource = "folder"\npath = "{optitool_text_folder}"\n'
               'label_field = ""\nsplits = { train = 0.6, eval = 0.4 }\n'
               '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\ninclude = ["lm_head"]\nexclude = []\n'
               '[[passes]]\npass = "distill"\nteacher = "baseline"\nepochs = 2\nlr = 0.01\nwarmup_ratio = 0.0\n'
               'keep_best = false\nbatch_size = 8\n')
    result = run_snippet(snippet, tmp_path)
    pruned, distilled = (s["metrics"] for s in result.report["stages"][1:])
    assert pruned["covered_sparsity"] == 0.5 and "masks_dropped" not in distilled
    assert distilled["mask_violations"] == 0
    from safetensors.torch import load_file

    weights = load_file(str(result.run_dir / "02-distill" / "model.safetensors"))
    table = weights.get("lm_head.weight", weights.get("model.embed_tokens.weight"))
    assert float((table == 0).float().mean()) == pytest.approx(0.5, abs=0.01)  # the tied table kept its zeros


def test_a_causal_lm_is_distilled_per_token_on_its_text_and_judged_by_validation_perplexity(
        tmp_path, optitool_text_folder):
    from optitool.testing import tiny_causal_lm_dir

    folder = tiny_causal_lm_dir(tmp_path / "lm", family="gpt2")
    snippet = (f'seed = 1\n[model]\nsource = "hf"\npath = "{folder}"\nmax_length = 16\n'
               f'[benchmark]\nsequence_lengths = [16]\n[data]\nsource = "folder"\npath = "{optitool_text_folder}"\n'
               'label_field = ""\nsplits = { train = 0.5, validation = 0.2, eval = 0.3 }\n'
               '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.6\n'
               '[[passes]]\npass = "distill"\nteacher = "baseline"\nepochs = 3\nlr = 0.005\nwarmup_ratio = 0.0\n'
               'batch_size = 8\n')
    base, pruned, distilled = (s["metrics"] for s in run_snippet(snippet, tmp_path).report["stages"])
    assert "validation_perplexity" in distilled["distill_history"][0]
    assert distilled["perplexity"] < pruned["perplexity"] and distilled["mask_violations"] == 0


def test_the_language_model_loss_ignores_padded_positions(tmp_path):
    """Per token over real positions: what the model says at padding cannot move the loss (the old loss
    summed the whole [batch, length, vocab] and divided by the batch)."""
    import torch
    import transformers

    from optitool.testing import tiny_causal_lm_dir

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir(tmp_path / "lm", train_steps=5))
    teacher = transformers.AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir(tmp_path / "t", train_steps=20))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    distill = Distill()
    loss = distill._loss(teacher, model, {"input_ids": ids, "attention_mask": mask}, None)
    other = ids.clone()
    other[1, 4:] = torch.tensor([20, 21])  # different tokens at the padded positions only
    assert torch.allclose(loss, distill._loss(teacher, model, {"input_ids": other, "attention_mask": mask}, None))


def test_a_shallow_student_builds_for_decoders_and_generates_after_reloading(
        tmp_path, optitool_tiny_causal_lm, optitool_text_folder):
    """Blocks found by role (model.layers, transformer.h): the student keeps the first and last, renumbers
    what indexes its KV cache, and its config says its depth, so it generates and reloads."""
    import torch

    from optitool.models.loaders import LOADERS, load_stage

    snippet = (f'seed = 1\n[model]\nsource = "hf"\npath = "{optitool_tiny_causal_lm}"\nmax_length = 16\n'
               f'[benchmark]\nsequence_lengths = [16]\n[data]\nsource = "folder"\npath = "{optitool_text_folder}"\n'
               'label_field = ""\nsplits = { train = 0.6, eval = 0.4 }\n'
               '[[passes]]\npass = "distill"\nstudent = "layers"\nlayers = 1\nmax_steps = 2\nbatch_size = 4\n')
    result = run_snippet(snippet, tmp_path)
    metrics = result.report["stages"][1]["metrics"]
    assert metrics["student_layers_from_teacher"] == [1] and metrics["teacher"] == "baseline"
    assert metrics["distill_tokens_per_s"] > 0 and "generation_agreement" in metrics
    student = result.stages[1].artifact.module
    config = student.config
    assert getattr(config, "num_hidden_layers", getattr(config, "n_layer", None)) == 1
    reloaded = load_stage(result.run_dir / "01-distill", LOADERS).module
    ids = torch.randint(4, 30, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded.generate(ids, max_new_tokens=4, do_sample=False),
                           student.generate(ids, max_new_tokens=4, do_sample=False))


def test_the_default_teacher_after_pruning_is_the_model_before_it(tmp_path, optitool_text_folder):
    """Distilling a pruned model from itself teaches nothing: the default teacher is the model that entered
    the chain's first compression pass, also when another pass ran in between."""
    from optitool.testing import tiny_causal_lm_dir

    folder = tiny_causal_lm_dir(tmp_path / "lm", family="llama", train_steps=20)
    snippet = (f'seed = 1\n[model]\nsource = "hf"\npath = "{folder}"\nmax_length = 16\n'
               f'[benchmark]\nsequence_lengths = [16]\n[data]\nsource = "folder"\npath = "{optitool_text_folder}"\n'
               'label_field = ""\nsplits = { train = 0.6, eval = 0.4 }\n'
               '[[passes]]\npass = "distill"\nname = "tune"\nmax_steps = 1\nbatch_size = 4\n'
               '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\n'
               '[[passes]]\npass = "magnitude_prune"\nname = "more"\nsparsity = 0.6\n'
               '[[passes]]\npass = "distill"\nname = "recover"\nmax_steps = 1\nbatch_size = 4\n')
    stages = {s["name"]: s["metrics"] for s in run_snippet(snippet, tmp_path).report["stages"]}
    assert stages["tune"]["teacher"] == "baseline" and stages["recover"]["teacher"] == "tune"


def test_distill_on_two_processes_under_torchrun_trains_like_one(tmp_path, optitool_text_folder):
    """processes = 2: `optitool run` starts itself under torchrun, each rank trains on its half of every batch
    (gloo), gradients are averaged, rank 0 writes the run: the same losses and model as one process."""
    from click.testing import CliRunner

    from optitool.cli import cli
    from optitool.testing import tiny_causal_lm_dir

    folder = tiny_causal_lm_dir(tmp_path / "lm", family="llama", train_steps=20)
    snippet = (f'seed = 1\n[model]\nsource = "hf"\npath = "{folder}"\nmax_length = 16\n[benchmark]\nenabled = false\n'
               f'[data]\nsource = "folder"\npath = "{optitool_text_folder}"\nlabel_field = ""\n'
               'splits = { train = 0.6, eval = 0.4 }\n[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\n'
               '[[passes]]\npass = "distill"\nmax_steps = 2\nbatch_size = 8\nlr = 0.01\nwarmup_ratio = 0.0\n'
               'keep_best = false\nprocesses = {n}\n')
    metrics = {}
    for n in (1, 2):
        (tmp_path / f"p{n}.toml").write_text(snippet.replace("{n}", str(n)))
        result = CliRunner().invoke(cli, ["run", str(tmp_path / f"p{n}.toml"), "-o", str(tmp_path / f"r{n}"),
                                          "--quiet"])
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / f"r{n}" / "report.json").read_text())
        metrics[n] = report["stages"][-1]["metrics"]
    assert metrics[2]["distill_processes"] == 2 and metrics[2]["distill_backend"] == "gloo"
    assert "distill_processes" not in metrics[1]
    assert metrics[2]["distill_steps"] == metrics[1]["distill_steps"] == 2
    assert metrics[2]["distill_loss_first"] == pytest.approx(metrics[1]["distill_loss_first"], rel=1e-4)
    assert metrics[2]["distill_loss_last"] == pytest.approx(metrics[1]["distill_loss_last"], rel=1e-3)
    assert metrics[2]["perplexity"] == pytest.approx(metrics[1]["perplexity"], rel=1e-3)
    assert metrics[2]["mask_violations"] == 0


@pytest.mark.slow
def test_sigterm_stops_every_torchrun_rank_and_the_run_is_not_reported_finished(tmp_path, optitool_text_folder):
    """Reported: SIGTERM to `optitool run` with processes = 2 printed "terminated" and exited 143, then the ranks
    went on, finished the stage and wrote report.json with status finished."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from optitool.testing import tiny_causal_lm_dir

    folder = tiny_causal_lm_dir(tmp_path / "lm", family="llama", train_steps=5)
    (tmp_path / "p.toml").write_text(
        f'[model]\nsource = "hf"\npath = "{folder}"\nmax_length = 16\n[benchmark]\nenabled = false\n'
        f'[data]\nsource = "folder"\npath = "{optitool_text_folder}"\nlabel_field = ""\n'
        'splits = { train = 0.6, eval = 0.4 }\n[[passes]]\npass = "distill"\nepochs = 100000\nbatch_size = 4\n'
        'keep_best = false\nprocesses = 2\n')
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "optitool.cli", "run", str(tmp_path / "p.toml"), "-o", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(run.glob(".01-distill.*.partial")):
        time.sleep(0.2)  # rank 0 has started the distill stage
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "optitool.cli" in " ".join(p.cmdline())]
    assert len(ranks) >= 2, "two ranks are training"
    family = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)  # to optitool alone, as `timeout` and a CI cancel do
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "terminated" in err and "Traceback" not in err
    gone, alive = psutil.wait_procs(family, timeout=5)
    assert not alive, f"left running after optitool exited: {[p.pid for p in alive]}"
    time.sleep(1)
    report = json.loads((run / "report.json").read_text()) if (run / "report.json").exists() else {}
    assert report.get("status") != "finished" and not (run / "01-distill").exists()
