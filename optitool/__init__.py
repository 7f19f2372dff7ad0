"""optitool: make a model smaller and faster, and prove it.

The names here are the public plugin API; third-party plugins code against exactly these. Importing
this package must stay cheap (no torch, no onnxruntime) so the CLI starts fast.
"""

from __future__ import annotations

import pluggy

from optitool.artifacts import ModelArtifact, OnnxModel, TorchModel
from optitool.errors import ConfigError, OptitoolError, PassError
from optitool.passes import Pass, PassConfig, PassContext
from optitool.plugins import API_VERSION

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("optitool")

__all__ = [
    "API_VERSION",
    "ConfigError",
    "ModelArtifact",
    "OnnxModel",
    "OptitoolError",
    "Pass",
    "PassConfig",
    "PassContext",
    "PassError",
    "TorchModel",
    "__version__",
    "hookimpl",
]
