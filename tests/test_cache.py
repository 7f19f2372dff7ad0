"""The stage cache as `optitool run --cache` users see it: a second run takes every stage from it with the same
results, a corrupted or partial entry is never used, and a changed setting misses."""

from __future__ import annotations

import json

import pytest
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


# ------------------------------------------------------------------ every input that can change a stage is in its key
LM_PIPELINE = """
name = "lm"
seed = 0
[model]
source = "hf"
path = "lm"
max_length = 16
[data]
source = "folder"
path = "texts"
label_field = ""
splits = {{ calibration = 8, eval = 0.5 }}
[[passes]]
pass = "magnitude_prune"
criterion = "wanda"
sparsity = 0.5
[benchmark]
enabled = false
"""


def test_other_texts_under_the_same_names_are_other_data_and_miss(tmp_path):
    """Reported: a Wanda prune cached, the data folder's texts replaced under the same names, and the second run
    took the prune from the cache with the old stage's perplexity."""
    from optitool.testing import text_folder, tiny_causal_lm_dir

    tiny_causal_lm_dir(tmp_path / "lm", family="gpt2", train_steps=20)
    text_folder(tmp_path / "texts")
    (tmp_path / "p.toml").write_text(LM_PIPELINE.format())
    first, again = run(tmp_path, "a"), run(tmp_path, "b")
    assert first[1].get("cached") is None and again[1].get("cached") is True
    for file in sorted((tmp_path / "texts").rglob("*.txt")):  # same names, other articles
        file.write_text(" ".join(reversed(file.read_text().split())) + " market")
    changed = run(tmp_path, "c")
    assert changed[1].get("cached") is None
    fresh = CliRunner().invoke(cli, ["run", str(tmp_path / "p.toml"), "-o", str(tmp_path / "d"), "--quiet"])
    assert fresh.exit_code == 0, fresh.output
    recomputed = json.loads((tmp_path / "d" / "report.json").read_text())["stages"]
    assert changed[1]["metrics"]["perplexity"] == recomputed[1]["metrics"]["perplexity"]
    assert changed[1]["metrics"]["perplexity"] != first[1]["metrics"]["perplexity"]


FACTORY_PIPELINE = PIPELINE.replace('factory = "optitool.testing:tiny_mlp"\nkwargs = { hidden = 64 }',
                                    'factory = "mymodels:make"')


def test_an_edited_factory_or_data_function_misses(tmp_path):
    from optitool.cache import data_identity

    (tmp_path / "mymodels.py").write_text("from optitool.testing import tiny_mlp\ndef make():\n    return tiny_mlp()\n")
    (tmp_path / "p.toml").write_text(FACTORY_PIPELINE)
    assert run(tmp_path, "a")[1].get("cached") is None
    assert run(tmp_path, "b")[1].get("cached") is True
    (tmp_path / "mymodels.py").write_text("from optitool.testing import tiny_mlp\ndef make():\n"
                                          "    return tiny_mlp(hidden=48)\n")
    assert [s.get("cached") for s in run(tmp_path, "c")[1:]] == [None, None]

    (tmp_path / "rows.py").write_text("def rows():\n    return ['a b c'] * 4\n")
    table = {"source": "python", "function": "rows:rows"}
    before = data_identity(table, tmp_path)
    assert data_identity(table, tmp_path) == before
    (tmp_path / "rows.py").write_text("def rows():\n    return ['a b d'] * 4\n")
    assert data_identity(table, tmp_path) != before


def test_other_library_versions_miss(tmp_path, monkeypatch):
    import optitool.cache

    (tmp_path / "p.toml").write_text(PIPELINE)
    run(tmp_path, "a")
    assert run(tmp_path, "b")[1].get("cached") is True
    real = optitool.cache.library_versions()
    monkeypatch.setattr(optitool.cache, "library_versions", lambda: {**real, "onnxruntime": "0.0.1"})
    assert [s.get("cached") for s in run(tmp_path, "c")[1:]] == [None, None]


def test_an_edited_plugin_misses_though_its_version_is_the_same(tmp_path, monkeypatch):
    plugin = tmp_path / "plugin" / "acme_scale.py"
    plugin.parent.mkdir()
    plugin.write_text(
        "import optitool\n"
        "class Scale(optitool.Pass):\n    name = 'acme.scale'\n    takes = 'torch'\n    gives = 'torch'\n"
        "    def run(self, model, ctx):\n        return model\n"
        "@optitool.hookimpl\ndef optitool_register_passes(registry):\n    registry.add(Scale)\n")
    monkeypatch.syspath_prepend(str(plugin.parent))
    monkeypatch.setenv("OPTITOOL_PLUGINS", "acme_scale")
    (tmp_path / "p.toml").write_text(PIPELINE.replace('pass = "onnx_export"', 'pass = "acme.scale"'))
    run(tmp_path, "a")
    assert [s.get("cached") for s in run(tmp_path, "b")[1:]] == [True, True]
    plugin.write_text(plugin.read_text() + "# edited\n")
    assert [s.get("cached") for s in run(tmp_path, "c")[1:]] == [True, None]


def test_an_edited_stage_record_is_never_used(tmp_path):
    (tmp_path / "p.toml").write_text(PIPELINE)
    run(tmp_path, "a")
    manifest = next((tmp_path / "cache").rglob("model.onnx")).parent / "manifest.json"
    entry = json.loads(manifest.read_text())
    entry["record"]["metrics"]["fidelity"] = 1.0
    manifest.write_text(json.dumps(entry))
    assert run(tmp_path, "b")[2].get("cached") is None


def test_entries_follow_the_umask_like_run_folders(tmp_path):
    import os
    import stat

    (tmp_path / "p.toml").write_text(PIPELINE)
    old = os.umask(0o022)
    try:
        run(tmp_path, "a")
    finally:
        os.umask(old)
    entry = next((tmp_path / "cache").rglob("model.onnx")).parent
    assert stat.S_IMODE(entry.stat().st_mode) == 0o755
    assert stat.S_IMODE((entry / "manifest.json").stat().st_mode) == 0o644


@pytest.mark.slow
def test_two_concurrent_runs_on_one_cache_both_finish_with_identical_entries(tmp_path):
    import subprocess
    import sys

    from optitool.cache import StageCache

    (tmp_path / "p.toml").write_text(PIPELINE)
    command = [sys.executable, "-m", "optitool.cli", "run", str(tmp_path / "p.toml"), "--quiet", "--cache",
               str(tmp_path / "cache"), "-o"]
    both = [subprocess.Popen([*command, str(tmp_path / name)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for name in ("a", "b")]
    for proc in both:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    reports = [json.loads((tmp_path / name / "report.json").read_text())["stages"] for name in ("a", "b")]
    def results(stages):  # the memory a pass took is measured, not computed
        return [{k: v for k, v in s["metrics"].items() if k != "pass_peak_rss_mb"} for s in stages]

    assert results(reports[0]) == results(reports[1])
    manifests = sorted((tmp_path / "cache").rglob("manifest.json"))
    assert len(manifests) == 2 and not list((tmp_path / "cache").rglob("*.partial"))
    cache = StageCache(tmp_path / "cache")
    assert all(cache.lookup(m.parent.name) is not None for m in manifests)
    assert [s.get("cached") for s in run(tmp_path, "c")[1:]] == [True, True]


def test_a_cache_that_is_a_file_is_a_usage_error_and_nothing_is_written(tmp_path):
    (tmp_path / "p.toml").write_text(PIPELINE)
    (tmp_path / "cache").write_text("not a folder")
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "p.toml"), "-o", str(tmp_path / "a"), "--cache",
                                      str(tmp_path / "cache")])
    assert result.exit_code == 2 and "--cache" in result.output and "is a file" in result.output
    assert not (tmp_path / "a").exists()
