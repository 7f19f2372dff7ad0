"""report.md: the stage table, the budget verdict and the environment, for people and CI summaries."""

from __future__ import annotations

from typing import Any

from optitool.report.table import budget_lines, footnotes, markdown_table, stage_rows, task_rows


def render(report: dict[str, Any]) -> str:
    env = report.get("environment", {})
    header, rows = stage_rows(report)
    parts = [f"# optitool run: {report.get('name', '')}", "",
             f"Status: **{report.get('status', '?')}** on `{report.get('device', '?')}`. "
             "Latency is the median ± scaled median absolute deviation of iterations interleaved across every "
             "stage and runtime of a shape; speedup is vs the baseline with a 95 % bootstrap interval. "
             "Everything else (p90, p99, memory, machine load, samples) is in report.json.", "",
             markdown_table(header, rows), ""]
    task_header, tasks = task_rows(report)
    if tasks:
        parts += ["## lm-eval tasks", "",
                  "Main metric ± its standard error; vs baseline: the change on the same items with its paired "
                  "95 % bootstrap interval (worse: the whole interval is on the worse side of 0).", "",
                  markdown_table(task_header, tasks), ""]
    notes = footnotes(report)
    if notes:
        parts += ["## Flags", ""] + [f"- {line.removeprefix('! ')}" for line in notes] + [""]
    if report.get("error"):
        parts += [f"**Error:** {report['error']}", ""]
    lines = budget_lines(report.get("budget"))
    if lines:
        parts += ["## Budget", "", lines[0], ""] + [f"- {line.strip()}" for line in lines[1:]] + [""]
    notes = [(s["name"], n) for s in report.get("stages", []) for b in s.get("benchmarks", []) for n in b.get("notes", [])]
    if notes:
        parts += ["## Runtime notes", ""] + [f"- {name}: {note}" for name, note in dict.fromkeys(notes)] + [""]
    keys = ("cpu", "cpu_count", "torch_threads", "gpu", "driver", "cuda", "python", "torch", "onnxruntime",
            "onnx", "transformers", "optimum", "optitool")
    parts += ["## Environment", "", "| | |", "|---|---|"]
    parts += [f"| {k} | {env[k]} |" for k in keys if env.get(k) is not None]
    return "\n".join(parts) + "\n"
