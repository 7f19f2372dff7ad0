"""Causal LMs are judged per token: perplexity, next-token agreement and KL with the baseline."""

from __future__ import annotations

import math
import types

import pytest

import optitool
from optitool.errors import RunError
from optitool.testing import run_snippet


class BF16RoundTrip(optitool.Pass):
    """Cast every weight to bfloat16 and back: a change no language-model metric should call harmful."""

    name = "acme.bf16_roundtrip"
    takes = "torch"
    gives = "torch"

    def run(self, model, ctx):
        model.module.to(__import__("torch").bfloat16).float()
        return model


def roundtrip_plugin() -> types.ModuleType:
    module = types.ModuleType("acme_roundtrip")
    module.optitool_register_passes = optitool.hookimpl(lambda registry: registry.add(BF16RoundTrip))
    return module


def lm_snippet(folder, text_folder, passes: str, budget: str = "") -> str:
    return (f'[model]\nsource = "hf"\npath = "{folder}"\nmax_length = 16\n[benchmark]\nsequence_lengths = [16]\n'
            f'[data]\nsource = "folder"\npath = "{text_folder}"\nlabel_field = ""\nsplits = {{ eval = 0.5 }}\n'
            + passes + budget)


def test_a_causal_lm_is_measured_per_token_and_pruning_shows_where_a_near_lossless_change_does_not(
        tmp_path, optitool_tiny_causal_lm, optitool_text_folder):
    passes = ('[[passes]]\npass = "acme.bf16_roundtrip"\nname = "bf16"\n'
              '[[passes]]\npass = "magnitude_prune"\nname = "prune"\nsparsity = 0.8\n')
    report = run_snippet(lm_snippet(optitool_tiny_causal_lm, optitool_text_folder, passes), tmp_path,
                         plugins=(roundtrip_plugin(),)).report
    base, bf16, pruned = (s["metrics"] for s in report["stages"])
    for m in (base, pruned, bf16):
        assert {"perplexity", "token_agreement", "kl_to_baseline", "eval_tokens"} <= set(m)
        assert "fidelity" not in m  # a cosine of vocabulary logits is not offered for a language model
    assert base["token_agreement"] == 1.0 and base["kl_to_baseline"] == 0.0 and base["eval_tokens"] > 100
    assert base["perplexity"] < 20  # trained: far below the vocabulary size (about 45)
    # Measured: prune 80 % -> perplexity +5.3 % (Llama) / +1.8 % (GPT-2), agreement 0.34 / 0.48, KL 0.12 / 0.05;
    # bf16 round trip -> perplexity +0.03 %, agreement 0.99, KL 3e-6.
    assert pruned["perplexity"] > base["perplexity"] * 1.01 and pruned["token_agreement"] < 0.9
    assert pruned["kl_to_baseline"] > 0.01
    assert pruned["covered_sparsity"] == pytest.approx(0.8, abs=1e-3)  # Conv1D (GPT-2) and Linear alike
    assert abs(bf16["perplexity"] / base["perplexity"] - 1) < 0.01  # a near-lossless change shows none
    assert bf16["token_agreement"] > 0.97 and bf16["kl_to_baseline"] < pruned["kl_to_baseline"] / 10
    assert base["generation_agreement"] == 1.0 and bf16["generation_agreement"] >= 0.9
    assert pruned["generation_agreement"] < bf16["generation_agreement"]
    # the perplexity change paired block by block: the ratio of the two perplexities, inside its interval
    for stage in (bf16, pruned):
        assert stage["perplexity_ratio"] == pytest.approx(stage["perplexity"] / base["perplexity"], rel=1e-3)
        assert stage["perplexity_ratio_low"] <= stage["perplexity_ratio"] <= stage["perplexity_ratio_high"]
    assert "perplexity_ratio" not in base


def test_language_model_budgets(tmp_path, optitool_tiny_causal_lm, optitool_text_folder):
    passes = '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.8\n'
    budget = "[budget]\nmax_perplexity_increase = 0.005\nmin_token_agreement = 0.999\nmin_generation_agreement = 0.99\n"
    report = run_snippet(lm_snippet(optitool_tiny_causal_lm, optitool_text_folder, passes, budget), tmp_path).report
    checks = {c["budget"]: c for c in report["budget"]["checks"]}
    assert not report["budget"]["passed"]
    assert not checks["max_perplexity_increase"]["passed"] and "relative" in checks["max_perplexity_increase"]["message"]
    assert not checks["min_token_agreement"]["passed"] and not checks["min_generation_agreement"]["passed"]


def test_labelled_text_on_a_causal_lm_is_evaluated_as_text(tmp_path, optitool_text_folder):
    from optitool.testing import tiny_causal_lm_dir

    folder = tiny_causal_lm_dir(tmp_path / "lm", family="llama", train_steps=5)
    snippet = (f'[model]\nsource = "hf"\npath = "{folder}"\nmax_length = 16\n[benchmark]\nsequence_lengths = [16]\n'
               f'[data]\nsource = "folder"\npath = "{optitool_text_folder}"\nsplits = {{ eval = 0.5 }}\n')
    base = run_snippet(snippet, tmp_path).report["stages"][0]["metrics"]
    assert "perplexity" in base and "labels are not used" in base["labels_ignored"]


def _export_snippet(folder, text_folder, exporter: str) -> str:
    return lm_snippet(folder, text_folder, f'[[passes]]\npass = "onnx_export"\nexporter = "{exporter}"\n').replace(
        "max_length = 16", "max_length = 64").replace("splits = { eval = 0.5 }", "splits = { eval = 0.9 }")


def _check_decoder_stage(result, *, in_place: bool) -> None:
    from optitool import open_decoder

    base, exported = (s["metrics"] for s in result.report["stages"])
    assert exported["kv_cache"] and exported["export_greedy_steps_identical"] == 32
    assert exported["generation_tokens"] == 32 and exported["generation_prompts"] >= 2
    assert exported["generation_agreement"] == 1.0
    assert exported["perplexity"] == pytest.approx(base["perplexity"], rel=1e-3)
    import onnx

    graph = onnx.load(str(result.run_dir / "01-onnx_export" / "model.onnx"), load_external_data=False)
    assert "past_key_values.0.key" in [i.name for i in graph.graph.input]
    assert "present.0.key" in [o.name for o in graph.graph.output]
    assert open_decoder(result.run_dir / "01-onnx_export" / "model.onnx").layout.in_place is in_place


def test_the_exported_decoder_generates_the_same_greedy_tokens_as_torch_for_32_steps_with_its_kv_cache(
        tmp_path, optitool_tiny_causal_lm, optitool_text_folder):
    """The graph carries past key/values (one graph for prefill and decode); onnx_export checks 32 greedy
    steps against torch's cached decoding, and the stage's generation agreement says the same."""
    _check_decoder_stage(run_snippet(_export_snippet(optitool_tiny_causal_lm, optitool_text_folder, "dynamo"),
                                     tmp_path), in_place=False)


def test_onnxruntime_genai_builder_as_exporter(tmp_path, optitool_text_folder):
    """Its GroupQueryAttention graph runs through the same loop, verified the same way (head size 16: the
    fused attention needs a multiple of 16, and a model without one is refused by name; a vocabulary at
    least as wide as the hidden size: the builder 0.18 mislays a narrower LM head, which verification
    catches)."""
    pytest.importorskip("onnxruntime_genai")
    from optitool.testing import tiny_causal_lm_dir

    folder = tiny_causal_lm_dir(tmp_path / "lm", family="llama", train_steps=100, hidden=64, vocab_size=96)
    _check_decoder_stage(run_snippet(_export_snippet(folder, optitool_text_folder, "genai"), tmp_path / "a"),
                         in_place=True)
    narrow = tiny_causal_lm_dir(tmp_path / "narrow", family="llama", train_steps=1)
    with pytest.raises(RunError, match="needs a head size that is a multiple of 16; this model's is 8"):
        run_snippet(_export_snippet(narrow, optitool_text_folder, "genai"), tmp_path / "b")


def test_a_quantized_genai_export_still_runs_in_onnxruntime_genai(tmp_path, optitool_text_folder):
    """The builder's genai_config.json and tokenizer files travel with the graph through weight_only_quantize
    (its inputs and outputs unchanged), so the 4-bit folder loads in onnxruntime-genai's runtime and
    generates there the greedy tokens optitool's own decoder does."""
    og = pytest.importorskip("onnxruntime_genai")
    import numpy as np

    from optitool import open_decoder
    from optitool.testing import tiny_causal_lm_dir

    folder = tiny_causal_lm_dir(tmp_path / "lm", family="llama", train_steps=100, hidden=64, vocab_size=96)
    passes = ('[[passes]]\npass = "weight_only_quantize"\nbits = 4\nblock_size = 16\naccuracy_level = 4\n'
              'op_types = ["MatMul", "Gather"]\n')
    result = run_snippet(_export_snippet(folder, optitool_text_folder, "genai") + passes, tmp_path / "run")
    quantized = result.run_dir / "02-weight_only_quantize"
    assert {"genai_config.json", "tokenizer.json"} <= {p.name for p in quantized.iterdir()}
    prompt = np.array([[5, 17, 33, 8, 41, 2, 19, 60]], np.int64)
    ours, _, _ = open_decoder(quantized / "model.onnx").greedy(prompt, 12)
    model = og.Model(str(quantized))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + 12, min_length=prompt.shape[1] + 12, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.astype(np.int32))
    theirs = []
    while len(theirs) < 12:
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))
    assert theirs == ours[0].tolist()


def test_a_graph_whose_attention_appends_in_place_decodes_in_one_buffer_the_tokens_the_copying_loop_does(
        tmp_path, optitool_text_folder):
    """GroupQueryAttention given one buffer as past and present writes each step into it (no copy of the
    cache per step); the tokens are those of the loop that takes a new present every step, well past the
    prompt, and the buffer is as long as the whole generation."""
    pytest.importorskip("onnxruntime_genai")
    import dataclasses

    import numpy as np

    from optitool import open_decoder
    from optitool.testing import tiny_causal_lm_dir

    folder = tiny_causal_lm_dir(tmp_path / "lm", family="llama", train_steps=100, hidden=64, vocab_size=96)
    result = run_snippet(_export_snippet(folder, optitool_text_folder, "genai"), tmp_path / "run")
    decoder = open_decoder(result.run_dir / "01-onnx_export" / "model.onnx")
    assert decoder.layout.in_place
    prompt = np.array([[5, 17, 33, 8, 41, 2, 19, 60], [7, 7, 12, 90, 3, 55, 21, 1]], np.int64)
    in_place, _, _ = decoder.greedy(prompt, 40)
    decoder.layout = dataclasses.replace(decoder.layout, in_place=False)
    copied, _, _ = decoder.greedy(prompt, 40)
    assert in_place.shape == (2, 40) and (in_place == copied).all()
    buffer = decoder.layout.empty_past(2, 48)["past_key_values.0.key"]
    assert buffer.shape[2] == 0 and dataclasses.replace(decoder.layout, in_place=True).empty_past(2, 48)[
        "past_key_values.0.key"].shape[2] == 48


def test_a_decode_step_that_differs_from_torch_fails_the_export(tmp_path, optitool_text_folder, monkeypatch):
    from optitool.onnx_decoding import OnnxDecoder
    from optitool.testing import tiny_causal_lm_dir

    greedy = OnnxDecoder.greedy

    def planted(self, ids, new_tokens, *args):
        tokens, first, rest = greedy(self, ids, new_tokens, *args)
        tokens[:, 5:] = (tokens[:, 5:] + 1) % 10
        return tokens, first, rest

    monkeypatch.setattr(OnnxDecoder, "greedy", planted)
    folder = tiny_causal_lm_dir(tmp_path / "lm", family="gpt2", train_steps=5)
    snippet = lm_snippet(folder, optitool_text_folder, '[[passes]]\npass = "onnx_export"\n').replace(
        "max_length = 16", "max_length = 64")
    with pytest.raises(RunError, match="same greedy tokens as torch for 5 of 32 steps"):
        run_snippet(snippet, tmp_path)


def test_kv_cache_asked_of_a_model_without_one_is_a_clear_error(tmp_path, optitool_tiny_bert):
    """Refused by validate when the model's files say what it is (exit 2), by the pass when they do not
    (a Python factory: only the loaded model tells)."""
    from click.testing import CliRunner

    from optitool.cli import cli

    for setting in ("kv_cache = true", 'exporter = "genai"'):
        (tmp_path / "p.toml").write_text(f'[model]\nsource = "hf"\npath = "{optitool_tiny_bert}"\nmax_length = 16\n'
                                         f'[[passes]]\npass = "onnx_export"\n{setting}\n')
        result = CliRunner().invoke(cli, ["validate", str(tmp_path / "p.toml")])
        assert result.exit_code == 2 and "passes[0] (pass 'onnx_export')" in result.output, result.output
        assert setting in result.output and "'feature-extraction' model" in result.output
    from optitool.models.loaders import LOADERS
    from optitool.spec import ModelSpec

    model = LOADERS["hf"].load(ModelSpec(source="hf", path=str(optitool_tiny_bert)), tmp_path)
    from optitool_onnx.export import OnnxExport, OnnxExportConfig

    with pytest.raises(optitool.PassError, match="kv_cache = true: BertModel is not a causal language model"):
        OnnxExport(OnnxExportConfig(kv_cache=True))._with_cache(model)


def test_kv_cache_false_exports_the_graph_without_past(tmp_path, optitool_text_folder):
    from optitool.testing import tiny_causal_lm_dir

    folder = tiny_causal_lm_dir(tmp_path / "lm", family="llama", train_steps=5)
    result = run_snippet(lm_snippet(folder, optitool_text_folder,
                                    '[[passes]]\npass = "onnx_export"\nkv_cache = false\n'), tmp_path)
    exported = result.report["stages"][1]["metrics"]
    assert "kv_cache" not in exported and exported["generation_agreement"] == 1.0
    import onnx

    graph = onnx.load(str(result.run_dir / "01-onnx_export" / "model.onnx"), load_external_data=False)
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask"]


def test_an_onnx_export_of_a_causal_lm_keeps_being_judged_as_one(tmp_path, optitool_text_folder):
    from optitool.testing import tiny_causal_lm_dir

    folder = tiny_causal_lm_dir(tmp_path / "lm", family="llama")
    passes = '[[passes]]\npass = "onnx_export"\n[[passes]]\npass = "int8_quantize"\n'
    stages = run_snippet(lm_snippet(folder, optitool_text_folder, passes), tmp_path).report["stages"]
    base, exported, int8 = (s["metrics"] for s in stages)
    assert exported["perplexity"] == pytest.approx(base["perplexity"], rel=1e-3)
    assert exported["token_agreement"] > 0.99 and "perplexity" in int8


def test_a_causal_lm_folder_loads_with_its_lm_head_by_default(tmp_path):
    from optitool.models.loaders import LOADERS
    from optitool.spec import ModelSpec
    from optitool.testing import tiny_causal_lm_dir

    folder = tiny_causal_lm_dir(tmp_path / "lm", family="gpt2", train_steps=1)
    artifact = LOADERS["hf"].load(ModelSpec(source="hf", path=str(folder)), tmp_path)
    assert type(artifact.module).__name__ == "GPT2LMHeadModel"


def test_a_gguf_model_runs_through_a_pipeline_and_is_judged_as_a_language_model(tmp_path, optitool_text_folder):
    from optitool.testing import tiny_gguf_file

    tiny_gguf_file(tmp_path / "tiny.gguf")
    snippet = (f'[model]\nsource = "gguf"\npath = "tiny.gguf"\nmax_length = 16\n[benchmark]\nsequence_lengths = [16]\n'
               f'[data]\nsource = "folder"\npath = "{optitool_text_folder}"\nlabel_field = ""\nsplits = {{ eval = 0.5 }}\n'
               '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.8\n')
    result = run_snippet(snippet, tmp_path)
    base, pruned = (s["metrics"] for s in result.report["stages"])
    # the tiny file carries its vocabulary as a plain list, so its tokenizer splits text differently from the
    # original: the numbers are not comparable with the Hugging Face folder's, only finite and sensitive
    assert math.isfinite(base["perplexity"]) and base["perplexity"] > 1 and pruned["kl_to_baseline"] > 0.01
    from optitool.models.loaders import LOADERS
    from optitool.spec import ModelSpec

    again = LOADERS["stage"].load(ModelSpec(source="stage", path=str(result.run_dir / "01-magnitude_prune")), tmp_path)
    assert type(again.module).__name__ == "LlamaForCausalLM"  # the stage reloads through the gguf loader


@pytest.mark.parametrize("setting", ["model.max_length=128", "benchmark.sequence_lengths=[16, 100]",
                                     "benchmark.sequence_lengths=[40]"])  # 40 + 32 new tokens
def test_lengths_beyond_the_context_are_refused_before_loading(tmp_path, setting):
    from click.testing import CliRunner

    from optitool.cli import cli
    from optitool.testing import tiny_causal_lm_dir, tiny_gguf_file

    tiny_causal_lm_dir(tmp_path / "lm", family="gpt2", train_steps=1)
    tiny_gguf_file(tmp_path / "tiny.gguf", train_steps=1)
    for model in ('source = "hf"\npath = "lm"', 'source = "gguf"\npath = "tiny.gguf"'):
        (tmp_path / "p.toml").write_text(f"[model]\n{model}\nmax_length = 16\n[benchmark]\nsequence_lengths = [16]\n")
        result = CliRunner().invoke(cli, ["validate", str(tmp_path / "p.toml"), "--set", setting])
        assert result.exit_code == 2 and "the model takes at most 64 (its context length)" in result.output, \
            result.output


def test_a_causal_lm_is_benchmarked_in_generation_interleaved_across_runtimes(tmp_path, optitool_text_folder):
    """Time to first token and time per further token (tokens/s), with torch's KV cache and with the
    ONNX graph's, in one loop."""
    from optitool.testing import tiny_causal_lm_dir

    folder = tiny_causal_lm_dir(tmp_path / "lm", family="llama", train_steps=5)
    snippet = lm_snippet(folder, optitool_text_folder, '[[passes]]\npass = "onnx_export"\n').replace(
        "[benchmark]\nsequence_lengths = [16]\n",
        "[benchmark]\nsequence_lengths = [16]\nbatch_sizes = [1]\nnew_tokens = 8\nwarmup = 1\nmin_iterations = 3\n"
        "max_iterations = 3\nmin_seconds = 0\nmemory = true\n")
    report = run_snippet(snippet, tmp_path, benchmark=True).report
    base, exported = report["stages"]
    entries = {(s["name"], b["shape"]): b for s in report["stages"] for b in s["benchmarks"]}
    assert set(entries) == {(n, f"1x16 {m}") for n in ("baseline", "onnx_export") for m in ("ttft", "decode")}
    for entry in entries.values():
        assert entry["iterations"] == 3 and entry["new_tokens"] == 8 and entry["median_ms"] > 0
    decode = entries[("onnx_export", "1x16 decode")]
    assert decode["throughput_per_s"] == pytest.approx(1000 / decode["median_ms"], rel=1e-3)  # tokens/s
    assert any("KV cache: the graph's past key/values" in n for n in decode["notes"])
    for (_, shape), entry in entries.items():  # the peak of one whole generation, KV cache included
        assert (entry.get("memory", {}).get("peak_rss_mb", 0) > 0) == shape.endswith("decode"), entry.get("memory")
    assert decode["loop"] == entries[("baseline", "1x16 decode")]["loop"]
    assert decode["speedup_vs_baseline"]["interleaved"] and decode["speedup_vs_baseline"]["runtime"] == "torch_eager"


@pytest.mark.parametrize("budget", ["min_generation_agreement = 0.9", "max_perplexity_increase = 0.01",
                                    'max_latency_ms = { "1x16 decode" = 5 }'])
def test_a_language_model_budget_on_a_model_that_is_not_one_is_refused_before_loading(
        tmp_path, optitool_tiny_bert, budget):
    from click.testing import CliRunner

    from optitool.cli import cli

    (tmp_path / "p.toml").write_text(f'[model]\nsource = "hf"\npath = "{optitool_tiny_bert}"\nmax_length = 16\n'
                                     f"[benchmark]\nsequence_lengths = [16]\nbatch_sizes = [1]\n[budget]\n{budget}\n")
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "p.toml")])
    assert result.exit_code == 2, result.output
    assert "is measured for causal language models only, and [model] is a 'feature-extraction' model" in result.output
    assert budget.split(" = ")[0].split(" ")[0] in result.output


def test_cuda_decoding_is_refused_with_a_reason_where_there_is_no_gpu(tmp_path, optitool_text_folder):
    """The CUDA paths (IO binding on the GPU) are unmeasured until a GPU is lent; here they must refuse
    clearly rather than fall back to the CPU and report its numbers as the GPU's."""
    import onnxruntime as ort
    import torch

    from optitool.bench.runtimes import OnnxRuntime, TorchEager
    from optitool.testing import tiny_causal_lm_dir

    if torch.cuda.is_available() or "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    assert "install onnxruntime-gpu" in OnnxRuntime().unavailable("cuda")
    assert "no CUDA GPU" in TorchEager().unavailable("cuda")
    folder = tiny_causal_lm_dir(tmp_path / "lm", family="gpt2", train_steps=1)
    result = run_snippet(lm_snippet(folder, optitool_text_folder, '[[passes]]\npass = "onnx_export"\n'), tmp_path)
    with pytest.raises(RunError, match="no CUDAExecutionProvider"):
        optitool.open_decoder(result.run_dir / "01-onnx_export" / "model.onnx", device="cuda")


@pytest.mark.parametrize("texts", [["the market rose", "sharply today"], ["", ""]])
def test_eval_text_shorter_than_one_block_is_refused_not_scored_as_random_tokens(tmp_path, optitool_tiny_causal_lm,
                                                                                 texts):
    from click.testing import CliRunner

    from optitool.cli import cli

    folder = tmp_path / "short"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i, text in enumerate(texts):
            (folder / label / f"{i}.txt").write_text(text)
    (tmp_path / "p.toml").write_text(lm_snippet(optitool_tiny_causal_lm, folder, ""))
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "p.toml"), "-o", str(tmp_path / "run"), "--no-benchmark"])
    assert result.exit_code == 2, result.output
    assert "'eval' split holds" in result.output and "less than one block of 16 tokens" in result.output
    assert not (tmp_path / "run" / "report.json").exists()
