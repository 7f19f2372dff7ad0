"""Importing code the user named in a pipeline file (a model factory, a data function), and nothing else.

optitool imports a user's module only because a `factory` or `function` key names it; an import that
fails is reported against that key.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from optitool.errors import ConfigError
from optitool.paths import resolve_path


@contextmanager
def _importable_from(base_dir: Path) -> Iterator[None]:
    sys.path.insert(0, str(base_dir))
    try:
        yield
    finally:
        sys.path.remove(str(base_dir))


def resolve_callable(reference: str, base_dir: Path, where: str) -> Callable[..., Any]:
    """`package.module:function` or `path/to/file.py:function`, imported only because the user named it."""
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{where} = {reference!r}: expected 'module:function' (or 'file.py:function')")
    try:
        with _importable_from(base_dir):
            if module_name.endswith(".py"):
                file = resolve_path(module_name, base_dir, where=where)
                if not file.is_file():
                    raise ConfigError(f"{where} = {reference!r}: {file} does not exist")
                spec = importlib.util.spec_from_file_location(file.stem, file)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            else:
                module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{where} = {reference!r}: module {exc.name!r} not found (looked in the pipeline's "
                          f"folder {base_dir} and on the Python path)") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise ConfigError(f"{where} = {reference!r}: importing {module_name!r} failed: {type(exc).__name__}: "
                          f"{exc}") from None
    target = getattr(module, attr, None)
    if target is None or not callable(target):
        raise ConfigError(f"{where} = {reference!r}: {module_name!r} has no callable named {attr!r}")
    return target


def reference_file(reference: str, base_dir: Path, where: str) -> Path | None:
    """The file a `module:callable` or `file.py:callable` reference names, found as the import would find
    it (the pipeline's folder first), without importing it; None when it cannot be found."""
    import importlib.util
    import sys

    from optitool.paths import resolve_path

    module_name = reference.partition(":")[0]
    if module_name.endswith(".py"):
        path = resolve_path(module_name, base_dir, where=where)
        return path if path.is_file() else None
    sys.path.insert(0, str(base_dir))
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        found = None
    finally:
        sys.path.remove(str(base_dir))
    return Path(found.origin) if found is not None and found.origin and Path(found.origin).is_file() else None


def portable_reference(reference: str, base_dir: Path) -> str:
    """A `factory`/`function` reference that still names the same code when read from another folder (a saved
    stage's origin, a benchmark or a search re-measuring it): a `file.py:fn` path made absolute, and a
    top-level module whose file lies in the pipeline's folder written as that file's absolute path."""
    module_name, _, attr = reference.partition(":")
    if module_name.endswith(".py"):
        file = resolve_path(module_name, base_dir, where="[model].factory")
    elif "." not in module_name:
        file = base_dir / f"{module_name}.py"
    else:
        return reference
    return f"{file.resolve()}:{attr}" if file.is_file() else reference
