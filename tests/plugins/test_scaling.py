"""Activation-aware channel scales (awq = true on gptq and imatrix): folded exactly in float, refused by name where
a family cannot fold them, and, searched on the calibration inputs, lowering the error those inputs see."""

from __future__ import annotations

import copy

import pytest


def _tiny(tmp_path, family):
    import transformers

    from optitool.testing import tiny_causal_lm_dir

    folder = tiny_causal_lm_dir(tmp_path / f"lm-{family}", family=family, train_steps=60, hidden=64)
    return folder, transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def _groups(module):
    from optitool_quantize.scaling import scale_groups

    from optitool.architectures import find_architecture

    layout = find_architecture(module)
    for index, block in enumerate(layout.blocks):
        yield block, f"{layout.blocks_path}.{index}.", scale_groups(block, f"{layout.blocks_path}.{index}.",
                                                                     layout.architecture, layout.head_dim())


def _producer_width(group):
    from optitool import is_conv1d

    if group.rows is not None:
        return group.rows.stop - group.rows.start
    weight = group.producer.weight
    return weight.shape[1] if is_conv1d(group.producer) else weight.shape[0]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_folded_scales_leave_the_float_model_computing_what_it_did(tmp_path, family):
    """Random scales in every foldable group (norm weights and biases, a fused projection's value third, grouped
    value heads feeding two query heads each): the same logits, though every projection changed."""
    import torch
    from optitool_quantize.scaling import fold

    _, model = _tiny(tmp_path, family)
    original = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    repeats = set()
    for block, prefix, (groups, _) in _groups(model):
        for group in groups:
            scales = torch.rand(_producer_width(group), generator=generator) * 4 + 0.25
            fold(group, scales, {n: block.get_submodule(n[len(prefix):]) for n in group.readers})
            repeats.add(group.repeat)
    assert repeats == ({1, 2} if family == "llama" else {1})  # Llama's 4 query heads read 2 value heads
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=generator)
    with torch.no_grad():
        expected, got = original(ids).logits, model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, original.get_parameter(n))]
    assert any("proj" in n or "c_" in n for n in changed) and any("ln" in n or "norm" in n for n in changed)


def test_the_pairs_a_family_cannot_fold_are_refused_by_name(tmp_path):
    """GPT-2's GELU between c_fc and c_proj; BERT's post-norm attention and MLP inputs (and its GELU): named, not
    scaled. What both can fold (value -> attention output) is kept."""
    import transformers

    from optitool.testing import tiny_bert_dir

    _, gpt2 = _tiny(tmp_path, "gpt2")
    (_, _, (groups, refused)), *_ = _groups(gpt2)
    assert [g.name for g in groups] == ["ln_1 -> attn.c_attn", "ln_2 -> mlp.c_fc", "attn.c_attn -> attn.c_proj"]
    assert list(refused) == ["MLP input -> MLP output"] and "mlp.c_fc" in refused["MLP input -> MLP output"]

    bert = transformers.AutoModel.from_pretrained(tiny_bert_dir(tmp_path / "bert"))
    (_, _, (groups, refused)), *_ = _groups(bert)
    assert [g.name for g in groups] == ["attention.self.value -> attention.output.dense"]
    assert sorted(refused) == ["MLP input -> MLP output", "norm -> MLP inputs", "norm -> attention inputs"]
    assert "post-norm" in refused["norm -> attention inputs"]


@pytest.mark.parametrize(("family", "method"), [("llama", "gptq"), ("llama", "imatrix"), ("gpt2", "imatrix")])
def test_scaled_rounding_beats_round_to_nearest_on_the_error_the_data_sees(tmp_path, family, method):
    """On the first block (the same calibration inputs before and after), each layer's rounded weight, divided by
    the scales its producer's weight was divided by (read back from the norms here), against the original:
    trace(E H E^T) below round to nearest's, with H computed in the test."""
    import torch
    from optitool_quantize.data_aware import Gptq, Imatrix
    from optitool_quantize.grids import round_to_grid, weighted_error

    from optitool import TorchModel, is_conv1d
    from optitool.calibration import calibration_batches, observe_inputs
    from tests.plugins.test_data_aware import _context

    folder, model = _tiny(tmp_path, family)
    original = copy.deepcopy(model)
    ctx = _context(tmp_path, folder)
    kind = Gptq if method == "gptq" else Imatrix
    kind(kind.Config(block_size=16, calibration_samples=8, awq=True)).run(TorchModel(model), ctx)
    assert ctx.metrics["awq_groups"] == (8 if family == "llama" else 6)
    assert ("MLP input -> MLP output" in ctx.metrics["awq_refused"]) == (family == "gpt2")

    (_, prefix, (groups, _)), *_ = _groups(original)
    norms = [g for g in groups if g.producer.weight.dim() == 1]  # norm -> readers: scales read off the norm
    # a reader that also produces another group's input had those output rows divided too: compared without them
    divided_rows = {id(g.producer): g.rows or slice(0, None) for g in groups if g.producer.weight.dim() != 1}
    sums, counts = {}, {}

    def gram(name, x):
        sums[name] = sums.get(name, 0) + x.double().T @ x.double()
        counts[name] = counts.get(name, 0) + x.shape[0]

    readers = {n: original.get_submodule(n) for g in norms for n in g.readers}
    observe_inputs(original, readers, calibration_batches(TorchModel(original), ctx, 8, why="test"), gram)
    norm_names = {id(m): n for n, m in original.named_modules()}
    checked, scaled = 0, 0
    for group in norms:
        norm = norm_names[id(group.producer)]
        scales = (original.get_submodule(norm).weight / model.get_submodule(norm).weight).detach()
        scaled += not torch.allclose(scales, torch.ones_like(scales))  # alpha = 0 may win for a group
        for name in group.readers:
            def out_in(m):
                return m.weight.detach().t() if is_conv1d(m) else m.weight.detach()
            before, after = out_in(original.get_submodule(name)), out_in(model.get_submodule(name))
            kept = divided_rows.get(id(original.get_submodule(name)), slice(before.shape[0], None)).start
            if kept == 0:
                continue
            before, after = before[:kept], after[:kept]
            h = (sums[name] / counts[name]).float()
            nearest, _, _ = round_to_grid(before, 4, 16, False)
            ours, plain = weighted_error(before, after / scales, h), weighted_error(before, nearest, h)
            assert ours < plain, name
            if kept == out_in(original.get_submodule(name)).shape[0]:  # the stage reports the same comparison
                assert ctx.metrics["layer_error_vs_nearest"][name] == pytest.approx(ours / plain, rel=2e-3), name
            checked += 1
    assert scaled and checked == (3 if family == "llama" else 2)  # q, k, gate; GPT-2's c_attn (its query and key rows), c_fc
    assert all(v < 1 for v in ctx.metrics["layer_error_vs_nearest"].values())


def test_awq_on_a_model_without_a_known_layout_is_a_pass_error_naming_the_setting():
    """A model optitool finds no blocks in (the pass's run then calibrates every layer at once) has no norms by
    role to fold into: the run stops with a PassError (exit 1, one paragraph) rather than skipping the setting."""
    from optitool_quantize.data_aware import Gptq, _Scaling

    from optitool import PassError

    with pytest.raises(PassError, match="gptq: awq = true needs a transformer layout"):
        _Scaling(Gptq(Gptq.Config(awq=True)), None)


def test_scale_search_tries_no_scaling_and_keeps_the_least_error():
    """A seeded layer whose inputs have one loud channel per block: the chosen alpha is above 0, its error below
    the unscaled one, and both are what scoring that alpha directly gives."""
    import torch
    from optitool_quantize.grids import round_to_grid
    from optitool_quantize.scaling import ScaleGroup, _rounding_error, search_scales

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 64, generator=generator)
    x = torch.randn(512, 64, generator=generator)
    x[:, ::16] *= 20  # a loud channel in every block of 16
    hessian = x.T @ x / x.shape[0]

    def nearest(w, gram):
        return round_to_grid(w, 4, 16, False)[0]

    group = ScaleGroup("norm -> layer", ["layer"], producer=None)
    alpha, scales, error, plain = search_scales(group, {"layer": weight}, {"layer": hessian}, {"layer": nearest})
    assert alpha > 0 and error < plain
    assert error == pytest.approx(_rounding_error(weight, hessian, scales, nearest))
    assert plain == pytest.approx(_rounding_error(weight, hessian, torch.ones(64), nearest))
