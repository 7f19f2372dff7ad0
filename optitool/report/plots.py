"""PNG plots for a run: latency against quality (one panel per measured shape, Pareto front marked), and
size and latency per stage. Labels are placed so that they overlap neither each other, nor the points,
nor the edge of the panel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optitool.report.table import quality_key

# Where a label may sit relative to its point (offset in points, horizontal alignment), in order of taste.
LABEL_SPOTS = [((7, 5), "left"), ((7, -13), "left"), ((-7, 5), "right"), ((-7, -13), "right"),
               ((0, 11), "center"), ((0, -20), "center"), ((12, 16), "left"), ((-12, 16), "right"),
               ((12, -26), "left"), ((-12, -26), "right")]


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both latency (lower) and quality (higher)."""
    front = []
    for i, (lat, q) in enumerate(points):
        if not any((l2 <= lat and q2 >= q) and (l2 < lat or q2 > q) for j, (l2, q2) in enumerate(points) if j != i):
            front.append(i)
    return front


def _overlap(a: Any, b: Any) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(0.0, width) * max(0.0, height)


def place_labels(ax: Any, points: list[tuple[float, float]], labels: list[str]) -> list[Any]:
    """Annotate each point at the first spot where its label overlaps no other label, no point marker and
    stays inside the axes; where none is free, the spot with the least overlap. Returns the annotations."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    markers = []
    for x, y in points:
        px, py = ax.transData.transform((x, y))
        markers.append(Bbox.from_extents(px - 5, py - 5, px + 5, py + 5))
    placed: list[Any] = []
    annotations = []
    for (x, y), text in zip(points, labels, strict=True):
        best = None
        for offset, align in LABEL_SPOTS:
            note = ax.annotate(text, (x, y), textcoords="offset points", xytext=offset, ha=align, fontsize=8,
                               arrowprops={"arrowstyle": "-", "lw": 0.6, "color": "0.45", "shrinkA": 0, "shrinkB": 4})
            box = note.get_window_extent(renderer).expanded(1.05, 1.15)
            outside = box.width * box.height - _overlap(box, frame)
            cost = sum(_overlap(box, other) for other in placed + markers) + 10 * outside
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, note, box)
            else:
                note.remove()
            if cost == 0:
                break
        assert best is not None
        placed.append(best[2])
        annotations.append(best[1])
    return annotations


def _by_shape(stages: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """shape -> stage name -> its fastest measurement at that shape (any runtime)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for s in stages:
        for b in s.get("benchmarks", []):
            current = out.setdefault(b["shape"], {}).get(s["name"])
            if current is None or b["median_ms"] < current["median_ms"]:
                out[b["shape"]][s["name"]] = b
    return out


def write_plots(report: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    stages = report.get("stages", [])
    written = []
    key = quality_key(report)
    label = {"accuracy": "accuracy", "perplexity": "perplexity (lower is better)"}.get(
        key, "fidelity (cosine to the baseline)")
    shapes = _by_shape(stages)
    quality = {s["name"]: s.get("metrics", {}).get(key) for s in stages}
    panels = [(shape, [(b["median_ms"], quality[name], name, b["runtime"]) for name, b in measured.items()
                       if quality.get(name) is not None]) for shape, measured in shapes.items()]
    panels = [(shape, pts) for shape, pts in panels if pts]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
        for ax, (shape, pts) in zip(axes[0], panels, strict=True):
            sign = -1.0 if key == "perplexity" else 1.0  # the front wants higher quality
            front = set(pareto([(p[0], sign * p[1]) for p in pts]))
            for i, (lat, q, _, _) in enumerate(pts):
                ax.scatter(lat, q, s=40, color="tab:red" if i in front else "tab:gray", zorder=3)
            fp = sorted((pts[i][0], pts[i][1]) for i in front)
            ax.plot([p[0] for p in fp], [p[1] for p in fp], "--", color="tab:red", label="Pareto front")
            ax.margins(x=0.25, y=0.2)
            ax.set_xlabel(f"median latency (ms), shape {shape}")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right", fontsize=8)
            ax.set_title(f"shape {shape}", fontsize=10)
        fig.suptitle(f"{report.get('name', '')}: latency vs {label.split(' ')[0]}")
        fig.tight_layout()
        for ax, (_, pts) in zip(axes[0], panels, strict=True):
            place_labels(ax, [(p[0], p[1]) for p in pts], [f"{p[2]} ({p[3]})" for p in pts])
        path = folder / "latency_vs_quality.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if stages:
        names = [s["name"] for s in stages]
        fig, axes = plt.subplots(1, 1 + len(shapes), figsize=(4.6 * (1 + len(shapes)), 4), squeeze=False)
        a1 = axes[0][0]
        a1.bar(names, [s["metrics"].get("size_bytes", 0) / 1e6 for s in stages], color="tab:blue")
        a1.set_ylabel("size (MB)")
        a1.set_title("size per stage")
        for ax, (shape, measured) in zip(axes[0][1:], shapes.items(), strict=True):
            shown = [n for n in names if n in measured]  # a stage no runtime measured gets no bar
            ax.bar([f"{n}\n{measured[n]['runtime']}" for n in shown], [measured[n]["median_ms"] for n in shown],
                   yerr=[measured[n].get("mad_ms", measured[n].get("std_ms", 0.0)) for n in shown], capsize=4,
                   color="tab:orange")
            ax.set_ylabel("median latency (ms) ± MAD")
            ax.set_title(f"latency per stage, shape {shape}")
        for ax in axes[0]:
            ax.tick_params(axis="x", rotation=30, labelsize=8)
        fig.tight_layout()
        path = folder / "size_latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
