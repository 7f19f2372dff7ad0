"""Read examples (text or ready tensors, with optional labels) from the sources `[data]` names."""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optitool.errors import ConfigError
from optitool.paths import resolve_path

if TYPE_CHECKING:
    from optitool.spec import DataSpec

SPLITS = ("train", "validation", "calibration", "eval")


@dataclass(frozen=True)
class Example:
    text: str | None
    label: int | None = None
    inputs: dict[str, Any] | None = None


@dataclass
class Dataset:
    """Examples split deterministically by seed; `label_names[i]` is the name of label id i."""

    splits: dict[str, list[Example]]
    label_names: list[str]

    @property
    def has_labels(self) -> bool:
        return bool(self.label_names) and all(e.label is not None for s in self.splits.values() for e in s)

    def split(self, name: str) -> list[Example]:
        examples = self.splits.get(name, [])
        if not examples:
            raise ConfigError(f"[data]: the {name!r} split is empty; give it a size in [data.splits] "
                              f"(e.g. {name} = 0.2) or use more data")
        return examples


_FILE_SOURCES = ("folder", "jsonl", "csv", "parquet", "hf_disk")


def check_data_spec(spec: DataSpec, base_dir: Path, where: str) -> None:
    """Everything that can be known about `[data]` without reading it."""
    if spec.source in _FILE_SOURCES:
        if not spec.path:
            raise ConfigError(f"{where}: [data] with source = {spec.source!r} needs `path`")
        path = resolve_path(spec.path, base_dir, where=f"{where}: [data].path")
        if not path.exists():
            raise ConfigError(f"{where}: [data].path = {spec.path!r}: {path} does not exist")
        if spec.source == "folder" and not path.is_dir():
            raise ConfigError(f"{where}: [data].path = {spec.path!r} must be a folder with one sub-folder per label")
    if spec.source == "python" and not spec.function:
        raise ConfigError(f"{where}: [data] with source = 'python' needs `function = \"module:callable\"`")
    need = {"parquet": ("pyarrow", "pip install pyarrow"), "hf_disk": ("datasets", "pip install datasets")}
    if spec.source in need and importlib.util.find_spec(need[spec.source][0]) is None:
        raise ConfigError(f"{where}: [data] source = {spec.source!r} needs {need[spec.source][0]} "
                          f"({need[spec.source][1]})")


def _read_folder(path: Path) -> list[tuple[str, str]]:
    rows = []
    for label_dir in sorted(p for p in path.iterdir() if p.is_dir()):
        for file in sorted(label_dir.glob("*.txt")):
            rows.append((file.read_text(encoding="utf-8", errors="replace").strip(), label_dir.name))
    if not rows:
        raise ConfigError(f"[data].path {path} has no <label>/*.txt files")
    return rows


def _records(spec: DataSpec, path: Path) -> list[dict[str, Any]]:
    if spec.source == "jsonl":
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"[data].path {path}, line {n}: not valid JSON ({exc.msg})") from None
        return out
    if spec.source == "csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    if spec.source == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if spec.source == "hf_disk":
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = datasets.concatenate_datasets(list(loaded.values()))
        return list(loaded)
    raise AssertionError(spec.source)


def _rows(spec: DataSpec, base_dir: Path) -> list[tuple[str, Any]]:
    if spec.source == "python":
        from optitool.user_code import resolve_callable

        function = resolve_callable(spec.function, base_dir, "[data].function")
        try:
            records = [r if isinstance(r, dict) else {spec.text_field: r} for r in function()]
        except Exception as exc:  # noqa: BLE001 - the user's function failed
            raise ConfigError(f"[data].function = {spec.function!r} raised {type(exc).__name__}: {exc}") from None
    else:
        path = resolve_path(spec.path, base_dir, where="[data].path")
        if spec.source == "folder":
            return _read_folder(path)
        try:
            records = _records(spec, path)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - csv, parquet and datasets readers raise many types
            first = (str(exc).splitlines() or [""])[0]
            raise ConfigError(f"[data].path {path} could not be read as {spec.source}: {type(exc).__name__}: "
                              f"{first}") from None
    if not records:
        raise ConfigError(f"[data] ({spec.source}): no examples were read")
    for field in (spec.text_field, spec.label_field):
        if field and field not in records[0]:
            hint = '; label_field = "" for data without labels' if field == spec.label_field else ""
            raise ConfigError(f"[data]: column {field!r} is not in the data; it has "
                              f"{', '.join(map(str, records[0]))} (set [data].text_field / label_field{hint})")
    return [(str(r[spec.text_field]), r.get(spec.label_field) if spec.label_field else None) for r in records]


def _split_sizes(spec: DataSpec, total: int) -> dict[str, int]:
    sizes = {name: int(v) if v >= 1 else int(v * total) for name, v in spec.splits.items()}
    if sum(sizes.values()) > total:
        raise ConfigError(f"[data.splits] ask for {sum(sizes.values())} examples but the data has {total}")
    return sizes


def load_dataset(spec: DataSpec, base_dir: Path, seed: int) -> Dataset:
    """Read, shuffle with `seed` and split. The same spec and seed always give the same splits."""
    if spec.source in ("synthetic", "samples"):
        return Dataset(splits={}, label_names=[])
    rows = _rows(spec, base_dir)
    unlabelled = [i for i, (_, label) in enumerate(rows) if label in (None, "")]
    if spec.label_field and spec.source != "folder" and unlabelled and len(unlabelled) < len(rows):
        raise ConfigError(f"[data]: {len(unlabelled)} of {len(rows)} examples have no {spec.label_field!r} (the first: "
                          f"example {unlabelled[0] + 1}); label every example, or set label_field = \"\" to use "
                          "the text without labels")
    labelled = bool(spec.label_field) and not unlabelled
    if labelled:
        names = spec.labels or sorted({str(label) for _, label in rows})
        unknown = sorted({str(label) for _, label in rows} - set(names))
        if unknown:
            raise ConfigError(f"[data]: label values {unknown[:5]} are not in [data].labels {names}")
        ids = {name: i for i, name in enumerate(names)}
        examples = [Example(text, ids[str(label)]) for text, label in rows]
    else:
        names, examples = [], [Example(text) for text, _ in rows]
    random.Random(seed).shuffle(examples)
    if spec.limit:
        examples = examples[: spec.limit]
    sizes = _split_sizes(spec, len(examples))
    splits, start = {}, 0
    for name in SPLITS:
        n = sizes.get(name, 0)
        splits[name] = examples[start: start + n]
        start += n
    return Dataset(splits=splits, label_names=names)
