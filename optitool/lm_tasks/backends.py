"""One causal LM stage as something that reads tokens and returns next-token log-probabilities, keeping
its own cache between calls: a torch module with its KV cache, an ONNX graph with past key/values (the
layout `optitool.onnx_decoding` runs), or an ONNX graph without, which re-reads the whole sequence.

A task scores many continuations of one context (the five topic names after one article): the context is
read once (`start`) and each continuation goes on from a fork of its cache (`go_on`), exactly as the
deployed model decodes, instead of re-reading the context once per continuation. A torch model can also read
many sequences at once (`read_many`, right-padded batches): for scoring, where nothing is decoded, that is
faster on a CPU than one sequence at a time. An ONNX graph is read one sequence at a time: a fused attention
kernel (onnxruntime-genai's GroupQueryAttention) does not promise right-padded rows.
"""

from __future__ import annotations

from typing import Any, Protocol

from optitool.artifacts import ModelArtifact, OnnxModel, TorchModel

BATCH = 8  # sequences a torch model reads at once (lm-eval's HF backend is usually run with 8)


class Reader(Protocol):
    """What the task adapter needs of a stage: log-probabilities [len(ids), vocab] (float32 numpy) of the
    token after each of `ids`, and a state to go on from."""

    def start(self, ids: list[int]) -> tuple[Any, Any]: ...

    def go_on(self, state: Any, ids: list[int], *, keep: bool) -> tuple[Any, Any]:
        """Continue from `state` with `ids`; with `keep`, `state` stays usable for another continuation."""
        ...


def _log_softmax(logits: Any) -> Any:
    import numpy as np

    logits = np.asarray(logits, dtype=np.float32)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


class TorchReader:
    """A Hugging Face causal LM with its own KV cache (forked by copying it)."""

    def __init__(self, module: Any, device: str) -> None:
        from optitool.lm import cache_argument

        self.module, self.device = module.to(device).eval(), device
        self.key = cache_argument(module)

    def _run(self, ids: list[int], past: Any, length: int) -> tuple[Any, Any]:
        import torch

        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        mask = torch.ones((1, length + len(ids)), dtype=torch.long, device=self.device)
        extra = {self.key: past} if past is not None else {}
        with torch.inference_mode():
            out = self.module(input_ids=tokens, attention_mask=mask, use_cache=True, **extra)
        log_probs = torch.log_softmax(out.logits[0].float(), -1).cpu().numpy()
        return log_probs, (out[self.key], length + len(ids))

    def start(self, ids: list[int]) -> tuple[Any, Any]:
        return self._run(ids, None, 0)

    def go_on(self, state: Any, ids: list[int], *, keep: bool) -> tuple[Any, Any]:
        import copy

        cache, length = state
        return self._run(ids, copy.deepcopy(cache) if keep else cache, length)

    def read_many(self, sequences: list[list[int]], starts: list[int], batch: int = BATCH) -> list[Any]:
        """Log-probabilities from position `starts[i]` to the end of each sequence, the sequences read `batch`
        at a time (longest first, right-padded and masked: a causal LM's real positions see no padding)."""
        import torch

        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out: list[Any] = [None] * len(sequences)
        for first in range(0, len(order), batch):
            chunk = order[first:first + batch]
            width = len(sequences[chunk[0]])
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(chunk):
                ids[row, :len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, :len(sequences[i])] = 1
            with torch.inference_mode():
                logits = self.module(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for row, i in enumerate(chunk):
                wanted = logits[row, starts[i]:len(sequences[i])].float()
                out[i] = torch.log_softmax(wanted, -1).cpu().numpy()
        return out


class OnnxCacheReader:
    """An ONNX graph with past key/values: its presents are the next call's past (never changed in place,
    so a fork is the same arrays)."""

    def __init__(self, decoder: Any) -> None:
        self.session, self.layout = decoder.session, decoder.layout
        self.takes_mask = any(i.name == "attention_mask" for i in self.session.get_inputs())

    def _run(self, ids: list[int], past: dict[str, Any], length: int) -> tuple[Any, Any]:
        import numpy as np

        from optitool.onnx_decoding import position_ids

        mask = np.ones((1, length + len(ids)), np.int64)
        feed = {"input_ids": np.array([ids], np.int64), **past}
        if self.takes_mask:
            feed["attention_mask"] = mask
        if self.layout.position_ids:
            feed["position_ids"] = position_ids(mask, len(ids))
        outputs = self.session.run(["logits", *self.layout.present_names], feed)
        presents = dict(zip(self.layout.past_names, outputs[1:], strict=True))
        return _log_softmax(outputs[0][0]), (presents, length + len(ids))

    def start(self, ids: list[int]) -> tuple[Any, Any]:
        return self._run(ids, self.layout.empty_past(1), 0)

    def go_on(self, state: Any, ids: list[int], *, keep: bool) -> tuple[Any, Any]:
        past, length = state
        return self._run(ids, past, length)


class OnnxFullReader:
    """An ONNX graph without a cache: each call re-reads the whole sequence so far."""

    def __init__(self, artifact: OnnxModel) -> None:
        from optitool.execution import Executor

        self.run = Executor(artifact)

    def _logits(self, ids: list[int]) -> Any:
        import torch

        tokens = torch.tensor([ids], dtype=torch.long)
        return self.run.raw({"input_ids": tokens, "attention_mask": torch.ones_like(tokens)})[1][0].numpy()

    def start(self, ids: list[int]) -> tuple[Any, Any]:
        return _log_softmax(self._logits(ids)), list(ids)

    def go_on(self, state: Any, ids: list[int], *, keep: bool) -> tuple[Any, Any]:
        seen = state + list(ids)
        return _log_softmax(self._logits(seen)[-len(ids):]), seen


def reader_for(artifact: ModelArtifact, device: str) -> Reader:
    """The reader that runs `artifact` as it is deployed: torch on `device`, ONNX on the CPU through its
    cache when the graph has one."""
    if isinstance(artifact, TorchModel):
        return TorchReader(artifact.module, device)
    assert isinstance(artifact, OnnxModel)
    from optitool.onnx_decoding import open_decoder

    decoder = open_decoder(artifact.path)
    return OnnxCacheReader(decoder) if decoder is not None else OnnxFullReader(artifact)
