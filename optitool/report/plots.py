"""PNG plots for a run: latency against quality with the Pareto front, and size and latency per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _quality(stage: dict[str, Any]) -> tuple[str, float | None]:
    m = stage.get("metrics", {})
    if m.get("accuracy") is not None:
        return "accuracy", m["accuracy"]
    return "fidelity (cosine to baseline)", m.get("fidelity")


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both latency (lower) and quality (higher)."""
    front = []
    for i, (lat, q) in enumerate(points):
        if not any((l2 <= lat and q2 >= q) and (l2 < lat or q2 > q) for j, (l2, q2) in enumerate(points) if j != i):
            front.append(i)
    return front


def write_plots(report: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    stages = report.get("stages", [])
    written = []
    # The largest shape measured on each stage's first runtime is the one plotted.
    latency = {}
    for s in stages:
        if s.get("benchmarks"):
            b = max(s["benchmarks"], key=lambda b: (b["batch_size"], b.get("sequence_length") or 0))
            latency[s["name"]] = (b["median_ms"], b["std_ms"], f"{b['runtime']} {b['shape']}")
    label, _ = _quality(stages[0]) if stages else ("fidelity", None)
    pts = [(latency[s["name"]][0], _quality(s)[1], s["name"]) for s in stages
           if s["name"] in latency and _quality(s)[1] is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        front = set(pareto([(p[0], p[1]) for p in pts]))
        for i, (lat, q, name) in enumerate(pts):
            ax.scatter(lat, q, s=60, color="tab:red" if i in front else "tab:gray", zorder=3)
            ax.annotate(f"{name} ({latency[name][2].split(' ')[0]})", (lat, q), textcoords="offset points",
                        xytext=(6, 4), fontsize=9)
        fp = sorted((pts[i][0], pts[i][1]) for i in front)
        ax.plot([p[0] for p in fp], [p[1] for p in fp], "--", color="tab:red", label="Pareto front")
        ax.set_xlabel(f"median latency (ms), batch shape {next(iter(latency.values()))[2].split(' ')[1]}")
        ax.set_ylabel(label)
        ax.set_title(f"{report.get('name', '')}: latency vs {label.split(' ')[0]}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = folder / "latency_vs_quality.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if stages:
        names = [s["name"] for s in stages]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        a1.bar(names, [s["metrics"].get("size_bytes", 0) / 1e6 for s in stages], color="tab:blue")
        a1.set_ylabel("size (MB)")
        a1.set_title("size per stage")
        measured = [n for n in names if n in latency]  # a stage no runtime measured gets no bar
        a2.bar([f"{n}\n{latency[n][2].split(' ')[0]}" for n in measured], [latency[n][0] for n in measured],
               yerr=[latency[n][1] for n in measured], capsize=4, color="tab:orange")
        a2.set_ylabel("median latency (ms) ± std")
        a2.set_title("latency per stage" + (f", shape {next(iter(latency.values()))[2].split(' ')[1]}"
                                            if latency else ": not measured"))
        for ax in (a1, a2):
            ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        path = folder / "size_latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
