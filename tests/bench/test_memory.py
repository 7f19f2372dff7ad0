from __future__ import annotations

import torch

from optitool.bench.memory import measure_in_subprocess, peak_mb, rss_mb
from optitool.testing import tiny_mlp


def test_the_probe_measures_its_own_process_not_the_parents(tmp_path):
    path = tmp_path / "m.onnx"
    torch.onnx.export(tiny_mlp().eval(), (torch.randn(2, 16),), str(path), input_names=["x"], dynamo=False)
    ballast = torch.ones(600 * 2**20, dtype=torch.uint8)  # this process now holds 600 MB more than the probe needs
    parent = rss_mb()
    result = measure_in_subprocess({"runtime": "onnxruntime", "device": "cpu", "threads": 1, "artifact": "onnx",
                                    "path": str(path)}, {"x": torch.randn(2, 16)})
    assert ballast.sum() > 0
    assert 0 < result["peak_rss_mb"] < parent - 400, (result, parent)
    assert peak_mb({"memory": result}) == result["peak_rss_mb"]
    assert peak_mb({"memory": {"error": "x"}}) is None


def test_memory_readings_need_neither_proc_nor_the_resource_module(monkeypatch):
    """Windows has no /proc and no `resource` module: the readings fall back to psutil."""
    import builtins
    import importlib
    import sys

    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/self"):  # what optitool read itself (psutil reads /proc/<pid>)
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setitem(sys.modules, "resource", None)  # `import resource` now fails, as on Windows
    monkeypatch.setattr(builtins, "open", no_proc)
    from optitool.bench import memory

    reloaded = importlib.reload(memory)
    assert reloaded.rss_mb() > 10 and reloaded.high_water_mb() > 10
