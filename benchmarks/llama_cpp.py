"""llama.cpp as an anchor in the SmolLM2 benchmarks: its GGUF files made with its own tools, run by its own runtime.

llama.cpp is not a dependency of optitool and has no wheel on PyPI: build it once from source (a checkout with
its libraries and tools in build/bin: `cmake -B build -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF
&& cmake --build build --target llama llama-quantize llama-imatrix`, about 10 min on 2 cores; on an Intel CPU
with AMX add `-DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"` and the same CMAKE_CXX_FLAGS: on
this project's Intel Xeon VM the AMX matrix kernel of the vendored llama.cpp crashes (SIGSEGV in
ggml_backend_amx_mul_mat) on the first batch of every file tried: Q4_1, Q4_0, Q4_K_M) and install the
Python binding without building it again (`CMAKE_ARGS="-DLLAMA_BUILD=OFF" pip install --no-deps
llama-cpp-python`); the binding then loads the libraries from build/bin. A float checkpoint is converted with
the checkout's convert_hf_to_gguf.py, its importance matrix computed by llama-imatrix on the same calibration
text optitool's data-aware passes read (the example pipeline's calibration split, the same number of tokens),
and quantized by llama-quantize.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

CALIBRATION_BLOCK, CALIBRATION_BLOCKS = 256, 32  # what the example's gptq pass reads: 32 blocks of 256 tokens
# (label, llama-quantize type, with the importance matrix): its usual 4-bit recipes for a float checkpoint
RECIPES = (("Q4_K_M, imatrix", "Q4_K_M", True), ("Q4_0", "Q4_0", False))


class LlamaCpp:
    """A built llama.cpp checkout: its tools, its converter, and the Python binding pointed at its libraries."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.bin = self.root / "build" / "bin"
        missing = [n for n in ("llama-quantize", "llama-imatrix") if not (self.bin / n).is_file()]
        if missing or not (self.root / "convert_hf_to_gguf.py").is_file():
            raise SystemExit(f"--llama-cpp {root}: expected a llama.cpp checkout with convert_hf_to_gguf.py and "
                             f"build/bin/{{llama-quantize,llama-imatrix}} (missing: {missing or 'the converter'})")
        os.environ["LLAMA_CPP_LIB_PATH"] = str(self.bin)  # read when llama_cpp is first imported

    def run(self, *args: str | Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(self.root / "gguf-py")}
        done = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(str(args[0])).name} failed: {done.stderr.strip()[-800:]}")

    def features(self) -> str:
        """What its CPU backend was built to use (AMX or not, repacking): that decides its speed on this CPU."""
        import llama_cpp

        return " ".join(llama_cpp.llama_print_system_info().decode().split()).strip(" |")

    def make_models(self, hf_folder: Path, calibration_text: str, work: Path, reuse: bool,
                    seconds: dict[str, float]) -> dict[str, Path]:
        """GGUF files for each recipe from a float Hugging Face folder; the time each took goes in `seconds`
        (each step's time is kept beside what it made, so a reused file still reports it)."""
        work.mkdir(parents=True, exist_ok=True)
        f32, imatrix = work / "f32.gguf", work / "imatrix.gguf"
        convert = self._step(f32, reuse, sys.executable, self.root / "convert_hf_to_gguf.py", hf_folder, "--outfile",
                             f32, "--outtype", "f32")
        (work / "calibration.txt").write_text(calibration_text)
        measure = self._step(imatrix, reuse, self.bin / "llama-imatrix", "-m", f32, "-f", work / "calibration.txt",
                             "-o", imatrix, "-c", str(CALIBRATION_BLOCK), "--chunks", str(CALIBRATION_BLOCKS), "-t", "2")
        made = {}
        for label, kind, with_imatrix in RECIPES:
            out = work / f"{kind}{'-imatrix' if with_imatrix else ''}.gguf"
            quantize = self._step(out, reuse, self.bin / "llama-quantize",
                                  *(["--imatrix", imatrix] if with_imatrix else []), f32, out, kind, "2")
            seconds[f"llama.cpp {label}"] = round(convert + (measure if with_imatrix else 0) + quantize, 1)
            made[label] = out
        return made

    def _step(self, made: Path, reuse: bool, *command: str | Path) -> float:
        """Run one tool that writes `made` (unless reused); its wall time, also when reused."""
        record = made.with_name(made.name + ".seconds")
        if not (reuse and made.is_file() and record.is_file()):
            started = time.time()
            self.run(*command)
            record.write_text(f"{time.time() - started:.1f}\n")
        return float(record.read_text())


def llama_runner(path: Path, threads: int, context: int,
                 ) -> tuple[Callable[[np.ndarray, int], tuple[np.ndarray, float, float]], Callable[[np.ndarray], np.ndarray]]:
    """(generate, logits) on a GGUF file in llama.cpp's runtime: greedy generation with its KV cache (ids [1, n]
    -> tokens, seconds to the first token, seconds for the rest), and every position's logits of a sequence."""
    from llama_cpp import Llama

    def open_model(all_logits: bool) -> Any:
        return Llama(model_path=str(path), n_ctx=context, n_batch=context, n_threads=threads,
                     n_threads_batch=threads, logits_all=all_logits, verbose=False)

    generator, scorer = open_model(False), open_model(True)
    vocabulary = generator.n_vocab()

    def next_token() -> int:
        """Greedy pick from the last evaluated position's logits, read in place (without logits_all the binding
        keeps no copy of them)."""
        return int(np.argmax(np.ctypeslib.as_array(generator._ctx.get_logits(), shape=(vocabulary,))))

    def generate(ids: np.ndarray, n: int) -> tuple[np.ndarray, float, float]:
        generator.reset()
        start = time.perf_counter()
        generator.eval(ids[0].tolist())  # the prefill
        token = next_token()
        tokens, first = [token], time.perf_counter()
        for _ in range(n - 1):
            generator.eval([token])
            token = next_token()
            tokens.append(token)
        return np.array([tokens]), first - start, time.perf_counter() - first

    def logits(ids: np.ndarray) -> np.ndarray:
        scorer.reset()
        scorer.eval(ids[0].tolist())
        return np.array(scorer.scores[: ids.shape[1]])

    return generate, logits
