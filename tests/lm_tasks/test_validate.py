"""Bad [evaluation] inputs: exit 2 from `optitool validate`, naming the setting, before any model loads."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from optitool.cli import cli
from optitool.testing import tiny_bert_dir, tiny_task_file


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    from optitool.testing import tiny_causal_lm_dir

    return tiny_causal_lm_dir(tmp_path_factory.mktemp("lm") / "lm", family="llama", train_steps=0)


def validate(write, text: str):
    path = write("pipeline.toml", text)
    result = CliRunner().invoke(cli, ["validate", str(path)])
    return result.exit_code, result.output


def pipeline(model, evaluation: str, budget: str = "") -> str:
    return (f'[model]\nsource = "hf"\npath = "{model}"\nmax_length = 32\n[benchmark]\nenabled = false\n'
            '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\n' + evaluation + budget)


def test_shipped_tasks_and_task_files_validate(write, lm_folder, tmp_path):
    tiny_task_file(tmp_path / "tasks")
    code, out = validate(write, pipeline(lm_folder, '[evaluation]\ntasks = ["bbc_topic", "tasks/tiny_multiple_choice.yaml"]\n',
                                         '[budget]\nmax_task_drop = { bbc_topic = 0.02 }\n'
                                         'no_significant_task_drop = ["tiny_multiple_choice"]\n'))
    assert code == 0, out


@pytest.mark.parametrize(("evaluation", "budget", "says"), [
    ('tasks = ["tasks/missing.yaml"]', "", "does not exist"),
    ('tasks = ["tasks/broken.yaml"]', "", "could not be read as an lm-eval task"),
    ('tasks = ["tasks/no_name.yaml"]', "", "names no task"),
    ('tasks = ["tasks/bad_template.yaml"]', "", "doc_to_text template that does not compile"),
    ('tasks = ["tasks/no_data.yaml"]', "", "reads test data from 'absent.jsonl'"),
    ('tasks = ["bbc_topic"]\nstages = ["baseline", "pruned"]', "", "[evaluation].stages names 'pruned'"),
    ('tasks = ["bbc_topic"]', "max_task_drop = { bbc_cloze = 0.1 }", "limits the task 'bbc_cloze'"),
    ('tasks = ["bbc_topic"]', "max_task_drop = { bbc_topic = -0.1 }", "a drop limit is 0 or more"),
    ('tasks = ["bbc_topic"]\nstages = ["final"]', "no_significant_task_drop = true", "does not score 'baseline'"),
    ('tasks = ["tasks/tiny_generate_until.yaml"]\nmax_length = 65', "", "max_length is 65 tokens"),
    ('tasks = ["tasks/long_generation.yaml"]', "", "generates up to 256 tokens"),
    ('tasks = []', "", "at least 1 item"),
])
def test_bad_evaluation_settings_are_refused(write, lm_folder, tmp_path, evaluation, budget, says):
    tasks = tmp_path / "tasks"
    tiny_task_file(tasks, output_type="generate_until")
    (tasks / "broken.yaml").write_text("task: x\n  bad: [indentation\n")
    (tasks / "no_name.yaml").write_text("dataset_path: json\noutput_type: loglikelihood\n")
    (tasks / "bad_template.yaml").write_text('task: t\noutput_type: loglikelihood\ndoc_to_text: "{{text"\n')
    (tasks / "no_data.yaml").write_text("task: t\noutput_type: loglikelihood\ndataset_path: json\n"
                                        "dataset_kwargs:\n  data_files:\n    test: absent.jsonl\n")
    (tasks / "long_generation.yaml").write_text((tasks / "tiny_generate_until.yaml").read_text()
                                                .replace("max_gen_toks: 1", "max_gen_toks: 256"))
    code, out = validate(write, pipeline(lm_folder, f"[evaluation]\n{evaluation}\n",
                                         f"[budget]\n{budget}\n" if budget else ""))
    assert code == 2, out
    assert says in " ".join(out.split()), out
    assert "Traceback" not in out


def test_an_unknown_task_name_gets_lm_evals_close_names(write, lm_folder):
    code, out = validate(write, pipeline(lm_folder, '[evaluation]\ntasks = ["lambada_openaii"]\n'))
    assert code == 2 and "'lambada_openaii'" in out and "did you mean" in out and "'lambada_openai'" in out, out
    code, out = validate(write, pipeline(lm_folder, '[evaluation]\ntasks = ["bbc_topik"]\n'))
    assert code == 2 and "did you mean 'bbc_topic'" in out, out  # the shipped tasks are among the close names


def test_task_budgets_need_an_evaluation_table(write, lm_folder):
    code, out = validate(write, pipeline(lm_folder, "", "[budget]\nno_significant_task_drop = true\n"))
    assert code == 2 and "no [evaluation] table" in out, out


def test_an_encoder_cannot_be_scored_on_lm_eval_tasks(write, tmp_path):
    bert = tiny_bert_dir(tmp_path / "bert")
    code, out = validate(write, f'[model]\nsource = "hf"\npath = "{bert}"\n[evaluation]\ntasks = ["bbc_cloze"]\n')
    assert code == 2 and "causal language model" in out and "[evaluation]" in out, out


def test_without_lm_eval_validate_says_what_to_install(write, lm_folder, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    code, out = validate(write, pipeline(lm_folder, '[evaluation]\ntasks = ["bbc_topic"]\n'))
    assert code == 2 and 'pip install "optitool[lmeval]"' in out, out
