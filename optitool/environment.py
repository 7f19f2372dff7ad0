"""The machine and the versions a run was measured on, recorded in every report."""

from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(threads: int | None = None) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "optitool": _version("optitool"), "torch": torch.__version__,
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "transformers": _version("transformers"), "optimum": _version("optimum"),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(), "executable": sys.executable,
    }
    try:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        env["onnxruntime_providers"] = []
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_mb=props.total_memory // 2**20, cuda=torch.version.cuda,
                   driver=_nvidia_driver())
    return env


def _nvidia_driver() -> str | None:
    try:
        with open("/proc/driver/nvidia/version") as handle:
            first = handle.readline()
        return first.split("Kernel Module")[1].split()[0] if "Kernel Module" in first else first.strip()
    except (OSError, IndexError):
        return None
