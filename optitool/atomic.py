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
    """Only one optitool process writes a given run folder at a time: an flock on a file beside the folder
    (the folder itself is replaced by --overwrite), released when the process ends however it ends."""

    def __init__(self, folder: Path, what: str = "run") -> None:
        from optitool.locks import FileLock

        self.folder, self.what = folder, what
        self.lock = FileLock(folder.parent / f".{folder.name}.optitool-lock")

    def __enter__(self) -> FolderLock:
        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            taken = self.lock.acquire(blocking=False)
        except OSError as exc:  # e.g. under /proc, which lists folders no one may write in
            raise cannot_create(self.folder, exc) from None
        if not taken:
            owner = self.lock.holder()
            raise RunError(f"another optitool {self.what}{f' (pid {owner})' if owner else ''} is writing to "
                           f"{self.folder}; wait for it or choose another folder with --output")
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def cannot_create(folder: Path, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot create the run folder {folder}: {exc.strerror or exc}; choose another with --output")
