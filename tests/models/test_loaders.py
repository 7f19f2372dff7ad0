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


def test_a_checkpoint_of_a_wider_model_is_refused_naming_the_tensor(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "zoo.py").write_text("from optitool.testing import tiny_mlp as make\n")
    save_file(tiny_mlp(hidden=64).state_dict(), str(tmp_path / "wide.safetensors"))
    with pytest.raises(ConfigError) as caught:
        load("python", tmp_path, factory="zoo:make", checkpoint="wide.safetensors")
    message = str(caught.value)
    assert "wide.safetensors" in message and "'0.weight' has shape [64, 16] in the checkpoint but [32, 16]" in message


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_safetensors_checkpoint_names_the_file(tmp_path, damage):
    from safetensors.torch import save_file

    (tmp_path / "zoo.py").write_text("from optitool.testing import tiny_mlp as make\n")
    path = tmp_path / "w.safetensors"
    save_file(tiny_mlp().state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 50)
    with pytest.raises(ConfigError, match=r"checkpoint .*w\.safetensors could not be read: .*corrupt"):
        load("python", tmp_path, factory="zoo:make", checkpoint="w.safetensors")


def test_a_truncated_onnx_file_names_the_file(tmp_path):
    torch.onnx.export(tiny_mlp().eval(), (torch.randn(2, 16),), str(tmp_path / "m.onnx"), input_names=["x"],
                      dynamo=False)
    data = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "m.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(ConfigError, match=r"ONNX file .*m\.onnx could not be read"):
        load("onnx", tmp_path, path="m.onnx")


def test_a_hugging_face_folder_with_pickled_objects_is_refused_without_unsafe_advice(tmp_path, optitool_tiny_bert):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for weights in optitool_tiny_bert.glob("*.safetensors"):
        weights.unlink()
    (optitool_tiny_bert / "pytorch_model.bin").write_bytes(pickle.dumps({"bert.embeddings": Evil()}))
    with pytest.raises(ConfigError) as caught:
        load("hf", tmp_path, path=str(optitool_tiny_bert))
    message = str(caught.value)
    assert "pytorch_model.bin" in message and "never unpickles" in message
    assert "weights_only=False" not in message


def test_a_corrupt_hugging_face_weights_file_names_the_file(tmp_path, optitool_tiny_bert):
    weights = next(optitool_tiny_bert.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ConfigError, match=rf"{weights.name} could not be read"):
        load("hf", tmp_path, path=str(optitool_tiny_bert))


def test_a_shallow_and_narrower_stage_reloads_from_its_recorded_structure(tmp_path):
    """Reloading must not depend on reshaping layers to fit a state dict: the stage records its structure."""
    import json

    from optitool.models.store import save_artifact
    from optitool.spec import ModelSpec as Spec

    (tmp_path / "listzoo.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(4)]),"
        " torch.nn.Linear(8, 3))\n")
    artifact = load("python", tmp_path, factory="listzoo:make")
    module = artifact.module
    del module[0][2:]  # a shallower copy keeps two layers
    module[1] = torch.nn.Linear(8, 2)  # and a narrower head
    save_artifact(artifact, tmp_path / "stage")
    meta = json.loads((tmp_path / "stage" / "model.json").read_text())
    assert meta["structure"]["layer_lists"] == {"0": 2} and meta["structure"]["weights"]["1"] == [2, 8]
    again = LOADERS["stage"].load(Spec(source="stage", path=str(tmp_path / "stage")), tmp_path)
    assert len(again.module[0]) == 2 and again.module[1].weight.shape == (2, 8)
    assert torch.equal(again.module[1].weight, module[1].weight)


def test_a_gguf_file_loads_as_the_causal_lm_it_holds(tmp_path):
    import transformers

    from optitool.testing import tiny_gguf_file

    path = tiny_gguf_file(tmp_path / "tiny.gguf", train_steps=5)
    artifact = load("gguf", tmp_path, path="tiny.gguf")
    original = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-hf")
    ids = torch.tensor([[5, 9, 12, 7, 20]])
    with torch.no_grad():
        assert torch.allclose(artifact.module(ids).logits, original(ids).logits, atol=1e-5)
    assert type(artifact.module).__name__ == "LlamaForCausalLM" and artifact.tokenizer is not None
    assert artifact.origin["source"] == "gguf" and artifact.origin["path"] == str(path.resolve())


@pytest.mark.parametrize("damage, fragment", [
    ("garbage", "is not a GGUF file"),
    ("truncate", "GGUF file"),
    ("architecture", "holds a 'notamodel' model, which this transformers cannot load from GGUF"),
])
def test_a_gguf_file_transformers_cannot_load_is_refused_before_loading(tmp_path, damage, fragment):
    import gguf

    from optitool.testing import tiny_gguf_file

    path = tmp_path / "bad.gguf"
    if damage == "garbage":
        path.write_bytes(b"\x00not a model" * 100)
    elif damage == "truncate":
        data = tiny_gguf_file(tmp_path / "ok.gguf", train_steps=1).read_bytes()
        path.write_bytes(data[:200])
    else:
        writer = gguf.GGUFWriter(str(path), "notamodel")
        writer.add_block_count(1)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
    with pytest.raises(ConfigError, match=fragment):
        LOADERS["gguf"].validate(ModelSpec(source="gguf", path=str(path)), tmp_path, "test")


@pytest.mark.parametrize("factory", ["models.py:make", "models:make"])
def test_a_stage_origin_names_the_factory_so_it_loads_from_any_folder(tmp_path, mlp_module, factory, monkeypatch):
    """A search re-measured its front from the origins of the trials' stages, resolved against '/', and a
    pipeline whose factory was a file beside it failed at the very end ("/models.py does not exist")."""
    from optitool.models.loaders import LOADERS
    from optitool.spec import ModelSpec

    spec = ModelSpec(source="python", factory=factory, inputs={"x": {"shape": ["batch", 16]}})
    origin = LOADERS["python"].origin(spec, tmp_path)
    assert origin["factory"] == f"{(tmp_path / 'models.py').resolve()}:make"
    monkeypatch.chdir("/")
    model = LOADERS["python"].load(ModelSpec.model_validate(origin), Path("/"))
    assert type(model.module).__name__ == "Sequential"
