"""Where trials run. `local`: one after another, each in a fresh process on this machine. `ray`: each trial a
Ray task with the CPUs (and GPU) it needs, several at once, on a local Ray started here or on the cluster at
`--address`; a task whose worker dies marks its trial failed and the search goes on."""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

from optitool.errors import ConfigError
from optitool.search.spec import SearchSpec
from optitool.search.trial import Outcome, read_outcome, run_trial


class LocalExecutor:
    capacity = 1
    nodes = 1

    def __init__(self, pipeline: Path, trials_dir: Path, cache: Path | None, device: str, search: SearchSpec) -> None:
        self.pipeline, self.trials_dir, self.cache, self.device, self.search = (pipeline, trials_dir, cache, device,
                                                                                search)
        self.queue: deque[tuple[int, dict[str, Any]]] = deque()

    def folder(self, number: int) -> Path:
        return self.trials_dir / f"{number:03d}"

    def submit(self, number: int, params: dict[str, Any]) -> Path:
        self.queue.append((number, params))
        return self.folder(number)

    def wait_one(self) -> tuple[int, Outcome]:
        number, params = self.queue.popleft()
        start = time.perf_counter()
        code, output = run_trial(self.pipeline, params, self.folder(number), self.cache, self.device)
        outcome = read_outcome(self.folder(number), code, output, self.search)
        outcome.seconds = round(time.perf_counter() - start, 1)
        return number, outcome

    def close(self) -> None:
        pass


def _ray_trial(pipeline: str, params: dict[str, Any], folder: str, cache: str | None, device: str,
               search: dict[str, Any]) -> dict[str, Any]:
    """A Ray task: the same fresh-process run as the local executor, on whichever node Ray chose."""
    from dataclasses import asdict

    start = time.perf_counter()
    code, output = run_trial(Path(pipeline), params, Path(folder), Path(cache) if cache else None, device)
    outcome = read_outcome(Path(folder), code, output, SearchSpec.model_validate(search))
    outcome.seconds = round(time.perf_counter() - start, 1)
    return asdict(outcome)


class RayExecutor(LocalExecutor):
    def __init__(self, pipeline: Path, trials_dir: Path, cache: Path | None, device: str, search: SearchSpec,
                 address: str | None, inputs: list[Path]) -> None:
        super().__init__(pipeline, trials_dir, cache, device, search)
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'optitool[ray]'") from None
        self.ray = ray
        self.started_here = address is None
        if address is not None:
            probe_cluster(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                     **({"num_cpus": max(search.cpus_per_trial, _local_cpus())} if address is None else {}))
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"--address {address}: Ray could not connect: {first}") from None
        from optitool.search.shared_storage import check_every_node

        try:
            self.nodes = check_every_node(ray, inputs, [trials_dir, *([cache] if cache is not None else [])])
        except ConfigError:
            self.close()
            raise
        gpus = 1 if device == "cuda" else 0
        cpus = ray.cluster_resources().get("CPU", 1)
        self.capacity = search.concurrency or max(1, int(cpus // search.cpus_per_trial))
        self.task = ray.remote(num_cpus=search.cpus_per_trial, num_gpus=gpus, max_retries=0)(_ray_trial)
        self.pending: dict[Any, int] = {}

    def submit(self, number: int, params: dict[str, Any]) -> Path:
        folder = self.folder(number)
        ref = self.task.remote(str(self.pipeline), params, str(folder), str(self.cache) if self.cache else None,
                               self.device, self.search.model_dump())
        self.pending[ref] = number
        return folder

    def wait_one(self) -> tuple[int, Outcome]:
        ready, _ = self.ray.wait(list(self.pending), num_returns=1)
        number = self.pending.pop(ready[0])
        try:
            return number, Outcome(**self.ray.get(ready[0]))
        except Exception as exc:  # noqa: BLE001 - a dead worker, a lost node: the trial failed, the search goes on
            return number, Outcome("failed", error=f"the Ray task failed: {type(exc).__name__}: "
                                                   f"{str(exc).splitlines()[0] if str(exc) else ''}")

    def close(self) -> None:
        if self.started_here:
            self.ray.shutdown()


CLUSTER_PROBE_SECONDS = 10.0


def probe_cluster(address: str) -> None:
    """Refuse, within seconds, an address where no Ray cluster listens: ray.init itself retries for minutes.
    "auto" (the cluster started on this machine) is left to Ray, which answers at once."""
    import socket
    from urllib.parse import urlsplit

    if address == "auto":
        return
    parts = urlsplit(address if "://" in address else f"ray-gcs://{address}")
    default = 10001 if parts.scheme == "ray" else 6379  # Ray Client's port, the GCS's
    try:
        host, port = parts.hostname, parts.port or default
    except ValueError:
        host, port = None, None
    if not host:
        raise ConfigError(f"--address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, port), timeout=CLUSTER_PROBE_SECONDS):
            pass
    except OSError as exc:
        raise ConfigError(f"--address {address}: no Ray cluster answers at {host}:{port} ({exc.strerror or exc}); "
                          "start one there (ray start --head) or leave --address out to start Ray on this "
                          "machine") from None


def _local_cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def make_executor(kind: str, pipeline: Path, trials_dir: Path, cache: Path | None, device: str,
                  search: SearchSpec, address: str | None, inputs: list[Path] | None = None) -> LocalExecutor:
    """`inputs`: the files the trials read (checked on every Ray node before the first trial)."""
    if kind == "ray":
        return RayExecutor(pipeline, trials_dir, cache, device, search, address, inputs or [pipeline])
    return LocalExecutor(pipeline, trials_dir, cache, device, search)
