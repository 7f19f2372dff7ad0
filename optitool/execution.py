"""Run a model artifact on a batch of inputs and give its main output as one comparable tensor.

Evaluation and verification compare stages of different kinds (torch, onnx), so both go through here:
the main output (logits, else the last hidden state, else the first output), mean-pooled over the
attention mask when it has a sequence axis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from optitool.artifacts import ModelArtifact, OnnxModel, TorchModel

if TYPE_CHECKING:
    import torch

PREFERRED_OUTPUTS = ("logits", "last_hidden_state", "pooler_output")


def call_module(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    """Call a module by input name when its forward takes those names, positionally otherwise
    (nn.Sequential and most vision models take one unnamed tensor)."""
    import inspect

    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # TorchScript modules may hide their signature
        params = {}
    by_name = any(p.kind is p.VAR_KEYWORD for p in params.values()) or all(k in params for k in inputs)
    return module(**inputs) if by_name and params else module(*inputs.values())


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The floating dtype a module computes in (its first floating parameter or buffer), float32 if none."""
    import torch

    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def inputs_for(module: torch.nn.Module, inputs: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """Inputs moved to `device`, floating ones in the module's own dtype: a pass may leave a model in
    float16 or bfloat16, and feeding it float32 fails (`mat1 and mat2 must have the same dtype`)."""
    dtype = module_dtype(module)
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}


def main_output(output: Any) -> tuple[str, torch.Tensor]:
    """(name, tensor) of the output a user cares about from whatever a torch model returned."""
    if hasattr(output, "keys") and not hasattr(output, "shape"):
        keys = list(output.keys())
        for name in PREFERRED_OUTPUTS:
            if name in keys and output[name] is not None:
                return name, output[name]
        return keys[0], output[keys[0]]
    if isinstance(output, tuple | list):
        return "output", output[0]
    return "output", output


def pooled(tensor: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, features]: masked mean over the sequence axis for 3-D outputs, flattened otherwise."""
    import torch

    tensor = torch.as_tensor(tensor).float()
    if tensor.dim() == 3 and attention_mask is not None:
        mask = torch.as_tensor(attention_mask).to(tensor.dtype).unsqueeze(-1)
        return (tensor * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return tensor.reshape(tensor.shape[0], -1) if tensor.dim() != 2 else tensor


class Executor:
    """Runs one artifact on CPU (or the given device for torch) for evaluation, not for timing."""

    def __init__(self, artifact: ModelArtifact, device: str = "cpu") -> None:
        self.artifact, self.device = artifact, device
        self._session = None
        if isinstance(artifact, OnnxModel):
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            self._session = ort.InferenceSession(str(artifact.path), options, providers=["CPUExecutionProvider"])
            self._input_names = [i.name for i in self._session.get_inputs()]
            self._output_names = [o.name for o in self._session.get_outputs()]
            from optitool.onnx_decoding import kv_layout

            self._kv = kv_layout(self._session, artifact.path)  # a with-past decoder gets an empty cache

    def raw(self, inputs: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
        import torch

        if self._session is not None:
            feed = {k: v.detach().cpu().numpy() for k, v in inputs.items() if k in self._input_names}
            if self._kv is not None and "input_ids" in feed:
                from optitool.onnx_decoding import complete_feed

                feed = complete_feed(self._kv, feed)
            missing = [n for n in self._input_names if n not in feed]
            if missing:
                from optitool.errors import RunError

                raise RunError(f"the ONNX model {self.artifact.path} needs inputs {missing} that the data does not give")
            outputs = self._session.run(None, feed)
            names = self._output_names
            index = next((names.index(n) for n in PREFERRED_OUTPUTS if n in names), 0)
            return names[index], torch.from_numpy(outputs[index])
        assert isinstance(self.artifact, TorchModel)
        module = self.artifact.module
        with torch.inference_mode():
            name, value = main_output(call_module(module, inputs_for(module, inputs, self.device)))
        return name, value.detach().float().cpu()

    def __call__(self, inputs: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
        name, value = self.raw(inputs)
        if name == "logits":
            return name, value.reshape(value.shape[0], -1) if value.dim() > 2 else value
        return name, pooled(value, inputs.get("attention_mask"))
