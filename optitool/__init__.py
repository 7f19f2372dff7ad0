"""optitool: make a model smaller and faster, and prove it.

The names here are the public plugin API; third-party plugins (and the built-in ones) code against
exactly these, and docs/plugins.md documents each. Importing this package must stay cheap (no torch, no
onnxruntime) so the CLI starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

from optitool.architectures import Architecture, Layout, is_conv1d, keep_blocks
from optitool.artifacts import ModelArtifact, OnnxModel, TorchModel
from optitool.bench.runtimes import Runtime
from optitool.calibration import (
    BlockFeed,
    calibration_batches,
    first_rows,
    observe_inputs,
    row_count,
    sequential_blocks,
)
from optitool.data.inputs import Batch, InputSource
from optitool.distributed import torchrun_world
from optitool.errors import ConfigError, OptitoolError, PassError, RunError
from optitool.execution import Executor, call_module, inputs_for, main_output, pooled
from optitool.lm import cache_argument, greedy_with_cache, is_causal_lm, token_blocks
from optitool.metrics import Evaluation
from optitool.models.base import Loader
from optitool.models.onnx_files import copy_onnx, save_onnx
from optitool.models.store import parameter_counts
from optitool.onnx_decoding import KV_HEAD_DIM_METADATA, open_decoder
from optitool.passes import Pass, PassConfig, PassContext
from optitool.registry import PluginRegistry
from optitool.spec import InputSpec, ModelSpec
from optitool.version import API_VERSION, __version__

if TYPE_CHECKING:
    from optitool.config import PipelineSpec

hookimpl = pluggy.HookimplMarker("optitool")


def __getattr__(name: str) -> Any:
    """PipelineSpec on first use: building the pipeline models costs a CLI start 0.1 s it rarely needs."""
    if name == "PipelineSpec":
        from optitool.config import PipelineSpec

        return PipelineSpec
    raise AttributeError(f"module 'optitool' has no attribute {name!r}")

__all__ = [
    "API_VERSION",
    "Architecture",
    "Batch",
    "BlockFeed",
    "ConfigError",
    "Evaluation",
    "Executor",
    "InputSource",
    "InputSpec",
    "KV_HEAD_DIM_METADATA",
    "Layout",
    "Loader",
    "ModelArtifact",
    "ModelSpec",
    "OnnxModel",
    "OptitoolError",
    "Pass",
    "PassConfig",
    "PassContext",
    "PassError",
    "PipelineSpec",
    "PluginRegistry",
    "RunError",
    "Runtime",
    "TorchModel",
    "__version__",
    "calibration_batches",
    "call_module",
    "copy_onnx",
    "first_rows",
    "cache_argument",
    "greedy_with_cache",
    "hookimpl",
    "inputs_for",
    "is_causal_lm",
    "is_conv1d",
    "keep_blocks",
    "main_output",
    "observe_inputs",
    "open_decoder",
    "parameter_counts",
    "pooled",
    "row_count",
    "save_onnx",
    "sequential_blocks",
    "token_blocks",
    "torchrun_world",
]
