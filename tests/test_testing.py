"""optitool.testing: the contract check must be able to fail, for the reasons it names."""

from __future__ import annotations

import pytest
from optitool_distill.distill import Distill

import optitool
from optitool.testing import check_pass_contract


class AlwaysRaises(optitool.Pass):
    name = "acme.raises"
    takes = "torch"
    gives = "torch"

    def run(self, model, ctx):
        raise optitool.PassError("this pass refuses everything")


class ReturnsNone(Distill):
    name = "acme.distill_none"

    def run(self, model, ctx):
        super().run(model, ctx)
        return None


class ForgetsItsKind(optitool.Pass):
    name = "acme.forgets"
    takes = ("torch", "onnx")
    gives = "same"

    def run(self, model, ctx):
        from optitool.testing import tiny_mlp

        return optitool.TorchModel(tiny_mlp())  # an ONNX model in, a torch model out


def test_a_pass_whose_run_always_raises_breaks_the_contract(tmp_path):
    with pytest.raises(AssertionError, match="raised PassError: this pass refuses everything"):
        check_pass_contract(AlwaysRaises, tmp_path=tmp_path)


def test_distill_returning_none_breaks_the_contract(tmp_path):
    with pytest.raises(AssertionError, match="returned None, not a torch model artifact"):
        check_pass_contract(ReturnsNone, settings={"max_steps": 1}, tmp_path=tmp_path)


def test_every_kind_a_pass_takes_is_checked(tmp_path):
    with pytest.raises(AssertionError, match="on a onnx model returned"):
        check_pass_contract(ForgetsItsKind, tmp_path=tmp_path)


def test_the_builtins_keep_the_contract_with_the_data_it_gives(tmp_path):
    check_pass_contract(Distill, settings={"alpha": 0, "max_steps": 2}, tmp_path=tmp_path)  # needs labels


def test_a_text_model_gets_labelled_text_with_every_split(tmp_path, optitool_tiny_bert):
    from optitool.models.loaders import LOADERS
    from optitool.spec import ModelSpec

    spec = ModelSpec(source="hf", path=str(optitool_tiny_bert), task="text-classification", num_labels=4,
                     max_length=16)
    bert = LOADERS["hf"].load(spec, tmp_path)
    check_pass_contract(Distill, settings={"alpha": 0, "max_steps": 2, "batch_size": 8}, model=bert,
                        tmp_path=tmp_path)


def test_the_tiny_gguf_files_tokenizer_encodes_any_text_within_its_embedding_table(tmp_path):
    import transformers

    from optitool.testing import tiny_gguf_file

    path = tiny_gguf_file(tmp_path / "tiny.gguf", train_steps=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name)
    rows = model.get_input_embeddings().weight.shape[0]
    assert len(tokenizer) == rows
    for text in ("the market rose sharply today", "Ünïcödé 42 and the film won"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids and max(ids) < rows and tokenizer.decode(ids) == text
    words = tokenizer(" the market shares rose", add_special_tokens=False)["input_ids"]
    assert len(words) == 4  # one token per word the model was trained on, as with its own tokenizer
