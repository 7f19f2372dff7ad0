"""Causal language models are judged per token, not as a vector of flattened logits.

A run whose baseline is a causal LM is evaluated on fixed-length blocks of real text (its eval split
tokenized, joined and cut, seeded), and every stage gets, over the real (unpadded) next-token positions:
perplexity (token-weighted), top-1 agreement of its next-token prediction with the baseline's, and the mean
KL divergence from the baseline's next-token distribution. The baseline runs beside each stage batch by
batch, so no full-vocabulary logits are kept for the split: memory does not grow with its size.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from optitool.artifacts import ModelArtifact, OnnxModel, TorchModel

if TYPE_CHECKING:
    from optitool.data.inputs import Batch, InputSource

CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
BLOCK_BATCH = 4
RANDOM_BLOCKS = 8
GENERATION_PROMPTS = 8  # prompts cut from the eval text for greedy-generation agreement
GENERATION_TOKENS = 32  # tokens generated after each


class Decoded(NamedTuple):
    """Greedy continuations [prompts, new_tokens], the seconds to the first token and for the rest."""

    tokens: Any
    first_s: float
    rest_s: float


def is_causal_lm_config(config: Any) -> bool:
    """A Hugging Face config whose architecture predicts the next token."""
    names = list(getattr(config, "architectures", None) or [])
    return any(n.endswith(CAUSAL_LM_SUFFIXES) for n in names)


def is_causal_lm(artifact: ModelArtifact) -> bool:
    """A torch causal LM (by its class), or an ONNX model exported from one (recorded with the stage)."""
    if isinstance(artifact, TorchModel):
        return type(artifact.module).__name__.endswith(CAUSAL_LM_SUFFIXES)
    return isinstance(artifact, OnnxModel) and artifact.task == "text-generation"


def real_token_blocks(inputs: InputSource, split: str, length: int) -> list[Batch]:
    """The split's texts tokenized, joined with the end-of-text token and cut into blocks of `length`
    tokens (the last partial block dropped), in batches of BLOCK_BATCH; empty when the text is shorter than
    one block."""
    ids: list[int] = []
    if inputs.has_split(split):
        tokenizer = inputs.tokenizer
        separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for example in inputs.dataset.split(split):
            ids += tokenizer(example.text or "", add_special_tokens=False)["input_ids"] + separator
    return _batched([ids[i:i + length] for i in range(0, len(ids) - length + 1, length)])


def token_blocks(inputs: InputSource, split: str, length: int, *, seed: int, shapes_only: bool = False) -> list[Batch]:
    """`real_token_blocks` of the split. Seeded random token blocks stand in only where no real text is
    wanted or none was given: with `shapes_only` (timing, checking an export against torch), or when the
    data has no such split at all. A split that has examples whose text cannot fill one block is refused:
    a perplexity scored (or a model trained) on random tokens would pass for one on the user's text."""
    import torch

    from optitool.errors import ConfigError

    blocks = real_token_blocks(inputs, split, length)
    if blocks:
        return blocks
    if inputs.has_split(split) and not shapes_only:
        examples = inputs.dataset.split(split)
        tokens = sum(len(inputs.tokenizer(e.text or "", add_special_tokens=False)["input_ids"]) for e in examples)
        raise ConfigError(f"the {split!r} split holds {len(examples)} example(s) with {tokens} tokens of text in all, "
                          f"less than one block of {length} tokens (the max_length of [data] or [model]), so there "
                          "is nothing to score or train on: give the split more text (files that are not empty), or "
                          "lower max_length")
    generator = torch.Generator().manual_seed(seed)
    vocab = len(inputs.tokenizer)
    return _batched(torch.randint(0, vocab, (RANDOM_BLOCKS, length), generator=generator).tolist())


def _batched(blocks: list[list[int]]) -> list[Batch]:
    import torch

    from optitool.data.inputs import Batch

    out = []
    for start in range(0, len(blocks), BLOCK_BATCH):
        chunk = torch.tensor(blocks[start:start + BLOCK_BATCH], dtype=torch.long)
        out.append(Batch({"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}))
    return out


def _next_token_stats(logits: Any, base_logits: Any | None, batch: Batch) -> dict[str, float]:
    import torch.nn.functional as F

    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    logits = logits[:, :-1].float()
    target, real = ids[:, 1:], mask[:, 1:].bool()
    log_q = F.log_softmax(logits, dim=-1)
    nll = -log_q.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    stats: dict[str, Any] = {"nll": float(nll[real].sum()), "tokens": float(real.sum())}
    if base_logits is not None:
        log_p = F.log_softmax(base_logits[:, :-1].float(), dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        agree = log_p.argmax(-1) == log_q.argmax(-1)
        base_nll = -log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        per_block = ((nll - base_nll) * real).sum(-1) / real.sum(-1).clamp(min=1)
        stats.update(kl=float(kl[real].sum()), agree=float(agree[real].sum()), block_nll_change=per_block.tolist())
    return stats


def lm_metrics(stage: ModelArtifact, baseline: ModelArtifact | None, batches: list[Batch],
               device: str) -> dict[str, float]:
    """Perplexity of `stage`, and (when `baseline` is given) its next-token agreement with and mean KL
    from the baseline, streamed over `batches`."""
    from optitool.execution import Executor

    run = Executor(stage, device if stage.kind == "torch" else "cpu")
    base = Executor(baseline, device if baseline.kind == "torch" else "cpu") if baseline is not None else None
    totals = {"nll": 0.0, "tokens": 0.0, "kl": 0.0, "agree": 0.0}
    changes: list[float] = []  # per block: the stage's mean next-token loss minus the baseline's
    for batch in batches:
        _, logits = run.raw(batch.inputs)
        base_logits = base.raw(batch.inputs)[1] if base is not None else None
        stats = _next_token_stats(logits, base_logits, batch)
        changes += stats.pop("block_nll_change", [])
        for key, value in stats.items():
            totals[key] += value
    tokens = max(totals["tokens"], 1.0)
    metrics = {"perplexity": round(math.exp(totals["nll"] / tokens), 4), "eval_tokens": int(totals["tokens"])}
    if base is not None:
        kl = max(0.0, totals["kl"] / tokens)  # float error can leave an identical model at -1e-9
        metrics.update(token_agreement=round(totals["agree"] / tokens, 6), kl_to_baseline=round(kl, 6))
        metrics.update(perplexity_ratio_interval(changes))
    else:
        metrics.update(token_agreement=1.0, kl_to_baseline=0.0)
    return metrics


def perplexity_ratio_interval(block_changes: list[float]) -> dict[str, float]:
    """The stage's perplexity over the baseline's with a paired 95 % interval over evaluation blocks (both ran
    on the same blocks; each block's change in mean next-token loss is one paired item). Blocks are of one
    length, so exp(mean change) is the ratio of the two perplexities."""
    from optitool.paired import paired_change

    if not block_changes:
        return {}
    change = paired_change([0.0] * len(block_changes), block_changes)
    return {"perplexity_ratio": round(math.exp(change.difference), 6),
            "perplexity_ratio_low": round(math.exp(change.low), 6),
            "perplexity_ratio_high": round(math.exp(change.high), 6)}


def generation_prompts(batches: list[Batch], length: int) -> Any:
    """[prompts, length] token ids: the first `length` tokens of the first evaluation blocks."""
    import torch

    rows = torch.cat([b.inputs["input_ids"] for b in batches])
    return rows[:GENERATION_PROMPTS, :length]


Clock = Callable[[], float]


def cache_argument(module: Any) -> str:
    """transformers 5 calls the cache `cache` where 4.57 (which optimum needs) calls it `past_key_values` (the
    old name warns in 5, and goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def greedy_with_cache(module: Any, ids: Any, new_tokens: int, clock: Clock = time.perf_counter) -> Decoded:
    """Greedy decoding of a torch causal LM with its own KV cache, as Hugging Face's generate() runs it:
    one prefill over the prompts (unpadded, all of one length), then one token at a time."""
    import torch

    mask = torch.ones_like(ids)
    key = cache_argument(module)
    with torch.inference_mode():
        start = clock()
        out = module(input_ids=ids, attention_mask=mask, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        first = clock()
        tokens = [token]
        for _ in range(new_tokens - 1):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = module(input_ids=token, attention_mask=mask, use_cache=True, **{key: out[key]})
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
        end = clock()
    return Decoded(torch.cat(tokens, 1).cpu(), first - start, end - first)


def greedy_without_cache(forward: Callable[[Any, Any], Any], ids: Any, new_tokens: int,
                         clock: Clock = time.perf_counter) -> Decoded:
    """Greedy decoding with a graph that maps (input_ids, attention_mask) to logits and keeps no past
    key/values: every new token re-runs the whole sequence."""
    import torch

    start = clock()
    first = start
    prompt_length = ids.shape[1]
    for step in range(new_tokens):
        logits = forward(ids, torch.ones_like(ids))
        ids = torch.cat([ids, logits[:, -1:].argmax(-1).to(ids.dtype)], 1)
        if step == 0:
            first = clock()
    end = clock()
    return Decoded(ids[:, prompt_length:], first - start, end - first)


def greedy_tokens(artifact: ModelArtifact, prompts: Any, new_tokens: int, device: str) -> Any:
    """[prompts, new_tokens] greedy continuations: a torch model decodes with its KV cache, an ONNX graph
    with past key/values with its own, one without re-runs the sequence for each token."""
    import torch

    from optitool.execution import Executor
    from optitool.onnx_decoding import open_decoder

    if isinstance(artifact, TorchModel):
        return greedy_with_cache(artifact.module.to(device).eval(), prompts.to(device), new_tokens).tokens
    assert isinstance(artifact, OnnxModel)
    decoder = open_decoder(artifact.path)
    if decoder is not None:
        return torch.from_numpy(decoder.greedy(prompts.numpy(), new_tokens)[0])
    run = Executor(artifact)
    return greedy_without_cache(lambda ids, mask: run.raw({"input_ids": ids, "attention_mask": mask})[1],
                                prompts, new_tokens).tokens


def generation_agreement(tokens: Any, baseline_tokens: Any) -> float:
    """Share of generated positions where the stage's greedy token equals the baseline's."""
    return round(float((tokens == baseline_tokens).float().mean()), 6)
