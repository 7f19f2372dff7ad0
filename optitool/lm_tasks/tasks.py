"""Which lm-eval tasks an `[evaluation]` table names, found without a network and checked before anything
loads: a task shipped with optitool (`bbc_topic`, `bbc_cloze`), a task file of the user's (a path ending in
.yaml, relative to the pipeline file), or a task lm-eval knows by name (its data then comes from the
dataset hub, or its cache: these machines reach neither, so only the first two are tested here).

A task file's `data_files` are read relative to the file itself (lm-eval alone reads them relative to the
working directory, so a pipeline would work from one folder only). Validation parses files without running
their `!function` code; lm-eval imports that code when the tasks are scored, as the user asked.
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optitool.errors import ConfigError

SHIPPED = Path(__file__).parent / "bbc"
SHIPPED_TASKS = {"bbc_topic": SHIPPED / "bbc_topic.yaml", "bbc_cloze": SHIPPED / "bbc_cloze.yaml"}
INSTALL_HINT = 'pip install "optitool[lmeval]" (lm-eval 0.4.x)'
OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until")


@dataclass(frozen=True)
class TaskRef:
    """One entry of `[evaluation].tasks`: its name as lm-eval reports it, and its file when it has one."""

    entry: str
    name: str
    file: Path | None
    output_type: str | None  # None: a registered lm-eval task or group, known only when it loads
    max_gen_toks: int | None = None  # what a generate_until task's file asks for


def lm_eval_installed() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def _read_yaml(path: Path, where: str, *, resolve: bool) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(path, resolve_func=resolve)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file, named
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{where}: the task file {path} could not be read as an lm-eval task: {first}") from None
    if not isinstance(config.get("task"), str):
        raise ConfigError(f"{where}: the task file {path} names no task (a `task: name` line); optitool runs one "
                          "task per file (name a group by the tasks in it)")
    _check_templates(config, path, where)
    output_type = config.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise ConfigError(f"{where}: the task file {path} has output_type {output_type!r}; lm-eval knows "
                          f"{', '.join(OUTPUT_TYPES)}")
    return config


TEMPLATE_KEYS = ("doc_to_text", "doc_to_target", "doc_to_choice")


def _check_templates(config: dict[str, Any], path: Path, where: str) -> None:
    """The prompt templates compile (lm-eval would fail on them only once the data has loaded)."""
    import jinja2

    for key in TEMPLATE_KEYS:
        value = config.get(key)
        if isinstance(value, str):
            try:
                jinja2.Environment().parse(value)
            except jinja2.TemplateSyntaxError as exc:
                raise ConfigError(f"{where}: the task file {path} has a {key} template that does not compile: "
                                  f"{exc.message} ({value!r})") from None


def resolve_tasks(entries: list[str], base_dir: Path, where: str) -> list[TaskRef]:
    """Every entry found, or a ConfigError naming the first that is not (with lm-eval's close names)."""
    if not lm_eval_installed():
        raise ConfigError(f"{where}: [evaluation] scores lm-eval tasks, and lm-eval is not installed; "
                          f"{INSTALL_HINT}, or remove the [evaluation] table")
    refs, registered = [], []
    for entry in entries:
        if entry in SHIPPED_TASKS:
            path = SHIPPED_TASKS[entry]
        elif entry.endswith((".yaml", ".yml")):
            path = (base_dir / entry).resolve()
            if not path.is_file():
                raise ConfigError(f"{where}: [evaluation].tasks names the task file {entry!r}, which does not "
                                  f"exist ({path})")
        else:
            registered.append(entry)
            refs.append(TaskRef(entry, entry, None, None))
            continue
        config = _read_yaml(path, f"{where}: [evaluation].tasks", resolve=False)
        _check_data_files(config, path, where)
        generation = config.get("generation_kwargs") or {}
        refs.append(TaskRef(entry, config["task"], path, config.get("output_type", "generate_until"),
                            generation.get("max_gen_toks") if isinstance(generation, dict) else None))
    if registered:
        _check_registered(registered, where)
    names = [r.name for r in refs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{where}: [evaluation].tasks names the task {twice[0]!r} twice")
    return refs


def _check_data_files(config: dict[str, Any], path: Path, where: str) -> None:
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if config.get("dataset_path") not in ("json", "csv", "parquet", "text", "arrow") or not files:
        return
    for split, name in (files.items() if isinstance(files, dict) else [("data", files)]):
        for one in name if isinstance(name, list) else [name]:
            if "://" not in str(one) and not (path.parent / one).is_file():
                raise ConfigError(f"{where}: the task file {path} reads {split} data from {one!r}, which does not "
                                  f"exist beside it ({path.parent / one})")


def _check_registered(names: list[str], where: str) -> None:
    from lm_eval.tasks import TaskManager

    known = TaskManager().all_tasks
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, [*SHIPPED_TASKS, *known], n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            shipped = ", ".join(SHIPPED_TASKS)
            raise ConfigError(f"{where}: [evaluation].tasks names {name!r}, which is neither a task shipped with "
                              f"optitool ({shipped}), a task file (a path ending in .yaml) nor a task lm-eval "
                              f"knows{hint}")


def task_configs(refs: list[TaskRef]) -> list[str | dict[str, Any]]:
    """What lm-eval's TaskManager loads: a file's config with its data files made absolute, or a name."""
    out: list[str | dict[str, Any]] = []
    for ref in refs:
        if ref.file is None:
            out.append(ref.name)
            continue
        config = _read_yaml(ref.file, str(ref.file), resolve=True)
        kwargs = dict(config.get("dataset_kwargs") or {})
        files = kwargs.get("data_files")
        if isinstance(files, dict):
            kwargs["data_files"] = {k: _beside(ref.file, v) for k, v in files.items()}
        elif files is not None:
            kwargs["data_files"] = _beside(ref.file, files)
        out.append({**config, "dataset_kwargs": kwargs} if kwargs else config)
    return out


def _beside(task_file: Path, value: Any) -> Any:
    if isinstance(value, list):
        return [_beside(task_file, v) for v in value]
    candidate = task_file.parent / str(value)
    return str(candidate) if "://" not in str(value) and candidate.is_file() else value
