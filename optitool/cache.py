"""A content-addressed cache of stages, so that runs sharing a prefix of their chain (search trials with the
same export, the same pruning before different quantizations) compute it once.

A stage's key hashes everything its result depends on: the model's identity (the content of the files it is
loaded from), the data and seed, the device, every pass up to it with its resolved settings, and the plugins
and versions that provide them. An entry is a folder written aside and renamed into place, with a manifest
(sizes and SHA-256 of its files, the stage record, and a digest over all of it) written last: a partial,
corrupted or edited entry fails the check and is never used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from optitool import atomic
from optitool.user_code import reference_file

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


LIBRARIES = ("torch", "numpy", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai",
             "onnxruntime-genai-cuda", "transformers", "tokenizers", "safetensors", "optimum", "optimum-onnx",
             "gguf", "accelerate", "torchao")
MAX_CODE_FILES = 2000  # a package larger than this is known by its distribution's version instead


def library_versions() -> dict[str, str | None]:
    """The installed version of every library a stage's result can depend on (None: not installed), read
    from package metadata without importing anything."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def code_digest(file: str | Path | None) -> str:
    """The source a module runs: its package's Python files (every module of the top-level package, so an
    edited helper the module imports counts), or the single file of a top-level module. A package too large to
    read on every run is known by its distribution's version."""
    if file is None:
        return ""
    path = Path(file).resolve()
    root = path.parent if path.name == "__init__.py" else path
    while root.parent.joinpath("__init__.py").is_file():  # up to the top-level package
        root = root.parent
    if root.is_file():
        return files_digest([root])
    sources = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    if len(sources) > MAX_CODE_FILES:
        from importlib.metadata import PackageNotFoundError, packages_distributions, version

        names = packages_distributions().get(root.name, [])
        try:
            return f"{root.name}=={version(names[0])}" if names else f"{root.name}:{len(sources)} files"
        except PackageNotFoundError:
            return f"{root.name}:{len(sources)} files"
    digest = hashlib.sha256()
    for source in sources:
        digest.update(str(source.relative_to(root)).encode())
        digest.update(file_digest(source).encode())
    return digest.hexdigest()


MODEL_FILE_KEYS = ("path", "checkpoint", "file", "gguf_file")
DATA_FILE_KEYS = ("path",)


def input_files(table: dict[str, Any], file_keys: tuple[str, ...], code_key: str, base_dir: Path,
                where: str) -> tuple[list[Path], Path | None]:
    """The files and folders a pipeline table names that exist, and the file of the code it names (None
    when it names none, or it cannot be found without importing)."""
    from optitool.paths import resolve_path

    named = []
    for key in file_keys:
        value = table.get(key)
        if isinstance(value, str) and value:
            path = resolve_path(value, base_dir, where=where)
            if path.exists():
                named.append(path)
    reference = table.get(code_key)
    code = (reference_file(reference, base_dir, f"{where}.{code_key}")
            if isinstance(reference, str) and ":" in reference else None)
    return named, code


def _table_identity(table: dict[str, Any], file_keys: tuple[str, ...], code_key: str, base_dir: Path,
                    where: str) -> str:
    """A pipeline table with the content of every file it names and the source of the code it names."""
    named, code_file = input_files(table, file_keys, code_key, base_dir, where)
    code = code_digest(code_file) if isinstance(table.get(code_key), str) and ":" in table[code_key] else ""
    return hashlib.sha256((json.dumps(table, sort_keys=True, default=str) + files_digest(named) + code
                           ).encode()).hexdigest()


def model_identity(model_table: dict[str, Any], base_dir: Path) -> str:
    """The `[model]` table with the content of every file or folder it names (paths, checkpoints) and the
    source of a Python factory, so an edited checkpoint or factory is a different model."""
    return _table_identity(model_table, MODEL_FILE_KEYS, "factory", base_dir, "[model]")


def data_identity(data_table: dict[str, Any] | None, base_dir: Path) -> str | None:
    """The `[data]` table with the content of the files it reads (a folder, a jsonl/csv/parquet file, a saved
    dataset) and the source of a Python data function: other texts under the same names are other data."""
    if data_table is None:
        return None
    return _table_identity(data_table, DATA_FILE_KEYS, "function", base_dir, "[data]")


def stage_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _record_digest(key: str, files: dict[str, Any], record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"key": key, "files": files, "record": record}, sort_keys=True,
                                     default=str).encode()).hexdigest()


class StageCache:
    """Entries are folders `<root>/<key[:2]>/<key>`; each is written once, under an flock beside it, by the first
    process that needs it; a process that finds it being written waits and then takes the finished entry."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def lookup(self, key: str) -> tuple[Path, dict[str, Any]] | None:
        """The entry's folder and stage record, if the entry is complete and everything it holds (every file,
        the record, the key) checks out against the digest written last."""
        entry = self._entry(key)
        manifest_path = entry / MANIFEST
        if not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
            files, record = manifest["files"], manifest["record"]
            if manifest["key"] != key or manifest["digest"] != _record_digest(key, files, record):
                return None
            on_disk = {str(p.relative_to(entry)) for p in entry.rglob("*") if p.is_file()} - {MANIFEST}
            if on_disk != set(files):
                return None
            for name, (size, digest) in files.items():
                path = entry / name
                if not path.is_file() or path.stat().st_size != size or file_digest(path) != digest:
                    return None
            return entry, record
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def store(self, key: str, stage_folder: Path, record: dict[str, Any], masks: dict[str, Any]) -> None:
        """Copy a saved stage (and its pruning masks) into the cache, all or nothing, once: under the entry's
        lock, a finished entry is left as it is; only a broken one is replaced."""
        from optitool.locks import FileLock

        entry = self._entry(key)
        entry.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(entry.parent / f".{key}.lock"):
            if self.lookup(key) is not None:
                return
            with atomic.staging_dir(entry) as tmp:  # made with the umask's permissions, like run folders
                for path in sorted(p for p in stage_folder.rglob("*") if p.is_file()):
                    target = tmp / path.relative_to(stage_folder)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target)
                if masks:
                    from safetensors.torch import save_file

                    save_file({k: v.contiguous() for k, v in masks.items()}, str(tmp / MASKS))
                files = {str(path.relative_to(tmp)): [path.stat().st_size, file_digest(path)]
                         for path in sorted(p for p in tmp.rglob("*") if p.is_file())}
                atomic.write_json(tmp / MANIFEST, {"key": key, "files": files, "record": record,
                                                   "digest": _record_digest(key, files, record)})

    @staticmethod
    def masks(entry: Path) -> dict[str, Any]:
        if not (entry / MASKS).is_file():
            return {}
        from safetensors.torch import load_file

        return load_file(str(entry / MASKS))
