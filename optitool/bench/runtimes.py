"""Benchmark runtimes: what executes a stage for timing. Each says plainly when it cannot run here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from optitool.artifacts import ModelArtifact, OnnxModel, TorchModel
from optitool.execution import call_module, inputs_for

# Runs one inference on a batch of named torch tensors and returns once it has finished; it may return
# its own time in ms (CUDA events), else the caller's clock times it.
TimedCall = Callable[[dict[str, Any]], float | None]
# Generates `new_tokens` greedily after a prompt (input_ids, attention_mask); returns the time to the first
# token (the prefill) and the mean time of each further token, both in ms.
GenerateCall = Callable[[dict[str, Any], int], tuple[float, float]]


class Runtime:
    """`prepare` returns a function that runs one inference on a dict of torch tensors and waits for it."""

    name: str = ""
    kinds: tuple[str, ...] = ("torch",)
    devices: tuple[str, ...] = ("cpu", "cuda")

    def unavailable(self, device: str) -> str | None:
        """Why this runtime cannot run on `device` here, or None when it can."""
        return None if device in self.devices else f"{self.name} does not run on {device}"

    def prepare(self, artifact: ModelArtifact, device: str, threads: int) -> TimedCall:  # pragma: no cover
        raise NotImplementedError

    def notes(self) -> list[str]:
        """Anything the report should say about how the model ran (fallbacks, unfused nodes)."""
        return []

    def prepare_generation(self, artifact: ModelArtifact, device: str, threads: int) -> GenerateCall | None:
        """A function generating with this runtime, or None when it cannot generate."""
        return None


def _clock(device: str) -> Callable[[], float]:
    """Seconds, after the device has finished what it was given."""
    import time

    if device != "cuda":
        return time.perf_counter
    import torch

    def synced() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()

    return synced


def _cuda_timed(fn: Any) -> Any:
    import torch

    def run(inputs: Any) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(inputs)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    return run


class TorchEager(Runtime):
    """The model as it is, in the dtype its weights have (a pass may have converted them)."""

    name = "torch_eager"
    dtype: str | None = None  # subclasses convert a copy of the model to this dtype

    def unavailable(self, device: str) -> str | None:
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            return "no CUDA GPU is visible to torch"
        if self.dtype == "float16" and device == "cpu":
            return "fp16 inference is for GPUs; on CPU use torch_eager or torch_bf16"
        return None

    def module_for(self, artifact: TorchModel, device: str) -> Any:
        import torch

        module = artifact.module.to(device)
        if self.dtype is not None:
            import copy

            module = copy.deepcopy(module).to(getattr(torch, self.dtype))
        return module.eval()

    def prepare(self, artifact: ModelArtifact, device: str, threads: int) -> TimedCall:
        import torch

        assert isinstance(artifact, TorchModel)
        if threads:
            torch.set_num_threads(threads)
        module = self.module_for(artifact, device)

        def call(inputs: dict[str, Any]) -> None:
            with torch.inference_mode():
                call_module(module, inputs_for(module, inputs, device))

        return _cuda_timed(call) if device == "cuda" else call


    def prepare_generation(self, artifact: ModelArtifact, device: str, threads: int) -> GenerateCall | None:
        """Greedy decoding with the model's own KV cache, as Hugging Face's generate() runs it."""
        import torch

        from optitool.lm import greedy_with_cache

        assert isinstance(artifact, TorchModel)
        if threads:
            torch.set_num_threads(threads)
        module, clock = self.module_for(artifact, device), _clock(device)

        def generate(prompt: dict[str, Any], new_tokens: int) -> tuple[float, float]:
            done = greedy_with_cache(module, prompt["input_ids"].to(device), new_tokens, clock)
            return done.first_s * 1000, done.rest_s * 1000 / max(1, new_tokens - 1)

        return generate


class TorchFp16(TorchEager):
    name = "torch_fp16"
    dtype = "float16"


class TorchBf16(TorchEager):
    name = "torch_bf16"
    dtype = "bfloat16"


class TorchCompile(TorchEager):
    name = "torch_compile"

    def module_for(self, artifact: TorchModel, device: str) -> Any:
        import torch

        return torch.compile(super().module_for(artifact, device), dynamic=False)

    def prepare_generation(self, artifact: ModelArtifact, device: str, threads: int) -> GenerateCall | None:
        """Not built: compiled decoding needs a static cache (a growing one recompiles every step), and the
        report says this runtime did not generate rather than time recompilation."""
        return None


class OnnxRuntime(Runtime):
    """onnxruntime with the CPU, CUDA or TensorRT execution provider."""

    name = "onnxruntime"
    kinds = ("onnx",)
    provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

    def __init__(self) -> None:
        self._notes: list[str] = []

    def _provider(self, device: str) -> str:
        return self.provider[device]

    def unavailable(self, device: str) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return 'onnxruntime is not installed (pip install "optitool[cpu]", or "optitool[gpu]" for CUDA)'
        wanted = self._provider(device)
        if wanted not in ort.get_available_providers():
            return (f"onnxruntime here has no {wanted} (available: {', '.join(ort.get_available_providers())}); "
                    "install onnxruntime-gpu for CUDA")
        return None

    def _open(self, artifact: OnnxModel, device: str, threads: int) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        # Spinning intra-op threads keep burning the cores after each call and slow whatever is timed next:
        # interleaved with torch eager on 2 cores, they made MiniLM's torch calls 2.5x slower (76 vs 31 ms).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = [self._provider(device)]
        if providers[0] != "CPUExecutionProvider":
            providers.append("CPUExecutionProvider")
        session = ort.InferenceSession(str(artifact.path), options, providers=providers)
        used = session.get_providers()
        self._notes = ["intra-op thread spinning off (it would slow the candidates interleaved with it)"]
        if used[0] != providers[0]:
            self._notes.append(f"onnxruntime fell back to {used[0]} instead of {providers[0]}")
        self._notes += quantization_notes(artifact.path, device)
        return session

    def prepare(self, artifact: ModelArtifact, device: str, threads: int) -> TimedCall:
        from optitool.onnx_decoding import complete_feed, kv_layout

        assert isinstance(artifact, OnnxModel)
        session = self._open(artifact, device, threads)
        names = [i.name for i in session.get_inputs()]
        layout = kv_layout(session, artifact.path)

        def call(inputs: dict[str, Any]) -> None:
            feed = {k: v.numpy() for k, v in inputs.items() if k in names}
            session.run(None, complete_feed(layout, feed) if layout is not None else feed)

        return call

    def notes(self) -> list[str]:
        return list(self._notes)

    def prepare_generation(self, artifact: ModelArtifact, device: str, threads: int) -> GenerateCall | None:
        """Greedy decoding: with the graph's past key/values when it has them (the cache kept in
        onnxruntime between steps), else re-running the whole sequence for every token, which the report
        says."""
        import torch

        from optitool.lm import greedy_without_cache
        from optitool.onnx_decoding import OnnxDecoder, kv_layout

        assert isinstance(artifact, OnnxModel)
        session = self._open(artifact, device, threads)
        layout = kv_layout(session, artifact.path)
        clock = _clock("cpu")  # onnxruntime's run returns once the device has finished
        if layout is not None:
            decoder = OnnxDecoder(session, layout, device)
            self._notes.append("KV cache: the graph's past key/values, kept in onnxruntime between steps "
                               "(IO binding)")

            def generate_with_cache(prompt: dict[str, Any], new_tokens: int) -> tuple[float, float]:
                _, first_s, rest_s = decoder.greedy(prompt["input_ids"].numpy(), new_tokens, clock)
                return first_s * 1000, rest_s * 1000 / max(1, new_tokens - 1)

            return generate_with_cache
        self._notes.append("no KV cache in this graph: every new token re-runs the whole sequence")
        names = [i.name for i in session.get_inputs()]

        def forward(ids: Any, mask: Any) -> Any:
            feed = {k: v.numpy() for k, v in (("input_ids", ids), ("attention_mask", mask)) if k in names}
            return torch.from_numpy(session.run(None, feed)[0])

        def generate(prompt: dict[str, Any], new_tokens: int) -> tuple[float, float]:
            done = greedy_without_cache(forward, prompt["input_ids"], new_tokens)
            return done.first_s * 1000, done.rest_s * 1000 / max(1, new_tokens - 1)

        return generate


class OnnxRuntimeTensorRT(OnnxRuntime):
    name = "onnxruntime_trt"
    provider = {"cuda": "TensorrtExecutionProvider"}
    devices = ("cuda",)

    def unavailable(self, device: str) -> str | None:
        if device != "cuda":
            return "TensorRT runs on CUDA GPUs only"
        return super().unavailable(device)


def quantization_notes(path: Any, device: str) -> list[str]:
    """On GPU, QuantizeLinear/DequantizeLinear pairs that no kernel fuses make int8 slower, not faster."""
    if device != "cuda":
        return []
    import onnx

    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    pairs = min(ops.count("QuantizeLinear"), ops.count("DequantizeLinear"))
    return [f"{pairs} QuantizeLinear/DequantizeLinear pairs are in the graph; without TensorRT they run "
            "unfused"] if pairs else []


BUILTIN_RUNTIMES = (TorchEager, TorchFp16, TorchBf16, TorchCompile, OnnxRuntime, OnnxRuntimeTensorRT)
