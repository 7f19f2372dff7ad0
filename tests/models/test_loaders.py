from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from optitool.errors import ConfigError
from optitool.models.loaders import LOADERS
from optitool.spec import ModelSpec
from optitool.testing import tiny_mlp


def load(source: str, tmp_path: Path, **kwargs):
    spec = ModelSpec(source=source, **kwargs)
    LOADERS[source].validate(spec, tmp_path, "test")
    return LOADERS[source].load(spec, tmp_path)


def test_hf_folder_with_tokenizer_and_task(tmp_path, optitool_tiny_bert):
    artifact = load("hf", tmp_path, path=str(optitool_tiny_bert))
    assert artifact.tokenizer is not None and "input_ids" in artifact.input_names
    assert artifact.origin["path"] == str(optitool_tiny_bert.resolve())
    classifier = load("hf", tmp_path, path=str(optitool_tiny_bert), task="text-classification", num_labels=3)
    assert classifier.module.config.num_labels == 3


def test_hf_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load("hf", tmp_path, path=str(tmp_path))
    with pytest.raises(ConfigError, match="task = 'dance'"):
        load("hf", tmp_path, name="x/y", task="dance")


def test_python_factory_with_safetensors_and_torch_checkpoints(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "zoo.py").write_text("from optitool.testing import tiny_mlp\n\ndef make():\n    return tiny_mlp()\n")
    trained = tiny_mlp()
    with torch.no_grad():
        trained[0].weight.fill_(0.5)
    save_file(trained.state_dict(), tmp_path / "w.safetensors")
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        artifact = load("python", tmp_path, factory="zoo:make", checkpoint=name)
        assert float(artifact.module[0].weight.mean()) == 0.5


def test_file_factory_path(tmp_path):
    (tmp_path / "m.py").write_text("from optitool.testing import tiny_mlp as make\n")
    assert isinstance(load("python", tmp_path, factory="m.py:make").module, torch.nn.Sequential)


def test_pickled_objects_are_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "zoo.py").write_text("from optitool.testing import tiny_mlp as make\n")
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(ConfigError, match="never unpickles arbitrary objects") as caught:
        load("python", tmp_path, factory="zoo:make", checkpoint="evil.pt")
    assert "weights_only=False" not in str(caught.value)  # torch's advice would run the file's code


def test_mismatched_checkpoint_is_refused(tmp_path):
    (tmp_path / "zoo.py").write_text("from optitool.testing import tiny_mlp as make\n")
    torch.save({"other.weight": torch.zeros(2)}, tmp_path / "w.pt")
    with pytest.raises(ConfigError, match="does not fit the model"):
        load("python", tmp_path, factory="zoo:make", checkpoint="w.pt")


def test_torchscript_exported_program_and_onnx_files(tmp_path):
    model, x = tiny_mlp().eval(), torch.randn(2, 16)
    torch.jit.trace(model, x).save(str(tmp_path / "m.ts"))
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "m.pt2"))
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), input_names=["x"], dynamo=False)
    for source, name in (("torchscript", "m.ts"), ("exported_program", "m.pt2")):
        artifact = load(source, tmp_path, path=name, inputs={"x": ["batch", 16]})
        assert torch.allclose(artifact.module(x), model(x), atol=1e-6)
    onnx_artifact = load("onnx", tmp_path, path="m.onnx")
    assert onnx_artifact.kind == "onnx" and onnx_artifact.input_names == ["x"]


def test_torchvision_without_torchvision_is_a_clear_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        assert load("torchvision", tmp_path, name="resnet18").module is not None
        return
    with pytest.raises(ConfigError, match="pip install torchvision"):
        load("torchvision", tmp_path, name="resnet18")


def test_missing_paths_are_config_errors(tmp_path):
    for source in ("torchscript", "onnx", "exported_program", "stage"):
        with pytest.raises(ConfigError, match="does not exist"):
            load(source, tmp_path, path="nothing-here")
