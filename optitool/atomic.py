"""Writes that are all-or-nothing: a crash or Ctrl-C never leaves a half-written file or stage folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from optitool.errors import ConfigError, RunError


def _umask() -> int:
    """The process's umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: CI uploaders and other users could not read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield a hidden sibling folder to fill; it becomes `final` only if the block finishes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class FolderLock:
    """Only one optitool process writes a given run folder at a time.

    The lock is a file beside the folder (the folder itself is replaced by --overwrite), created
    exclusively and holding the owner's pid; a lock left by a process that no longer exists is taken over.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder.parent / f".{folder.name}.optitool-lock"

    def __enter__(self) -> FolderLock:
        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise cannot_create(self.folder, exc) from None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and _alive(owner):
                    raise RunError(f"another optitool run (pid {owner}) is writing to {self.folder}; wait for it "
                                   "or choose another folder with --output") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            except OSError as exc:  # e.g. under /proc, which lists folders no one may write in
                raise cannot_create(self.folder, exc) from None
            with os.fdopen(fd, "w") as handle:
                handle.write(str(os.getpid()))
            return self
        raise RunError(f"could not lock the run folder {self.folder} (lock file {self.path})")

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip() or "0") or None
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc: object) -> None:
        if self._owner() == os.getpid():
            self.path.unlink(missing_ok=True)


def cannot_create(folder: Path, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot create the run folder {folder}: {exc.strerror or exc}; choose another with --output")


def _alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid)
