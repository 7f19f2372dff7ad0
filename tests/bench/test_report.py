from __future__ import annotations

from optitool.report.markdown import render
from optitool.report.plots import pareto, write_plots
from tests.bench.test_budget_compare import report


def test_markdown_has_the_stage_table_and_environment():
    r = {**report(100), "name": "demo", "status": "finished", "device": "cpu",
         "environment": {"cpu": "Test CPU", "torch": "2.x"}}
    for stage in r["stages"]:
        stage.update(kind="onnx", benchmarks=[{**b, "std_ms": 1.0, "p90_ms": 2.0, "batch_size": 8,
                                                "sequence_length": 128} for b in stage["benchmarks"]])
    text = render(r)
    assert "| stage | kind | runtime | size MB | accuracy | 8x128 ms | speedup | flags |" in text
    assert "| int8 |" in text and "Test CPU" in text


def test_pareto_front():
    assert pareto([(10, 0.9), (5, 0.8), (20, 0.85)]) == [0, 1]


def test_plots_are_written(tmp_path):
    r = {**report(100), "name": "demo"}
    for stage in r["stages"]:
        stage["benchmarks"] = [{**b, "std_ms": 1.0, "batch_size": 8, "sequence_length": 128}
                               for b in stage["benchmarks"]]
    paths = write_plots(r, tmp_path)
    assert {p.name for p in paths} == {"latency_vs_quality.png", "size_latency.png"}
    assert all(p.stat().st_size > 1000 for p in paths)


def test_plot_labels_do_not_overlap_and_stay_inside(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from optitool.report.plots import place_labels

    fig, ax = plt.subplots(figsize=(5, 4))
    points = [(100.0, 1.0), (101.0, 0.999), (99.0, 0.998), (250.0, 0.99), (252.0, 0.991), (400.0, 1.0)]
    ax.scatter([p[0] for p in points], [p[1] for p in points])
    ax.margins(x=0.25, y=0.2)
    fig.tight_layout()
    notes = place_labels(ax, points, ["baseline (torch_eager)", "onnx_export (onnxruntime)", "int8 (onnxruntime)",
                                      "prune (torch_eager)", "distill (torch_eager)", "last (onnxruntime)"])
    renderer = fig.canvas.get_renderer()
    boxes = [n.get_window_extent(renderer) for n in notes]
    frame = ax.get_window_extent(renderer)
    for i, a in enumerate(boxes):
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1, i
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
    plt.close(fig)


def test_every_shape_gets_its_own_latency_panel(tmp_path):
    r = {**report(100), "name": "demo"}
    for stage in r["stages"]:
        first = stage["benchmarks"][0]
        stage["benchmarks"] = [{**first, "shape": shape, "batch_size": b, "sequence_length": 128}
                               for shape, b in (("1x128", 1), ("8x128", 8))]
    write_plots(r, tmp_path)
    from PIL import Image

    width, _ = Image.open(tmp_path / "latency_vs_quality.png").size
    assert width > 1000  # two panels side by side
