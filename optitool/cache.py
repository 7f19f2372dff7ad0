"""A content-addressed cache of stages, so that runs sharing a prefix of their chain (search trials with the
same export, the same pruning before different quantizations) compute it once.

A stage's key hashes everything its result depends on: the model's identity (the content of the files it is
loaded from), the data and seed, the device, every pass up to it with its resolved settings, and the plugins
and versions that provide them. An entry is a folder written aside and renamed into place, with a manifest
(sizes and SHA-256 of its files) written last: a partial or corrupted entry fails the check and is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from optitool import atomic

MANIFEST = "manifest.json"
MASKS = "masks.safetensors"
CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def files_digest(paths: list[Path]) -> str:
    """The content of files and folders (every file inside, by relative name) as one digest."""
    digest = hashlib.sha256()
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            digest.update(str(f.relative_to(root) if root.is_dir() else f.name).encode())
            digest.update(file_digest(f).encode())
    return digest.hexdigest()


def model_identity(model_table: dict[str, Any], base_dir: Path) -> str:
    """The `[model]` table with the content of every file or folder it names (paths, checkpoints; a Python
    factory's module file), so an edited checkpoint is a different model."""
    from optitool.paths import resolve_path

    named: list[Path] = []
    for key, value in sorted(model_table.items()):
        if isinstance(value, str) and key in ("path", "checkpoint", "file", "gguf_file"):
            path = resolve_path(value, base_dir, where="[model]")
            if path.exists():
                named.append(path)
    factory = model_table.get("factory")
    if isinstance(factory, str) and ":" in factory:
        import importlib.util

        try:
            found = importlib.util.find_spec(factory.partition(":")[0])
        except (ImportError, ValueError):
            found = None
        if found is not None and found.origin and Path(found.origin).is_file():
            named.append(Path(found.origin))
    return hashlib.sha256((json.dumps(model_table, sort_keys=True, default=str) + files_digest(named)).encode()
                          ).hexdigest()


def stage_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class StageCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def lookup(self, key: str) -> tuple[Path, dict[str, Any]] | None:
        """The entry's folder and stage record, if the entry is complete and every file checks out."""
        entry = self._entry(key)
        manifest_path = entry / MANIFEST
        if not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
            for name, (size, digest) in manifest["files"].items():
                path = entry / name
                if not path.is_file() or path.stat().st_size != size or file_digest(path) != digest:
                    return None
            return entry, manifest["record"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def store(self, key: str, stage_folder: Path, record: dict[str, Any], masks: dict[str, Any]) -> None:
        """Copy a saved stage (and its pruning masks) into the cache, all or nothing."""
        entry = self._entry(key)
        if self.lookup(key) is not None:
            return
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{key[:12]}.", suffix=".partial"))
        try:
            files = {}
            for path in sorted(p for p in stage_folder.rglob("*") if p.is_file()):
                target = tmp / path.relative_to(stage_folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
            if masks:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in masks.items()}, str(tmp / MASKS))
            for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
                files[str(path.relative_to(tmp))] = [path.stat().st_size, file_digest(path)]
            atomic.write_json(tmp / MANIFEST, {"key": key, "files": files, "record": record})
            if entry.exists():  # a broken entry (it failed lookup) is replaced
                shutil.rmtree(entry)
            os.replace(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @staticmethod
    def masks(entry: Path) -> dict[str, Any]:
        if not (entry / MASKS).is_file():
            return {}
        from safetensors.torch import load_file

        return load_file(str(entry / MASKS))
