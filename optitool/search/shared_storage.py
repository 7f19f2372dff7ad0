"""A search on a Ray cluster hands every trial the driver's paths: the pipeline file, the model and data it
names, the trials folder (where each trial writes its run and the driver reads the outcome) and the stage
cache. So every node must see the same files at the same paths (a shared filesystem: NFS, a cluster volume).
That is checked on every node before the first trial, so a node that cannot read a path fails the search at
once, naming the node and the path, instead of failing its trials one by one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optitool.errors import ConfigError

DIGESTED_BYTES = 64 * 2**20  # files up to this size are compared by content on each node, larger ones by size
CHECK_SECONDS = 60.0


def pipeline_inputs(spec: Any) -> list[Path]:
    """The pipeline file and every file or folder its [model] and [data] tables read (and their code)."""
    from optitool.cache import DATA_FILE_KEYS, MODEL_FILE_KEYS, input_files

    paths = [spec.source.resolve()] if spec.source is not None else []
    tables = [(spec.model.model_dump(exclude_none=True), MODEL_FILE_KEYS, "factory", "[model]")]
    if spec.data is not None:
        tables.append((spec.data.model_dump(exclude_none=True), DATA_FILE_KEYS, "function", "[data]"))
    for table, keys, code_key, where in tables:
        named, code = input_files(table, keys, code_key, spec.base_dir, where)
        paths += [p.resolve() for p in named] + ([code.resolve()] if code is not None else [])
    return list(dict.fromkeys(paths))


def fingerprint(path: Path) -> str:
    """What a node must see at `path`: a folder, a file's size, and a small file's content."""
    if path.is_dir():
        return "folder"
    size = path.stat().st_size
    if size > DIGESTED_BYTES:
        return f"{size} bytes"
    from optitool.cache import file_digest

    return f"{size} bytes, sha256 {file_digest(path)}"


def node_problems(expected: dict[str, str], writable: list[str]) -> list[str]:
    """Run on a node: what differs from the driver's view (empty when the node sees the same files)."""
    problems = []
    for text, wanted in expected.items():
        path = Path(text)
        if not path.exists():
            problems.append(f"{path} does not exist there")
            continue
        try:
            found = fingerprint(path)
        except OSError as exc:
            problems.append(f"{path} cannot be read there ({exc.strerror or exc})")
            continue
        if found != wanted:
            problems.append(f"{path} is another file there ({found}, not {wanted})")
    for text in writable:
        probe = Path(text) / ".optitool-node-check"
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            problems.append(f"{text} cannot be written there ({exc.strerror or exc})")
    return problems


def _check_on_node(expected: dict[str, str], writable: list[str]) -> dict[str, Any]:
    import socket

    return {"host": socket.gethostname(), "problems": node_problems(expected, writable)}


def check_every_node(ray: Any, inputs: list[Path], writable: list[Path]) -> int:
    """Run the check once on every alive node of the cluster; returns how many nodes were checked."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    expected = {str(p): fingerprint(p) for p in inputs}
    folders = [str(p) for p in writable]
    task = ray.remote(num_cpus=0, max_retries=0)(_check_on_node)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
        expected, folders): n for n in nodes}
    try:
        results = ray.get(list(refs), timeout=CHECK_SECONDS)
    except Exception as exc:  # noqa: BLE001 - a node that does not answer is as unusable as one that cannot read
        raise ConfigError(f"the Ray cluster's nodes did not all answer a file check within {CHECK_SECONDS:.0f} s "
                          f"({type(exc).__name__}); every node must be up and see the search's files") from None
    for node, result in zip(refs.values(), results, strict=True):
        if result["problems"]:
            where = f"node {node.get('NodeManagerAddress', '?')} ({result['host']})"
            raise ConfigError(f"{where} does not see the search's files as this machine does: "
                              f"{'; '.join(result['problems'][:4])}. Trials on a Ray cluster read the pipeline, "
                              "model and data and write the trials folder and cache at this machine's paths, so "
                              "they must be on storage every node mounts at the same path")
    return len(nodes)
