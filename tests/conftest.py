from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["optitool.testing"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def write(tmp_path: Path):
    """write("name.toml", text) -> path, with the text dedented."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    return _write


@pytest.fixture
def mlp_module(tmp_path: Path) -> Path:
    """A user's model module next to the pipeline file: `models.py` with a factory."""
    (tmp_path / "models.py").write_text(textwrap.dedent("""
        from optitool.testing import tiny_mlp

        def make(hidden=32):
            return tiny_mlp(hidden=hidden)
    """))
    return tmp_path / "models.py"


MLP_PIPELINE = """
name = "mlp"
[model]
source = "python"
factory = "models:make"
[model.inputs]
x = ["batch", 16]
[benchmark]
enabled = false
"""


@pytest.fixture
def mlp_pipeline(write, mlp_module) -> Path:
    return write("pipeline.toml", MLP_PIPELINE + '\n[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\n')
