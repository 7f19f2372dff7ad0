"""Path resolution for pipeline files: relative to the pipeline's folder, or inside an installed package.

`pkg:NAME/sub/dir` names data shipped in a pip package (the real model and corpus used by the
examples) without importing the package, which may print or do work at import time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from optitool.errors import ConfigError


def resolve_path(value: str | Path, base_dir: Path, *, where: str) -> Path:
    text = str(value)
    if text.startswith("pkg:"):
        package, _, sub = text[4:].partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{where}: {text!r} names package {package!r}, which is not installed "
                              f"(pip install {package.replace('_', '-')})")
        return Path(list(spec.submodule_search_locations)[0]) / sub
    path = Path(text).expanduser()
    return path if path.is_absolute() else (base_dir / path)


def display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def writable_folder(path: Path, what: str) -> Path:
    """A folder optitool will write into, checked without creating anything: a usage error (exit 2) naming
    `what` when it is a file, or when it (or, if missing, its nearest existing parent) is not a writable folder,
    found before any work starts and before anything is written."""
    import os

    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder; name a folder (it is created if missing)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path} cannot be created: {existing} is not writable by this user")
    return path
