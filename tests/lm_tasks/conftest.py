from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def bpe_causal_lm(request, tmp_path_factory) -> Path:
    """A trained tiny causal LM with a byte-level BPE tokenizer (any text encodes, as with a real model)."""
    from optitool.testing import tiny_bpe_tokenizer, tiny_causal_lm_dir

    return tiny_causal_lm_dir(tmp_path_factory.mktemp(f"bpe-{request.param}") / "lm", family=request.param,
                              tokenizer=tiny_bpe_tokenizer())


def load(folder: Path):
    import transformers

    return (transformers.AutoModelForCausalLM.from_pretrained(folder).eval(),
            transformers.AutoTokenizer.from_pretrained(folder))
