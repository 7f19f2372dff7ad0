"""A stage as an lm-evaluation-harness model: `loglikelihood`, `loglikelihood_rolling` and `generate_until`
served by the stage itself (torch, or the ONNX graph as deployed, through its KV cache).

Text becomes tokens exactly as lm-eval's Hugging Face backend makes them (the context's trailing spaces
moved to the continuation, the pair encoded whole and split at the context's length, the prefix token for
an empty context, the same rolling windows and truncation), so a score here and one from `lm_eval --model
hf` on the same weights are the same numbers up to float rounding. What differs is only how the model is
run: a torch model reads distinct sequences in batches; an ONNX graph one request at a time, a context read
once however many continuations are scored after it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from optitool.lm_tasks.backends import Reader

DEFAULT_MAX_GEN_TOKENS = 256
CHUNK = 64  # sequences between progress reports when a reader reads many at once

Progress = Callable[[int, int, str], None]  # (done, total, what)


def make_stage_lm(reader: Reader, tokenizer: Any, max_length: int, progress: Progress | None = None) -> Any:
    """An `lm_eval.api.model.LM` over `reader` (lm-eval is imported here, only when tasks are scored)."""
    from lm_eval.api.model import LM

    class StageLM(LM):
        def __init__(self) -> None:
            super().__init__()
            self.scorer = TokenScorer(reader, tokenizer, max_length, progress)

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return self.scorer.loglikelihood([r.args for r in requests])

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            return self.scorer.generate_until([r.args for r in requests])

    return StageLM()


def _sum_and_greedy(rows: Any, continuation: list[int]) -> tuple[float, bool]:
    """The continuation's log-likelihood from the rows predicting each of its tokens, and whether every one
    of them is the row's most likely token."""
    total, greedy = 0.0, True
    for row, token in zip(rows, continuation, strict=True):
        total += float(row[token])
        greedy = greedy and int(row.argmax()) == token
    return total, greedy


class TokenScorer:
    """The three kinds of request on token ids, independent of lm-eval's classes (tested on their own)."""

    def __init__(self, reader: Reader, tokenizer: Any, max_length: int, progress: Progress | None = None) -> None:
        self.reader, self.tokenizer, self.max_length = reader, tokenizer, max_length
        self.progress = progress or (lambda done, total, what: None)
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.prefix_token = bos if bos is not None else eos
        self.eos_token = eos

    # ---------------------------------------------------------------------------------------- tokens
    def encode(self, text: str) -> list[int]:
        """As lm-eval's HF backend: the tokenizer's own special tokens, unless the text starts with the
        prefix token's string already."""
        prefix = self.tokenizer.decode([self.prefix_token]) if self.prefix_token is not None else None
        special = not (prefix and text.startswith(prefix))
        return list(self.tokenizer.encode(text, add_special_tokens=special))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = list(self.tokenizer.encode(continuation, add_special_tokens=False))
            return ([self.prefix_token], cont) if cont and cont[0] != self.prefix_token else (cont[:1], cont[1:])
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, head = self.encode(context + continuation), self.encode(context)
        return head, whole[len(head):]

    # ---------------------------------------------------------------------------------------- scoring
    def score_tokens(self, pairs: list[tuple[list[int], list[int]]], what: str) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of each continuation, whether each of its tokens is the greedy one),
        after its context; the model sees at most max_length tokens, cut from the left as lm-eval does. A
        context is read once for all the continuations that follow it in `pairs`."""
        if hasattr(self.reader, "read_many"):
            return self._score_batched(pairs, what)
        results: list[tuple[float, bool]] = []
        last_context: tuple[int, ...] | None = None
        state: Any = None
        last_row: Any = None
        for done, (context, continuation) in enumerate(pairs):
            if not continuation:
                results.append((0.0, True))
                continue
            head, continuation = self._window(context, continuation)
            if tuple(head) != last_context:
                log_probs, state = self.reader.start(head)
                last_context, last_row = tuple(head), log_probs[-1]
            rows = [last_row]
            if len(continuation) > 1:
                more, _ = self.reader.go_on(state, continuation[:-1], keep=True)
                rows += list(more)
            results.append(_sum_and_greedy(rows, continuation))
            self.progress(done + 1, len(pairs), what)
        return results

    def _window(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """What the model reads: at most max_length tokens, cut from the left as lm-eval does."""
        window = (context + continuation)[-(self.max_length + 1):]
        head = window[:-len(continuation)]
        if not head:  # a continuation longer than the window: its first tokens become the context
            return window[:1], window[1:]
        return head, continuation

    def _score_batched(self, pairs: list[tuple[list[int], list[int]]], what: str) -> list[tuple[float, bool]]:
        """The same scores from whole sequences read in batches: each distinct context + continuation (less its
        last token) once, so the continuations of one token after one context share one sequence."""
        cut = [self._window(c, x) if x else (c, x) for c, x in pairs]
        sequences: dict[tuple[int, ...], int] = {}  # sequence -> the first position any pair needs from it
        for head, continuation in cut:
            if continuation:
                key = tuple(head + continuation[:-1])
                sequences[key] = min(sequences.get(key, len(head) - 1), len(head) - 1)
        keys = list(sequences)
        rows = {}
        for first in range(0, len(keys), CHUNK):
            chunk = keys[first:first + CHUNK]
            read = self.reader.read_many([list(k) for k in chunk], [sequences[k] for k in chunk])
            rows.update(zip(chunk, read, strict=True))
            self.progress(min(first + CHUNK, len(keys)), len(keys), f"{what} (distinct sequences)")
        results = []
        for head, continuation in cut:
            if not continuation:
                results.append((0.0, True))
                continue
            key = tuple(head + continuation[:-1])
            offset = len(head) - 1 - sequences[key]
            results.append(_sum_and_greedy(rows[key][offset:offset + len(continuation)], continuation))
        return results

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.score_tokens([self.encode_pair(c, x) for c, x in requests], "loglikelihood")

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        """Each text's log-likelihood over disjoint windows of max_length tokens (every token predicted once,
        each window with as much context as fits), starting after the prefix token, as lm-eval scores it."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        spans, pairs = [], []
        for text in texts:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.encode(text), prefix_token=self.prefix_token, max_seq_len=self.max_length,
                context_len=1)]
            spans.append((len(pairs), len(pairs) + len(windows)))
            pairs += windows
        scores = self.score_tokens(pairs, "loglikelihood_rolling")
        return [sum(s for s, _ in scores[a:b]) for a, b in spans]

    def generate_until(self, requests: list[tuple[str, dict[str, Any]]]) -> list[str]:
        """Greedy continuations, stopped at the first stop string (the end-of-text token's among them) or
        after max_gen_toks tokens, with the stop string cut off as lm-eval's HF backend returns them."""
        from lm_eval.models.utils import (
            handle_stop_sequences,
            normalize_gen_kwargs,
            postprocess_generated_text,
        )

        eos = self.tokenizer.decode([self.eos_token]) if self.eos_token is not None else None
        out = []
        for done, (context, gen_kwargs) in enumerate(requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), DEFAULT_MAX_GEN_TOKENS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            budget = int(kwargs.pop("max_gen_toks"))
            ids = self.encode(context)[-max(self.max_length - budget, 1):]
            text = self._greedy_text(ids, budget, until)
            out.append(postprocess_generated_text(generation=text, stop=until, think_end_token=None))
            self.progress(done + 1, len(requests), "generate_until")
        return out

    def _greedy_text(self, ids: list[int], budget: int, until: list[str]) -> str:
        log_probs, state = self.reader.start(ids)
        tokens: list[int] = []
        for _ in range(budget):
            token = int(log_probs[-1].argmax())
            tokens.append(token)
            if token == self.eos_token:
                break
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if any(stop and stop in text for stop in until):
                return text
            log_probs, state = self.reader.go_on(state, [token], keep=False)
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
