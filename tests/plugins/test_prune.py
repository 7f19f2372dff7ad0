from __future__ import annotations

import re

import pytest
import torch
from optitool_prune.magnitude import MagnitudePrune

from optitool.testing import check_pass_contract, run_snippet

MLP = """
[model]
source = "python"
factory = "optitool.testing:tiny_mlp"
kwargs = { hidden = 64 }
[model.inputs]
x = ["batch", 16]
"""



@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_reaches_the_target_exactly(tmp_path, scope):
    result = run_snippet(MLP + f'[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\nscope = "{scope}"\n', tmp_path)
    metrics = result.report["stages"][1]["metrics"]
    assert metrics["covered_sparsity"] == pytest.approx(0.5, abs=1e-9)
    per_layer = metrics["sparsity_per_layer"]
    assert set(per_layer) == {"0.weight", "2.weight", "4.weight"}
    if scope == "layer":
        module = result.stages[1].artifact.module
        for index in (0, 2, 4):
            assert float((module[index].weight == 0).float().mean()) == pytest.approx(0.5, abs=1 / module[index].weight.numel())


def test_two_four_pattern_holds_in_every_group(tmp_path):
    result = run_snippet(MLP + '[[passes]]\npass = "magnitude_prune"\npattern = "2:4"\n', tmp_path)
    module = result.stages[1].artifact.module
    for index in (0, 2, 4):
        groups = module[index].weight.detach().reshape(-1, 4)
        assert ((groups != 0).sum(1) <= 2).all() and ((groups == 0).sum(1) >= 2).all()
    assert "sparse" in result.report["stages"][1]["metrics"]["runtime_note"]


def test_masks_are_recorded_and_exclude_patterns_work(tmp_path):
    snippet = MLP + '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\nexclude = ["4"]\n'
    result = run_snippet(snippet, tmp_path)
    artifact = result.stages[1].artifact
    assert set(artifact.masks) == {"0.weight", "2.weight"}
    assert float((artifact.module[4].weight == 0).float().mean()) == 0.0


def test_structured_removes_units_and_the_stage_reloads(tmp_path):
    result = run_snippet(MLP + '[[passes]]\npass = "structured_prune"\nsparsity = 0.5\n'
                               'scope = "layer"\n', tmp_path)
    module = result.stages[1].artifact.module
    assert module[0].out_features == 32 and module[2].in_features == 32 and module[4].in_features == 32
    metrics = result.report["stages"][1]["metrics"]
    assert metrics["parameters"] < result.report["stages"][0]["metrics"]["parameters"]
    from optitool.models.loaders import LOADERS, load_stage

    reloaded = load_stage(result.run_dir / "01-structured_prune", LOADERS).module
    x = torch.randn(3, 16)
    assert torch.allclose(reloaded(x), module(x), atol=1e-6)


@pytest.mark.parametrize("target", ["heads", "ffn+heads"])
def test_heads_asked_of_a_model_without_attention_are_refused_not_something_else_pruned(tmp_path, target):
    from optitool.errors import RunError

    with pytest.raises(RunError, match=re.escape(f"target = '{target}' prunes attention heads, and this model has none")):
        run_snippet(MLP + f'[[passes]]\npass = "structured_prune"\nsparsity = 0.5\ntarget = "{target}"\n', tmp_path)


def test_structured_heads_and_ffn_on_a_tiny_bert(tmp_path, optitool_tiny_bert, optitool_text_folder):
    snippet = f"""
[model]
source = "hf"
path = "{optitool_tiny_bert}"
max_length = 16
[data]
source = "folder"
path = "{optitool_text_folder}"
[[passes]]
pass = "structured_prune"
target = "ffn+heads"
sparsity = 0.5
scope = "layer"
[[passes]]
pass = "onnx_export"
"""
    result = run_snippet(snippet, tmp_path)
    metrics = result.report["stages"][1]["metrics"]
    assert metrics["heads_kept"] == [2, 2] and metrics["mlp_channels_kept"] == [32, 32] and metrics["family"] == "bert"
    assert result.report["stages"][2]["metrics"]["export_max_abs_diff"] < 1e-3
    from optitool.models.loaders import LOADERS, load_stage

    reloaded = load_stage(result.run_dir / "01-structured_prune", LOADERS)
    assert reloaded.module.encoder.layer[0].attention.self.num_attention_heads == 2


def test_nm_on_incompatible_width_is_a_clear_error(tmp_path):
    from optitool.errors import RunError

    snippet = MLP.replace("hidden = 64", "hidden = 30") + '[[passes]]\npass = "magnitude_prune"\npattern = "2:4"\n'
    with pytest.raises(RunError, match="not a multiple of 4"):
        run_snippet(snippet, tmp_path)


@pytest.mark.parametrize("settings", [{"sparsity": 0.5}, {"pattern": "2:4"},
                                      {"pattern": "structured", "sparsity": 0.25}])
def test_contract(settings, tmp_path):
    check_pass_contract(MagnitudePrune, settings=settings, tmp_path=tmp_path)


def test_structured_contract(tmp_path):
    from optitool_prune.structured_passes import StructuredPrune

    check_pass_contract(StructuredPrune, settings={"sparsity": 0.25}, tmp_path=tmp_path)


@pytest.mark.parametrize(("settings", "message"), [
    ('sparsity = 0.5\ntarget = "heads"', "target has no effect with pattern = 'unstructured'"),
    ('sparsity = 0.5\ncalibration_samples = 8', "calibration_samples has no effect with criterion = 'magnitude'"),
    ('sparsity = 0.5\nfrequency = 5', "frequency has no effect with schedule = 'oneshot'"),
    ('pattern = "2:4"\nscope = "layer"', "scope has no effect with pattern = '2:4'"),
    ('pattern = "structured"\nsparsity = 0.5\nexclude = ["x"]', "exclude has no effect with pattern = 'structured'"),
    ('pattern = "structured"\ntarget = "layers"\nsparsity = 0.5\ncriterion = "wanda"',
     "criterion has no effect with target = 'layers'"),
])
def test_a_setting_without_effect_in_its_mode_is_refused_by_validate(tmp_path, settings, message):
    """A typo or a misunderstanding must never silently do nothing: four to six of magnitude_prune's ten
    settings apply in any one mode, and the others used to be ignored."""
    from click.testing import CliRunner

    from optitool.cli import cli

    (tmp_path / "p.toml").write_text(MLP + f'[[passes]]\npass = "magnitude_prune"\n{settings}\n')
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "p.toml")])
    assert result.exit_code == 2 and message in result.output, result.output


def test_pattern_structured_still_runs_for_a_release_and_says_what_to_write(tmp_path):
    result = run_snippet(MLP + '[[passes]]\npass = "magnitude_prune"\npattern = "structured"\nsparsity = 0.5\n'
                               'scope = "layer"\n', tmp_path)
    stage = result.report["stages"][1]
    assert stage["metrics"]["parameters_removed"] > 0
    assert any('write pass = "structured_prune", sparsity = 0.5, target = "ffn", scope = "layer"' in f
               for f in stage["flags"]), stage["flags"]


def test_wanda_keeps_small_weights_on_a_loud_input_channel_that_magnitude_prunes():
    """|W| x ||x||: a weight of 0.1 on a channel whose inputs are 100x larger outweighs one of 1.0."""
    from optitool_prune.wanda import input_norms, row_mask, scores

    layer = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, 1.0, 0.9, 0.8]]))
    x = torch.ones(8, 4)
    x[:, 0] = 100.0
    norms = input_norms(layer, {"weight": layer}, [{"x": x}])
    wanda = row_mask(scores(layer.weight, norms["weight"], transposed=False), 0.5)
    assert wanda.tolist() == [[True, True, False, False]]  # magnitude would drop the 0.1 first


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_pattern_reaches_its_sparsity_on_every_projection_of_a_causal_lm(
        tmp_path, optitool_tiny_causal_lm, optitool_text_folder, pattern, criterion):
    settings = 'sparsity = 0.5\nscope = "layer"\n' if pattern == "unstructured" else ""
    snippet = (f'[model]\nsource = "hf"\npath = "{optitool_tiny_causal_lm}"\nmax_length = 16\n'
               f'[benchmark]\nenabled = false\n[data]\nsource = "folder"\npath = "{optitool_text_folder}"\n'
               'label_field = ""\nsplits = { calibration = 0.3, eval = 0.3 }\n'
               f'[[passes]]\npass = "magnitude_prune"\ncriterion = "{criterion}"\npattern = "{pattern}"\n{settings}')
    base, pruned = (s["metrics"] for s in run_snippet(snippet, tmp_path).report["stages"])
    assert pruned["criterion"] == criterion
    assert (pruned.get("calibration_batches", 0) >= 1) == (criterion == "wanda")
    per_block = 4 if "gpt2" in optitool_tiny_causal_lm.name else 7  # GPT-2's Conv1D: c_attn, c_proj, c_fc, c_proj
    assert set(pruned["sparsity_per_layer"].values()) == {0.5} and len(pruned["sparsity_per_layer"]) == 2 * per_block
    assert not any("lm_head" in name or "wte" in name or "embed" in name for name in pruned["sparsity_per_layer"])
    assert pruned["perplexity"] != base["perplexity"]


def test_wanda_without_a_calibration_split_is_refused_before_loading(tmp_path):
    from click.testing import CliRunner

    from optitool.cli import cli

    (tmp_path / "p.toml").write_text(MLP + '[[passes]]\npass = "magnitude_prune"\ncriterion = "wanda"\nsparsity = 0.5\n')
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "p.toml")])
    assert result.exit_code == 2 and "calibration" in result.output, result.output


def _decoder_snippet(folder, texts, passes: str) -> str:
    return (f'seed = 1\n[model]\nsource = "hf"\npath = "{folder}"\nmax_length = 16\n'
            f'[benchmark]\nsequence_lengths = [16]\n[data]\nsource = "folder"\npath = "{texts}"\n'
            f'label_field = ""\nsplits = {{ calibration = 0.3, eval = 0.3 }}\n{passes}')


def _columns_kept(original, pruned):
    """Indices of the original's input columns that the pruned [out, in] weight kept (they are copies)."""
    return [next(j for j in range(original.shape[1]) if torch.equal(original[:, j], pruned[:, i]))
            for i in range(pruned.shape[1])]


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_structured_decoder_pruning_equals_the_original_with_those_parts_zeroed(
        tmp_path, optitool_tiny_causal_lm, optitool_text_folder, criterion):
    """MLP channels and attention heads (a key/value group with its query heads on Llama) leave the model;
    the pruned model computes what the original computes with those channels' and heads' output columns
    zeroed, keeps a config that describes it, reloads from its stage folder and exports with its KV cache
    (the export verifies 32 greedy steps against torch)."""
    import transformers
    from optitool_prune.structured import out_in

    from optitool import is_conv1d
    from optitool.architectures import find_architecture
    from optitool.models.loaders import LOADERS, load_stage

    passes = ('[[passes]]\npass = "structured_prune"\ntarget = "ffn+heads"\nsparsity = 0.5\n'
              f'scope = "layer"\ncriterion = "{criterion}"\n[[passes]]\npass = "onnx_export"\n')
    snippet = _decoder_snippet(optitool_tiny_causal_lm, optitool_text_folder, passes)
    result = run_snippet(snippet, tmp_path)
    metrics = result.report["stages"][1]["metrics"]
    llama = metrics["family"] == "llama"
    assert metrics["heads_kept"] == [2, 2] and metrics["mlp_channels_kept"] == ([32, 32] if llama else [64, 64])
    assert metrics["parameters_removed"] > 0
    export = result.report["stages"][2]["metrics"]
    assert export["export_greedy_steps_identical"] == 32

    pruned = result.stages[1].artifact.module
    original = transformers.AutoModelForCausalLM.from_pretrained(optitool_tiny_causal_lm).eval()
    layout, pruned_layout = find_architecture(original), find_architecture(pruned)
    arch = layout.architecture
    with torch.no_grad():
        for block, small in zip(layout.blocks, pruned_layout.blocks, strict=True):
            for path in (arch.mlp_out, arch.attention_out):
                full, kept = out_in(block.get_submodule(path)), out_in(small.get_submodule(path))
                dropped = sorted(set(range(full.shape[1])) - set(_columns_kept(full, kept)))
                layer = block.get_submodule(path)
                if is_conv1d(layer):  # weight [in, out]
                    layer.weight[dropped] = 0
                else:
                    layer.weight[:, dropped] = 0
    ids = torch.randint(4, 30, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(pruned(input_ids=ids).logits, original(input_ids=ids).logits, atol=1e-5)
    reloaded = load_stage(result.run_dir / "01-structured_prune", LOADERS).module
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, pruned(input_ids=ids).logits, atol=1e-6)
    if llama:  # the config alone rebuilds the pruned architecture
        config = pruned.config
        assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (2, 1, 32)
        rebuilt = transformers.AutoModelForCausalLM.from_config(config)
        rebuilt.load_state_dict(pruned.state_dict())


def test_depth_pruning_drops_the_block_that_changes_the_hidden_state_least(
        tmp_path, optitool_tiny_causal_lm, optitool_text_folder):
    from optitool.models.loaders import LOADERS, load_stage

    passes = '[[passes]]\npass = "depth_prune"\nsparsity = 0.5\n'
    snippet = _decoder_snippet(optitool_tiny_causal_lm, optitool_text_folder, passes)
    result = run_snippet(snippet, tmp_path)
    base, pruned = (s["metrics"] for s in result.report["stages"])
    importance = pruned["block_importance"]
    assert pruned["blocks_kept"] == [importance.index(max(importance))]
    assert "generation_agreement" in pruned and pruned["perplexity"] > base["perplexity"]
    module = result.stages[1].artifact.module
    assert len(find_blocks(module)) == 1 and next(iter(pruned["config_changed"].values())) == 1
    reloaded = load_stage(result.run_dir / "01-depth_prune", LOADERS).module
    ids = torch.randint(4, 30, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded.generate(ids, max_new_tokens=4, do_sample=False),
                           module.generate(ids, max_new_tokens=4, do_sample=False))


def find_blocks(module):
    from optitool.architectures import find_architecture

    return find_architecture(module).blocks


def test_depth_pruning_without_calibration_data_is_refused_before_loading(tmp_path):
    from click.testing import CliRunner

    from optitool.cli import cli

    (tmp_path / "p.toml").write_text(MLP + '[[passes]]\npass = "depth_prune"\nsparsity = 0.5\n')
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "p.toml")])
    assert result.exit_code == 2 and "calibration" in result.output, result.output


def test_an_unknown_architecture_is_told_what_the_closest_family_lacks():
    from optitool.architectures import find_architecture
    from optitool.errors import PassError

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = torch.nn.Module()
            self.self_attn.q_proj = torch.nn.Linear(4, 4)
            self.mlp = torch.nn.Linear(4, 4)

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([Block()])

    with pytest.raises(PassError, match=r"closest, llama, lacks .*key 'model.layers.0.self_attn.k_proj'.*"
                                        r"optitool_register_architectures"):
        find_architecture(Odd())
