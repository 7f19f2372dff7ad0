"""Running an ONNX causal LM whose graph carries past key/values, the way Optimum's merged with-past
model and onnxruntime-genai's model builder lay it out: inputs `input_ids`, `attention_mask` (over past
and new tokens), optionally `position_ids`, and `past_key_values.<layer>.key|value` of shape
[batch, kv_heads, past_length, head_dim]; outputs `logits` and `present.<layer>.key|value`. One graph
serves the prefill (past of length 0) and every decode step, so evaluation, verification and the
generation benchmark all go through this one loop, whichever exporter wrote the graph.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAST_INPUT = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
KV_HEAD_DIM_METADATA = "optitool.head_dim"  # metadata our exporter writes when the graph leaves head_dim symbolic


@dataclass(frozen=True)
class KvLayout:
    """Where a graph keeps its cache: the past inputs in layer order, the present output of each, and
    the shape of one layer's cache."""

    past_names: tuple[str, ...]
    present_names: tuple[str, ...]
    kv_heads: int
    head_dim: int
    float16: bool
    position_ids: bool
    in_place: bool = False  # GroupQueryAttention appends to the past buffer itself when present is that buffer

    def empty_past(self, batch: int, capacity: int = 0) -> dict[str, Any]:
        """The past key/values the prefill is given: zero-length, or, where attention appends in place, zeros
        as long as the whole generation (`capacity` tokens) that every step then writes into."""
        import numpy as np

        dtype = np.float16 if self.float16 else np.float32
        length = capacity if self.in_place else 0
        return {n: np.zeros((batch, self.kv_heads, length, self.head_dim), dtype) for n in self.past_names}


def kv_layout(session: Any, path: Path) -> KvLayout | None:
    """The cache layout of an open session's graph, or None when the graph has no past key/values."""
    inputs = {i.name: i for i in session.get_inputs()}
    found = sorted((int(m.group(1)), m.group(2) == "value", name)
                   for name in inputs if (m := PAST_INPUT.match(name)))
    if not found:
        return None
    outputs = {o.name for o in session.get_outputs()}
    past = tuple(name for *_, name in found)
    present = tuple(n.replace("past_key_values.", "present.", 1) for n in past)
    missing = [n for n in present if n not in outputs]
    if missing:
        from optitool.errors import RunError

        raise RunError(f"the ONNX model {path} takes past key/values but has no outputs {missing[:2]}: it is not a "
                       "with-past decoder in the layout optitool runs (past_key_values.N.key -> present.N.key)")
    shape = inputs[past[0]].shape
    kv_heads = shape[1] if isinstance(shape[1], int) else None
    head_dim = shape[3] if isinstance(shape[3], int) else _head_dim_beside(session, path)
    if kv_heads is None or head_dim is None:
        from optitool.errors import RunError

        raise RunError(f"the ONNX model {path} leaves the key/value heads or head size of its cache symbolic "
                       f"({shape}) and says them nowhere else (metadata {KV_HEAD_DIM_METADATA!r} or genai_config.json)")
    return KvLayout(past, present, kv_heads, head_dim, "float16" in inputs[past[0]].type, "position_ids" in inputs,
                    appends_in_place(path, dict(zip(past, present, strict=True))))


def appends_in_place(path: Path, present_of: dict[str, str]) -> bool:
    """Whether every past key/value goes into one GroupQueryAttention node alone and comes out of it as its
    present: such a graph can be given one buffer of the whole generation's length as both, and onnxruntime
    then writes each step's key/value into it where it stands (it compares the two pointers), instead of
    copying the whole cache into a new present every step. onnxruntime-genai's runtime runs the builder's
    graphs that way; on 2 CPU cores the copies cost SmolLM2-135M's attention 0.9 of its 2.4 ms per token
    (benchmarks/smollm2_profile.py)."""
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in graph_nodes(path):
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
    for past, present in present_of.items():
        users = consumers.get(past, [])
        if len(users) != 1:
            return False
        node, index = users[0]
        # GroupQueryAttention: inputs 3 and 4 are the past key and value, outputs 1 and 2 their presents
        if node.op_type != "GroupQueryAttention" or index not in (3, 4) or node.output[index - 2] != present:
            return False
    return True


def graph_nodes(path: Path) -> list[Any]:
    """The nodes of the ONNX graph at `path`, read without its initializers: the file is mapped and only the
    graph's node records are parsed. onnx.load would hold every weight stored in the file in memory at once,
    which for a graph with its weights inline (most of optitool's quantized stages) adds the model's size to
    the peak memory of the process that decodes it."""
    import mmap

    import onnx

    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for field, start, end in _length_delimited(data, 0, len(data)):
            if field == 7:  # ModelProto.graph
                return [onnx.NodeProto.FromString(data[a:b])
                        for inner, a, b in _length_delimited(data, start, end) if inner == 1]  # GraphProto.node
    return []


def _length_delimited(data: Any, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the protobuf message in data[start:end]; the
    other wire types are stepped over."""

    def varint(at: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            byte = data[at]
            value, shift, at = value | (byte & 0x7F) << shift, shift + 7, at + 1
            if byte < 0x80:
                return value, at

    at = start
    while at < end:
        key, at = varint(at)
        wire = key & 7
        if wire == 0:
            _, at = varint(at)
        elif wire == 1:
            at += 8
        elif wire == 5:
            at += 4
        elif wire == 2:
            length, at = varint(at)
            yield key >> 3, at, at + length
            at += length
        else:
            raise ValueError(f"protobuf wire type {wire} (groups) is not used by ONNX files")


def _head_dim_beside(session: Any, path: Path) -> int | None:
    meta = session.get_modelmeta().custom_metadata_map
    if KV_HEAD_DIM_METADATA in meta:
        return int(meta[KV_HEAD_DIM_METADATA])
    config = path.parent / "genai_config.json"  # onnxruntime-genai's builder writes it beside the graph
    if config.is_file():
        return int(json.loads(config.read_text())["model"]["decoder"]["head_size"])
    return None


def position_ids(mask: Any, new: int) -> Any:
    """Positions of the last `new` tokens, counted over real tokens only (left padding takes none)."""
    import numpy as np

    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -new:].astype(np.int64)


def complete_feed(layout: KvLayout, feed: dict[str, Any]) -> dict[str, Any]:
    """A feed for a whole sequence at once (evaluation, verification): an empty cache and positions."""
    batch = feed["input_ids"].shape[0]
    done = {**feed, **layout.empty_past(batch)}
    if layout.position_ids and "position_ids" not in feed:
        done["position_ids"] = position_ids(feed["attention_mask"], feed["input_ids"].shape[1])
    return done


class OnnxDecoder:
    """Greedy generation on one session, the cache kept as onnxruntime values between steps (IO binding):
    presents are never copied out to numpy and back, and on CUDA they stay on the GPU. A graph whose
    attention appends in place gets one buffer per cache tensor for the whole generation, bound as both past
    and present (see `appends_in_place`)."""

    def __init__(self, session: Any, layout: KvLayout, device: str = "cpu") -> None:
        self.session, self.layout = session, layout
        self.device = "cuda" if device == "cuda" else "cpu"
        self._takes_mask = any(i.name == "attention_mask" for i in session.get_inputs())

    def _value(self, array: Any) -> Any:
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)

    def greedy(self, ids: Any, new_tokens: int, clock: Callable[[], float] = time.perf_counter) -> Any:
        """(tokens [batch, new_tokens] as numpy, seconds to the first token, seconds for the rest), after
        prompts of one length without padding."""
        import numpy as np

        layout = self.layout
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        batch, length = ids.shape
        past = {n: self._value(v) for n, v in layout.empty_past(batch, length + new_tokens).items()}
        current, tokens = ids, []
        start = clock()
        first = start
        for step in range(new_tokens):
            total = length + step
            binding = self.session.io_binding()
            binding.bind_ortvalue_input("input_ids", self._value(current))
            mask = np.ones((batch, total), np.int64)
            if self._takes_mask:
                binding.bind_ortvalue_input("attention_mask", self._value(mask))
            if layout.position_ids:
                binding.bind_ortvalue_input("position_ids", self._value(position_ids(mask, current.shape[1])))
            for name in layout.past_names:
                binding.bind_ortvalue_input(name, past[name])
            binding.bind_output("logits", "cpu")  # only the last position is read; it is small
            for past_name, name in zip(layout.past_names, layout.present_names, strict=True):
                if layout.in_place:
                    binding.bind_ortvalue_output(name, past[past_name])
                else:
                    binding.bind_output(name, self.device)
            self.session.run_with_iobinding(binding)
            outputs = binding.get_outputs()
            logits = outputs[0].numpy()
            if not layout.in_place:
                past = dict(zip(layout.past_names, outputs[1:], strict=True))
            token = logits[:, -1].argmax(-1).astype(np.int64)
            tokens.append(token)
            current = token[:, None]
            if step == 0:
                first = clock()
        end = clock()
        return np.stack(tokens, 1), first - start, end - first


def open_decoder(path: Path, device: str = "cpu", threads: int = 0, options: Any = None) -> OnnxDecoder | None:
    """A decoder on the graph at `path`, or None when it has no past key/values."""
    import onnxruntime as ort

    if options is None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=providers)
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        from optitool.errors import RunError

        raise RunError(f"decoding {path} on CUDA: onnxruntime here has no CUDAExecutionProvider (available: "
                       f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu, or use the CPU")
    layout = kv_layout(session, path)
    return OnnxDecoder(session, layout, device) if layout is not None else None
