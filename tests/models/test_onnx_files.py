"""Companion files (a runtime's config, the tokenizer) follow a graph only while its interface stays."""

from __future__ import annotations

from pathlib import Path

from optitool.models.onnx_files import carry_companions


def _graph(path: Path, inputs: list[str]) -> Path:
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Identity", [inputs[0]], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_companions_are_carried_when_the_interface_is_unchanged_and_never_overwrite(tmp_path):
    source = _graph(tmp_path / "a" / "model.onnx", ["x", "mask"])
    (source.parent / "genai_config.json").write_text('{"model": {}}')
    (source.parent / "tokenizer.json").write_text("{}")
    (source.parent / "notes.txt").write_text("not a runtime's file")
    same = _graph(tmp_path / "b" / "model.onnx", ["x", "mask"])
    (same.parent / "tokenizer.json").write_text('{"mine": 1}')
    assert carry_companions(source, same) == ["genai_config.json"]
    assert (same.parent / "tokenizer.json").read_text() == '{"mine": 1}'  # the target's own file stays
    assert not (same.parent / "notes.txt").exists()
    changed = _graph(tmp_path / "c" / "model.onnx", ["x"])
    assert carry_companions(source, changed) == [] and not (changed.parent / "genai_config.json").exists()
