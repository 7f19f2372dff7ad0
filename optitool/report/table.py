"""The stage table: what a user reads first, the same on the terminal (rich) and in report.md.

One row per stage and runtime; per shape the median latency with its robust spread (scaled MAD) and the
speedup over the baseline with its 95 % interval; the stage's flags are counted in the row and spelled
out below the table. Everything else (p90/p99, std, memory, load, samples) stays in report.json.
"""

from __future__ import annotations

from typing import Any

QUALITY_KEYS = ("accuracy", "perplexity", "fidelity")


def _shapes(report: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for stage in report.get("stages", []):
        for b in stage.get("benchmarks", []):
            if b["shape"] not in seen:
                seen.append(b["shape"])
    return seen


def _runtimes(stage: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(b["runtime"] for b in stage.get("benchmarks", []))) or ["-"]


def quality_key(report: dict[str, Any]) -> str:
    """Accuracy when any stage has it (labelled data and a classifier), perplexity for a causal language
    model, fidelity otherwise."""
    stages = report.get("stages", [])
    return next((k for k in QUALITY_KEYS if any(s.get("metrics", {}).get(k) is not None for s in stages)),
                "fidelity")


def fmt_ratio(value: float) -> str:
    """Two decimals where they matter (0.97x, 1.55x), three significant digits beyond (12.4x, 347x): a
    ratio measured on a busy machine must not widen the column until stage names no longer fit."""
    return f"{value:.2f}" if value < 10 else f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def fmt_ms(value: float) -> str:
    """Milliseconds with the digits that mean something at that size."""
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _quality(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    if value is None:
        return "-"
    if key == "accuracy":
        return f"{value:.2%}"
    return f"{value:.3f}" if key == "perplexity" else f"{value:.4f}"


def stage_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    shapes, quality = _shapes(report), quality_key(report)
    header = ["stage", "kind", "runtime", "size MB", quality]
    for shape in shapes:
        header += [f"{shape} ms", "speedup"]
    header.append("flags")
    rows = []
    for stage in report.get("stages", []):
        m = stage.get("metrics", {})
        by_key = {(b["runtime"], b["shape"]): b for b in stage.get("benchmarks", [])}
        for i, runtime in enumerate(_runtimes(stage)):
            first = i == 0
            size = m.get("size_bytes")
            row = [stage["name"] if first else "", stage["kind"] if first else "", runtime,
                   (f"{size / 1e6:.1f}" if size is not None else "-") if first else "",
                   _quality(m, quality) if first else ""]
            for shape in shapes:
                b = by_key.get((runtime, shape))
                if b is None:
                    row += ["-", "-"]
                    continue
                spread = b.get("mad_ms", b.get("std_ms", 0.0))
                sp = b.get("speedup_vs_baseline")
                row += [f"{fmt_ms(b['median_ms'])} ±{fmt_ms(spread)}",
                        "-" if not sp else f"{fmt_ratio(sp['ratio'])}x [{fmt_ratio(sp['low'])}-{fmt_ratio(sp['high'])}]"]
            flags = len(stage.get("flags", [])) if first else 0
            row.append(f"!{flags}" if flags else "")
            rows.append(row)
    return header, rows


def task_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """lm-eval task scores: one row per scored stage; per task its main metric ± standard error, and the
    change from the baseline on the same items with its paired 95 % interval ('worse' when the interval lies
    wholly on the worse side of 0)."""
    stages = [s for s in report.get("stages", []) if s.get("tasks")]
    tasks: list[str] = list(dict.fromkeys(t for s in stages for t in s["tasks"]))
    if not tasks:
        return [], []
    header = ["stage"]
    for task in tasks:
        metric = next((s["tasks"][task]["main_metric"] for s in stages if task in s["tasks"]), None) or "score"
        header += [f"{task} {metric}", "vs baseline"]
    rows = []
    for stage in stages:
        row = [stage["name"]]
        for task in tasks:
            scores = stage["tasks"].get(task)
            metric = scores and scores["main_metric"]
            if not metric or metric not in scores["metrics"]:
                row += ["-", "-"]
                continue
            error = scores["stderr"].get(metric)
            row.append(f"{scores['metrics'][metric]:.3f}" + (f" ±{error:.3f}" if error is not None else ""))
            change = stage.get("task_changes", {}).get(task)
            row.append("-" if change is None else
                       f"{change['difference']:+.3f} [{change['low']:+.3f}, {change['high']:+.3f}]"
                       + (" worse" if change["significantly_worse"] else ""))
        rows.append(row)
    return header, rows


def footnotes(report: dict[str, Any]) -> list[str]:
    """The flags, skipped runtimes and budget lines that go below the table (identical flags of several
    stages, such as a busy machine, are said once)."""
    by_message: dict[str, list[str]] = {}
    for stage in report.get("stages", []):
        for flag in stage.get("flags", []):
            by_message.setdefault(flag, []).append(stage["name"])
        for skipped in stage.get("benchmark_skipped", []):
            by_message.setdefault(f"{skipped['runtime']} not run: {skipped['reason']}", []).append(stage["name"])
    return [f"! {', '.join(names)}: {message}" for message, names in by_message.items()]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    escape = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in escape]
    return "\n".join(lines)


def terminal_table(report: dict[str, Any], width: int | None = None) -> str:
    """The table and its footnotes as text for a terminal of `width` columns (the console's by default)."""
    import io

    from rich import box
    from rich.console import Console
    from rich.table import Table

    header, rows = stage_rows(report)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0), show_edge=False)  # 2 spaces apart
    numeric = {"size MB", " ms", "speedup", *QUALITY_KEYS}
    for name in header:
        table.add_column(name, justify="right" if any(n in name for n in numeric) else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    buffer = io.StringIO()
    if width is None:  # the terminal's width; unbounded enough for a CI log, where nothing must be cropped
        terminal = Console()
        width = terminal.width if terminal.is_terminal else 200
    console = Console(file=buffer, width=width, highlight=False, color_system=None)
    console.print(table)
    task_header, task_table = task_rows(report)
    if task_table:
        tasks = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0), show_edge=False)
        for i, name in enumerate(task_header):
            tasks.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
        for row in task_table:
            tasks.add_row(*row)
        console.print(tasks)
    for line in footnotes(report):
        console.print(line, markup=False)
    return "\n".join(line.rstrip() for line in buffer.getvalue().rstrip("\n").splitlines())


def budget_lines(budget: dict[str, Any] | None) -> list[str]:
    if not budget:
        return []
    head = f"budget ({budget['stage']}): {'PASSED' if budget['passed'] else 'FAILED'}"
    return [head] + [("  ok   " if c["passed"] else "  FAIL ") + c["message"] for c in budget["checks"]]
