"""A pytest plugin for plugin authors: tiny models, a pipeline runner and the pass contract check.

Opt in with `pytest_plugins = ["optitool.testing"]` in your conftest.py. Everything here builds in-process
in seconds: no downloads, no real model.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from optitool.errors import ConfigError

WORDS = ("the market shares rose as the bank said profits grew while the film won an award and the team won "
         "the match after the minister said the election vote was close and the new phone software was fast").split()


# The `[model]` part of a pipeline for `tiny_mlp`, to which a test adds its `[[passes]]`.
TINY_MLP_TOML = """
[model]
source = "python"
factory = "optitool.testing:tiny_mlp"
[model.inputs]
x = ["batch", 16]
"""


def tiny_mlp(in_features: int = 16, hidden: int = 32, classes: int = 4) -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(in_features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, classes))


def tiny_cnn(classes: int = 4) -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, classes))


def tiny_tokenizer() -> Any:
    """A WordPiece tokenizer over a few dozen words, built with the tokenizers library (works on transformers 4
    and 5 alike)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(WORDS)))}
    core = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "attention_mask", "token_type_ids"])


def tiny_bert_dir(folder: Path, *, classes: int | None = None, layers: int = 2) -> Path:
    """Save a tiny BERT (2 layers, hidden 32, 4 heads) and its tokenizer as a Hugging Face folder."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, num_labels=classes or 2)
    model = BertForSequenceClassification(config) if classes else BertModel(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_bpe_tokenizer() -> Any:
    """A byte-level BPE tokenizer (GPT-2's scheme, the one SmolLM2's GGUF file carries) learnt from the word
    corpus: each word after a space is one token, and any other text still encodes, byte by byte, as a real
    language model's tokenizer does. Its vocabulary and merges can be written into a GGUF file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def tiny_causal_lm_dir(folder: Path, *, family: str = "llama", train_steps: int = 200, hidden: int = 32,
                       vocab_size: int | None = None, tokenizer: Any = None) -> Path:
    """Save a tiny causal LM (2 layers, hidden 32 unless told; "llama": grouped-query attention with 4 query and 2
    key/value heads, SwiGLU, RMSNorm, tied embeddings; "gpt2": Conv1D layers, tied embeddings) and its
    tokenizer as a Hugging Face folder, after `train_steps` steps of next-token training on the seeded
    word corpus, so that perplexity means something (a random model's is the vocabulary size whatever
    one does to it). The tokenizer is the tiny WordPiece one unless given."""
    import random

    import torch
    import transformers

    torch.manual_seed(0)
    if tokenizer is None:
        tokenizer = tiny_tokenizer()
        tokenizer.eos_token = "[SEP]"
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    special = {"bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id,
               "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vocab = max(len(tokenizer), vocab_size or 0)  # rows past the tokenizer's are never fed
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=hidden, n_layer=2, n_head=4,
                                         **special)
        model = transformers.GPT2LMHeadModel(config)
    elif family == "llama":
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          tie_word_embeddings=True, **special)
        model = transformers.LlamaForCausalLM(config)
    else:
        raise ValueError(f"family is 'llama' or 'gpt2', not {family!r}")
    rng = random.Random(0)
    ids: list[int] = []
    for _ in range(200):  # topic-coherent sentences: the next word is predictable from the topic
        topic = rng.randrange(3)
        words = WORDS[topic * 8: topic * 8 + 8] if topic < 2 else WORDS[16:]
        ids += tokenizer(" ".join(rng.choice(words) for _ in range(10)), add_special_tokens=False)["input_ids"] + [
            special["eos_token_id"]]
    blocks = torch.tensor([ids[i:i + 16] for i in range(0, len(ids) - 16, 16)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(train_steps):
        batch = blocks[(step * 8) % len(blocks):][:8]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_gguf_file(path: Path, *, train_steps: int = 200) -> Path:
    """The tiny Llama of `tiny_causal_lm_dir` written as a float32 GGUF file (llama.cpp's tensor names and
    rotary layout), with the byte-level BPE tokenizer of `tiny_bpe_tokenizer` as its vocabulary and merges, as
    SmolLM2's file carries its own: what transformers rebuilds from the file encodes text exactly as the
    model was trained on, with one embedding row per token. For testing the gguf loader without a download."""
    import json

    import gguf
    import transformers

    folder = tiny_causal_lm_dir(path.parent / f"{path.stem}-hf", family="llama", train_steps=train_steps,
                                tokenizer=tiny_bpe_tokenizer())
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    cfg, state = model.config, model.state_dict()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(cfg.vocab_size)
    tokens = [tok for tok, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_token_types([3 if tok in tokenizer.all_special_tokens else 1 for tok in tokens])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)

    def tensor(name: str) -> Any:
        return state[name].float().numpy()

    def rotary(weight: Any, heads: int) -> Any:  # llama.cpp stores q and k with the halves interleaved
        return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
            weight.shape)

    writer.add_tensor("token_embd.weight", tensor("model.embed_tokens.weight"))
    writer.add_tensor("output_norm.weight", tensor("model.norm.weight"))
    names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_q.weight", rotary(tensor(prefix + "self_attn.q_proj.weight"),
                                                           cfg.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", rotary(tensor(prefix + "self_attn.k_proj.weight"),
                                                           cfg.num_key_value_heads))
        for gguf_name, hf_name in names.items():
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", tensor(f"{prefix}{hf_name}.weight"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def text_folder(folder: Path, *, per_label: int = 12) -> Path:
    """A labelled text corpus laid out like BBC News (<label>/*.txt), from a seeded word sampler."""
    import random

    rng = random.Random(0)
    topics = {"business": WORDS[:8], "sport": WORDS[8:16], "tech": WORDS[16:]}
    for label, words in topics.items():
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_label):
            text = " ".join(rng.choice(words) for _ in range(12))
            (folder / label / f"{i:03d}.txt").write_text(text)
    return folder


TINY_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {name}.jsonl
test_split: test
output_type: {output_type}
{body}
metadata:
  version: 1.0
"""
TINY_TASK_BODIES = {
    "multiple_choice": 'doc_to_text: "{{text}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
                       "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true",
    "loglikelihood": 'doc_to_text: "{{text}}"\ndoc_to_target: "{{\' \' + target}}"\ntarget_delimiter: ""\n'
                     "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                     "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false",
    "generate_until": 'doc_to_text: "{{text}}"\ndoc_to_target: "{{\' \' + target}}"\n'
                      'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 1\n'
                      "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true",
}


def tiny_task_file(folder: Path, *, items: int = 20, output_type: str = "multiple_choice",
                   name: str | None = None) -> Path:
    """A local lm-eval task (YAML and JSONL data beside it) over the word corpus the tiny causal LMs learn:
    after six words of one topic, which word comes next. multiple_choice: one word of each topic, the
    right one of the context's topic; loglikelihood: that word as a cloze target; generate_until: the
    same target, generated. Seeded; returns the YAML's path."""
    import json
    import random

    rng = random.Random(0)
    topics = [WORDS[:8], WORDS[8:16], WORDS[16:]]
    name = name or f"tiny_{output_type}"
    rows = []
    for i in range(items):
        topic = i % 3
        text = " ".join(rng.choice(topics[topic]) for _ in range(6))
        choices = [rng.choice([w for w in words if w != "the"]) for words in topics]
        rows.append({"text": text, "choices": choices, "label": topic, "target": choices[topic]})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / f"{name}.yaml"
    path.write_text(TINY_TASK_YAML.format(name=name, output_type=output_type, body=TINY_TASK_BODIES[output_type]))
    return path


class HookRecorder:
    """A plugin that records the lifecycle hooks it saw (name and arguments)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def names(self) -> list[str]:
        return [n for n, _ in self.calls]

    def optitool_pipeline_start(self, spec: Any, run_dir: Path) -> None:
        self.calls.append(("optitool_pipeline_start", {"spec": spec, "run_dir": run_dir}))

    def optitool_pass_finished(self, stage: dict[str, Any], run_dir: Path) -> None:
        self.calls.append(("optitool_pass_finished", {"stage": stage, "run_dir": run_dir}))

    def optitool_report_written(self, report: dict[str, Any], path: Path) -> None:
        self.calls.append(("optitool_report_written", {"report": report, "path": path}))


def _recorder_plugin(recorder: HookRecorder) -> Any:
    import optitool

    for name in ("optitool_pipeline_start", "optitool_pass_finished", "optitool_report_written"):
        optitool.hookimpl(getattr(recorder, name).__func__)
    return recorder


@dataclass
class SnippetResult:
    report: dict[str, Any]
    run_dir: Path
    stages: list[Any]
    hook_calls: list[str] = field(default_factory=list)


def run_snippet(toml: str, tmp_path: Path, *, plugins: tuple[ModuleType | Any, ...] = (), benchmark: bool = False,
                builtins: bool = True) -> SnippetResult:
    """Run a pipeline given as TOML text with only optitool's own plugins and `plugins` (no autoload).

    Relative paths in the snippet resolve against `tmp_path`; the run folder is `tmp_path / "run"`.
    """
    from optitool.config import parse_pipeline_text
    from optitool.plugins import get_plugin_manager
    from optitool.runner import Runner

    recorder = HookRecorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = get_plugin_manager(autoload=False, builtins=builtins,
                                    modules=(*plugins, _recorder_plugin(recorder)))
    spec = parse_pipeline_text(toml, loaded.registry, base_dir=tmp_path)
    result = Runner(spec, loaded, tmp_path / "run", quiet=True, benchmark=benchmark, overwrite=True).run()
    return SnippetResult(result.report, result.run_dir, result.stages, recorder.names())


def contract_inputs(features: int = 16, classes: int = 4, *, seed: int = 0, tokenizer: Any = None,
                    input_names: list[str] | None = None) -> Any:
    """Inputs with every split a pass may need (train, validation, calibration, eval), each labelled: what
    `check_pass_contract` gives a pass so that it has no reason not to run. Tensors `x` of `features` for
    the tiny MLP, or, with a `tokenizer`, labelled text from a seeded word sampler (for a text model)."""
    import random

    import torch

    from optitool.data.inputs import InputSource
    from optitool.data.sources import Dataset, Example
    from optitool.spec import InputSpec

    generator = torch.Generator().manual_seed(seed)
    words = random.Random(seed)
    sizes = {"train": 32, "validation": 8, "calibration": 16, "eval": 16}
    splits = {}
    for split, size in sizes.items():
        if tokenizer is not None:
            splits[split] = [Example(" ".join(words.choice(WORDS) for _ in range(10)), i % classes)
                             for i in range(size)]
            continue
        x = torch.rand(size, features, generator=generator)
        splits[split] = [Example(None, int(i % classes), {"x": x[i]}) for i in range(size)]
    labels = [f"class{i}" for i in range(classes)]
    if tokenizer is not None:
        return InputSource(Dataset(splits, labels), tokenizer=tokenizer, input_names=input_names, max_length=16,
                           seed=seed)
    return InputSource(Dataset(splits, labels), input_specs={"x": InputSpec(shape=["batch", features])},
                       input_names=["x"], seed=seed)


def _tiny_onnx(folder: Path) -> Any:
    """The tiny MLP as an ONNX file (the fast TorchScript exporter is enough for a 3-layer MLP)."""
    import torch

    from optitool.artifacts import OnnxModel

    path = folder / "contract-input.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tiny_mlp().eval(), (torch.rand(2, 16),), str(path), input_names=["x"],
                          output_names=["output"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    return OnnxModel(path, input_names=["x"])


def check_pass_contract(pass_class: type, *, settings: dict[str, Any] | None = None, model: Any = None,
                        tmp_path: Path | None = None) -> None:
    """Assert what optitool relies on from every pass; raises AssertionError naming the broken rule.

    Checks: registration through a plugin (exactly once), settings round-trip and refuse unknown keys,
    a model of a kind the pass does not take is refused before anything runs, and on every kind it
    takes, `run` succeeds on a tiny model with every data split it may need and returns a model of the
    declared kind that still runs. `model` replaces the tiny MLP: a TorchModel or an OnnxModel with a
    tokenizer (it then gets labelled text, 4 classes) or whose input is `x` of shape [batch, 16].
    """
    from pydantic import ValidationError

    from optitool.passes import Pass
    from optitool.plugins import get_plugin_manager

    assert inspect.isclass(pass_class) and issubclass(pass_class, Pass), f"{pass_class!r} must subclass optitool.Pass"
    settings = settings or {}
    config = pass_class.Config.model_validate(settings)
    again = pass_class.Config.model_validate(config.model_dump(mode="json"))
    assert again == config, f"{pass_class.name}: settings do not round-trip through model_dump()"
    try:
        pass_class.Config.model_validate({**settings, "surely_not_a_setting": 1})
    except ValidationError:
        pass
    else:
        raise AssertionError(f"{pass_class.name}: Config accepts unknown keys; subclass optitool.PassConfig")

    import optitool

    plugin = ModuleType(f"contract_{pass_class.name}")
    plugin.optitool_register_passes = optitool.hookimpl(lambda registry: registry.add(pass_class))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = get_plugin_manager(autoload=False, builtins=False, modules=(plugin,))
    assert not loaded.broken, f"{pass_class.name}: registration failed: {[b.error for b in loaded.broken]}"
    owners = [r.plugin for n, r in loaded.registry.passes.items() if n == pass_class.name]
    assert owners == [plugin.__name__], f"{pass_class.name}: registered {len(owners)} times"

    from optitool.config import build_spec

    wrong = "onnx" if "onnx" not in pass_class.accepted_kinds() else None
    if wrong:
        raw = {"model": {"source": "onnx", "path": __file__}, "passes": [{"pass": pass_class.name, **settings}]}
        try:
            build_spec(raw, loaded.registry, base_dir=Path("/"))
        except ConfigError:
            pass
        else:
            raise AssertionError(f"{pass_class.name}: an ONNX model was not refused before running")

    import tempfile

    folder = Path(tmp_path or tempfile.mkdtemp(prefix="optitool-contract-"))
    for kind in pass_class.accepted_kinds():
        _check_run(pass_class, config, kind, _contract_model(kind, model, folder), folder / f"run-{kind}")


def _contract_model(kind: str, model: Any, folder: Path) -> Any:
    from optitool.artifacts import TorchModel

    if model is not None and getattr(model, "kind", None) == kind:
        return model
    if kind == "onnx":
        folder.mkdir(parents=True, exist_ok=True)
        return _tiny_onnx(folder)
    return TorchModel(tiny_mlp(), input_names=["x"])


def _check_run(pass_class: type, config: Any, kind: str, artifact: Any, folder: Path) -> None:
    """Run the pass on `artifact`; it must succeed and give a model of the declared kind that runs."""
    import logging

    from optitool.execution import Executor
    from optitool.passes import PassContext

    instance = pass_class(config)
    instance.check(kind)
    stage_dir = folder / "stage"
    stage_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = getattr(artifact, "tokenizer", None)
    inputs = contract_inputs(tokenizer=tokenizer, input_names=getattr(artifact, "input_names", None) or None)
    ctx = PassContext(device="cpu", seed=0, run_dir=folder, stage_dir=stage_dir, inputs=inputs,
                      logger=logging.getLogger("optitool.contract"), quiet=True, pass_name=pass_class.name)
    try:
        result = instance.run(artifact, ctx)
    except Exception as exc:  # noqa: BLE001 - any failure breaks the contract, a clear refusal included
        raise AssertionError(f"{pass_class.name}: run() on a tiny {kind} model with train, validation, "
                             f"calibration and eval data raised {type(exc).__name__}: {exc}") from exc
    expected = instance.output_kind(kind)
    assert getattr(result, "kind", None) == expected, (
        f"{pass_class.name}: run() on a {kind} model returned {result!r}, not a {expected} model artifact")
    batch = next(inputs.batches("eval", 4))
    try:
        Executor(result)(batch.inputs)
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"{pass_class.name}: the {expected} model run() returned does not run on the "
                             f"inputs the original took: {type(exc).__name__}: {exc}") from exc


@pytest.fixture
def optitool_tiny_mlp() -> Any:
    return tiny_mlp()


@pytest.fixture
def optitool_tiny_bert(tmp_path: Path) -> Path:
    return tiny_bert_dir(tmp_path / "tiny-bert")


@pytest.fixture(params=["llama", "gpt2"])
def optitool_tiny_causal_lm(request: Any, tmp_path_factory: Any) -> Path:
    """A trained tiny causal LM folder, once as a Llama and once as a GPT-2 (Conv1D) model."""
    return tiny_causal_lm_dir(tmp_path_factory.mktemp(f"tiny-{request.param}"), family=request.param)


@pytest.fixture
def optitool_text_folder(tmp_path: Path) -> Path:
    return text_folder(tmp_path / "texts")


@pytest.fixture
def optitool_run(tmp_path: Path) -> Any:
    """`optitool_run(toml, plugins=(my_plugin,))` runs a pipeline snippet in tmp_path."""

    def run(toml: str, **kwargs: Any) -> SnippetResult:
        return run_snippet(toml, tmp_path, **kwargs)

    return run
