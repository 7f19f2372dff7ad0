"""The stage cache as `optitool run --cache` users see it: a second run takes every stage from it with the same
results, a corrupted or partial entry is never used, and a changed setting misses."""

from __future__ import annotations

import json

from click.testing import CliRunner

from optitool.cli import cli

PIPELINE = """
name = "cached"
[model]
source = "python"
factory = "optitool.testing:tiny_mlp"
kwargs = { hidden = 64 }
[model.inputs]
x = ["batch", 16]
[[passes]]
pass = "magnitude_prune"
sparsity = 0.5
[[passes]]
pass = "onnx_export"
[benchmark]
enabled = false
"""


def run(tmp_path, name, *extra):
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "p.toml"), "-o", str(tmp_path / name), "--quiet",
                                      "--cache", str(tmp_path / "cache"), *extra])
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / name / "report.json").read_text())["stages"]


def test_a_second_run_takes_every_stage_from_the_cache_with_the_same_results(tmp_path):
    (tmp_path / "p.toml").write_text(PIPELINE)
    first = run(tmp_path, "a")
    second = run(tmp_path, "b")
    assert [s.get("cached") for s in first[1:]] == [None, None]
    assert [s.get("cached") for s in second[1:]] == [True, True]
    for a, b in zip(first[1:], second[1:], strict=True):
        assert a["metrics"] == b["metrics"]
    assert (tmp_path / "b" / "02-onnx_export" / "model.onnx").read_bytes() == \
        (tmp_path / "a" / "02-onnx_export" / "model.onnx").read_bytes()
    # a changed setting misses from that pass on; the pruned stage's masks are kept with it for later passes
    third = run(tmp_path, "c", "--set", "passes.1.optimize=\"basic\"")
    assert third[1].get("cached") is True and third[2].get("cached") is None
    from safetensors.torch import load_file

    masks = load_file(str(next((tmp_path / "cache").rglob("masks.safetensors"))))
    assert set(masks) == {"0.weight", "2.weight", "4.weight"} and all(m.dtype.is_floating_point is False
                                                                       for m in masks.values())


def test_a_corrupted_or_partial_entry_is_never_used(tmp_path):
    (tmp_path / "p.toml").write_text(PIPELINE)
    run(tmp_path, "a")
    onnx_entry = next(p.parent for p in (tmp_path / "cache").rglob("model.onnx"))
    data = bytearray((onnx_entry / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    (onnx_entry / "model.onnx").write_bytes(bytes(data))
    torch_entry = next(p.parent for p in (tmp_path / "cache").rglob("model.safetensors"))
    (torch_entry / "manifest.json").unlink()  # as a copy killed before its manifest was written
    stages = run(tmp_path, "b")
    assert [s.get("cached") for s in stages[1:]] == [None, None]
    assert run(tmp_path, "c")[2].get("cached") is True  # the entries were rewritten whole
