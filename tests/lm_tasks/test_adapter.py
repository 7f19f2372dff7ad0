"""The adapter's answers against a direct torch computation and against lm-eval's own HF backend."""

from __future__ import annotations

import math

import pytest
import torch

from optitool.lm_tasks.adapter import TokenScorer
from optitool.lm_tasks.backends import TorchReader
from tests.lm_tasks.conftest import load

PAIRS = [("the market shares rose as the", " bank"),
         ("the film won an", " award and the team won"),  # several tokens: the cache goes on from the context
         ("the film won an", " award and the"),  # the same context again: read once, its cache forked
         ("the film won an", " award"),
         ("the minister said the ", "election"),  # a trailing space moves to the continuation
         ("", "the bank said profits grew")]  # no context: the prefix token
# Its whole text is what an earlier pair reads: the rows are shared. lm-eval 0.4.13's HF backend, batched,
# scores this one at the wrong position (-3.33 where a forward pass of the text and HFLM on it alone give -1.47),
# so it is checked against the direct computation only.
SHARED = ("the film won an award and", " the")


def direct(model, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    rows = log_probs[len(context_ids) - 1:-1]
    target = torch.tensor(continuation_ids)
    total = float(rows.gather(1, target[:, None]).sum())
    return total, bool((rows.argmax(-1) == target).all())


def test_log_likelihoods_equal_a_direct_torch_computation(bpe_causal_lm):
    model, tokenizer = load(bpe_causal_lm)
    scorer = TokenScorer(TorchReader(model, "cpu"), tokenizer, max_length=64)
    pairs = [*PAIRS[:4], SHARED, *PAIRS[4:]]
    got = scorer.loglikelihood(pairs)
    for (context, continuation), (total, greedy) in zip(pairs, got, strict=True):
        head, tail = scorer.encode_pair(context, continuation)
        if context:
            assert head + tail == tokenizer.encode(context + continuation)
        expected, expected_greedy = direct(model, head, tail)
        assert len(tail) >= 1 and total == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy
    assert scorer.encode_pair("", "the bank")[0] == [tokenizer.bos_token_id]


def test_a_context_longer_than_the_window_is_cut_from_the_left(bpe_causal_lm):
    model, tokenizer = load(bpe_causal_lm)
    context = " ".join(["the market shares rose as the bank said"] * 6)
    scorer = TokenScorer(TorchReader(model, "cpu"), tokenizer, max_length=12)
    (total, _), = scorer.loglikelihood([(context, " profits grew")])
    head, tail = scorer.encode_pair(context, " profits grew")
    kept = (head + tail)[-13:]
    expected, _ = direct(model, kept[:-len(tail)], tail)
    assert total == pytest.approx(expected, abs=1e-4)


def test_the_same_scores_as_lm_evals_own_hf_backend(bpe_causal_lm):
    """loglikelihood, loglikelihood_rolling (a text over several windows) and generate_until, against lm-eval's
    HFLM on the same model and tokenizer."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = load(bpe_causal_lm)
    theirs = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, max_length=16, device="cpu")
    ours = TokenScorer(TorchReader(model, "cpu"), tokenizer, max_length=16)

    def requests(kind, args):
        return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]

    expected = theirs.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (a, greedy_a), (b, greedy_b) in zip(expected, ours.loglikelihood(PAIRS), strict=True):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
    text = " ".join(["the film won an award and the team won the match"] * 4)  # about 44 tokens: 3 windows
    rolling = theirs.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    assert ours.loglikelihood_rolling([text])[0] == pytest.approx(rolling[0], abs=1e-3)
    asks = [("the market shares rose as", {"until": ["award"], "max_gen_toks": 6, "do_sample": False}),
            ("the film won", {"until": ["\n"], "max_gen_toks": 5})]
    assert ours.generate_until(asks) == theirs.generate_until(requests("generate_until", asks), disable_tqdm=True)


def test_an_onnx_stage_scores_what_its_torch_parent_scores(bpe_causal_lm, tmp_path):
    """The exported graph with its KV cache (prefill, then the continuation from the cache) and without one."""
    from optitool.lm_tasks.backends import OnnxFullReader, reader_for
    from optitool.testing import run_snippet

    toml = (f'[model]\nsource = "hf"\npath = "{bpe_causal_lm}"\nmax_length = 32\n[benchmark]\nenabled = false\n'
            '[[passes]]\npass = "onnx_export"\n')
    stages = {s.name: s.artifact for s in run_snippet(toml, tmp_path).stages}
    _, tokenizer = load(bpe_causal_lm)
    torch_scores = TokenScorer(reader_for(stages["baseline"], "cpu"), tokenizer, 64).loglikelihood(PAIRS)
    cached = reader_for(stages["onnx_export"], "cpu")
    assert type(cached).__name__ == "OnnxCacheReader"
    for reader in (cached, OnnxFullReader(stages["onnx_export"])):
        onnx_scores = TokenScorer(reader, tokenizer, 64).loglikelihood(PAIRS)
        for (a, greedy_a), (b, greedy_b) in zip(torch_scores, onnx_scores, strict=True):
            assert math.isclose(a, b, abs_tol=1e-3) and greedy_a == greedy_b
