"""Model inputs made from the pipeline's data: tokenized text, or seeded tensors of declared shapes.

Never zeros and never one cached input: benchmarks rotate several real (or seeded random) batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optitool.data.sources import Dataset, Example
from optitool.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from optitool.spec import InputSpec



@dataclass
class Batch:
    inputs: dict[str, Any]
    labels: torch.Tensor | None = None


class InputSource:
    """Turns examples into model inputs for one model (its tokenizer or its declared input shapes)."""

    def __init__(self, dataset: Dataset, *, tokenizer: Any = None, input_specs: dict[str, InputSpec] | None = None,
                 input_names: list[str] | None = None, max_length: int = 128, seed: int = 0) -> None:
        self.dataset, self.tokenizer = dataset, tokenizer
        self.input_specs = input_specs or {}
        self.input_names = list(input_names or [])
        self.max_length, self.seed = max_length, seed
        if tokenizer is None and not self.input_specs:
            raise ConfigError("the model has no tokenizer and [model.inputs] is empty, so optitool cannot make "
                              'inputs for it; declare them, e.g. [model.inputs] x = ["batch", 3, 224, 224]')
        texts = any(e.inputs is None and e.text is not None for split in dataset.splits.values() for e in split)
        if tokenizer is None and texts:
            raise ConfigError("[data] gives text, but the model has no tokenizer to turn it into inputs; use a model "
                              "with one (a Hugging Face folder, or [model] name = a tokenizer folder for an ONNX "
                              "file), or leave [data] out to evaluate on seeded random [model.inputs]")

    @property
    def is_text(self) -> bool:
        return self.tokenizer is not None

    @property
    def label_names(self) -> list[str]:
        return self.dataset.label_names

    def has_split(self, split: str) -> bool:
        return bool(self.dataset.splits.get(split))

    def tokenize(self, texts: list[str], length: int | None = None) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(texts, padding="max_length", truncation=True, max_length=length or self.max_length,
                                 return_tensors="pt")
        keep = self.input_names or list(encoded.keys())
        return {k: v for k, v in encoded.items() if k in keep}

    def _from_examples(self, examples: list[Example], length: int | None = None) -> Batch:
        import torch

        if examples and examples[0].inputs is not None:
            inputs = {k: torch.stack([torch.as_tensor(e.inputs[k]) for e in examples]) for k in examples[0].inputs}
        else:
            inputs = self.tokenize([e.text or "" for e in examples], length)
        labels = None
        if examples and all(e.label is not None for e in examples):
            labels = torch.tensor([e.label for e in examples], dtype=torch.long)
        return Batch(inputs, labels)

    def batches(self, split: str, batch_size: int, *, limit: int | None = None) -> Iterator[Batch]:
        """Batches of a split in order (the split itself was shuffled once, by seed)."""
        examples = self.dataset.split(split)
        if limit is not None:
            examples = examples[:limit]
        for start in range(0, len(examples), batch_size):
            yield self._from_examples(examples[start: start + batch_size])

    def example(self, batch_size: int, sequence_length: int | None = None, *, index: int = 0,
                split: str = "eval") -> dict[str, Any]:
        """Batch number `index` of a fixed shape: from the data when there is some, else seeded random."""
        pool = self.dataset.splits.get(split) or next((s for s in self.dataset.splits.values() if s), [])
        if pool and self.is_text:
            picked = [pool[(index * batch_size + i) % len(pool)] for i in range(batch_size)]
            return self._from_examples(picked, sequence_length).inputs
        return self.random(batch_size, sequence_length, index=index)

    def random(self, batch_size: int, sequence_length: int | None = None, *, index: int = 0) -> dict[str, torch.Tensor]:
        import torch

        generator = torch.Generator().manual_seed(self.seed * 1000 + index)
        length = sequence_length or self.max_length
        if self.is_text:
            vocab = len(self.tokenizer)
            low = min(1000, vocab // 2)
            ids = torch.randint(low, vocab, (batch_size, length), generator=generator)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
            keep = self.input_names or list(getattr(self.tokenizer, "model_input_names", inputs))
            return {k: v for k, v in inputs.items() if k in keep}
        out = {}
        for name, spec in self.input_specs.items():
            shape = [batch_size if d == "batch" else length if d == "sequence" else int(d) for d in spec.shape]
            dtype = getattr(torch, spec.dtype)  # InputSpec allows only torch dtype names
            if dtype.is_floating_point:
                out[name] = (torch.rand(shape, generator=generator) * (spec.high - spec.low) + spec.low).to(dtype)
            elif dtype == torch.bool:
                out[name] = torch.rand(shape, generator=generator) > 0.5
            else:
                high = max(int(spec.high), int(spec.low) + 1)
                out[name] = torch.randint(int(spec.low), high, shape, generator=generator, dtype=dtype)
        return out


def to_numpy(inputs: dict[str, Any], names: list[str] | None = None) -> dict[str, Any]:
    """Inputs for onnxruntime: numpy arrays, only those the graph declares."""
    return {k: v.detach().cpu().numpy() for k, v in inputs.items() if names is None or k in names}
