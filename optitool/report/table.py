"""One table of stages, the same on the terminal and in report.md (fit for $GITHUB_STEP_SUMMARY)."""

from __future__ import annotations

from typing import Any

from optitool.bench.memory import peak_mb


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _shapes(report: dict[str, Any]) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    for stage in report.get("stages", []):
        for b in stage.get("benchmarks", []):
            key = (b["runtime"], b["shape"])
            if key not in seen:
                seen.append(key)
    return seen


def stage_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["stage", "pass", "kind", "size MB", "params", "sparsity", "accuracy", "fidelity"]
    shapes = _shapes(report)
    for runtime, shape in shapes:
        header += [f"{runtime} {shape} p50 ms", "p90", "speedup"]
    header += ["peak MB", "flags"]
    rows = []
    for stage in report.get("stages", []):
        m = stage.get("metrics", {})
        row = [stage["name"], stage.get("pass") or "-", stage["kind"], _fmt(m.get("size_bytes", 0) / 1e6, 4),
               "-" if m.get("parameters") is None else f"{m['parameters'] / 1e6:.2f} M", _fmt(m.get("sparsity"), 3), _fmt(m.get("accuracy")),
               _fmt(m.get("fidelity"))]
        by_key = {(b["runtime"], b["shape"]): b for b in stage.get("benchmarks", [])}
        peaks = []
        for key in shapes:
            b = by_key.get(key)
            if b is None:
                row += ["-", "-", "-"]
                continue
            sp = b.get("speedup_vs_baseline")
            sp_text = "-" if not sp else f"{sp['ratio']:.2f}x [{sp['low']:.2f}-{sp['high']:.2f}]"
            row += [f"{b['median_ms']:.2f} ± {b['std_ms']:.2f}", f"{b['p90_ms']:.2f}", sp_text]
            if peak_mb(b):
                peaks.append(peak_mb(b))
        row += [_fmt(max(peaks)) if peaks else "-", "; ".join(stage.get("flags", [])) or "-"]
        rows.append(row)
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    escape = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in escape]
    return "\n".join(lines)


def terminal_table(report: dict[str, Any]) -> str:
    header, rows = stage_rows(report)
    header, rows = header[:-1], [r[:-1] for r in rows]  # flags are printed below the table
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    for stage in report.get("stages", []):
        for flag in stage.get("flags", []):
            out.append(f"! {stage['name']}: {flag}")
        for skipped in stage.get("benchmark_skipped", []):
            out.append(f"- {stage['name']}: {skipped['runtime']} not run: {skipped['reason']}")
    return "\n".join(out)


def budget_lines(budget: dict[str, Any] | None) -> list[str]:
    if not budget:
        return []
    head = f"budget ({budget['stage']}): {'PASSED' if budget['passed'] else 'FAILED'}"
    return [head] + [("  ok   " if c["passed"] else "  FAIL ") + c["message"] for c in budget["checks"]]
