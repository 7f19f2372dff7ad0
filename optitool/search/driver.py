"""`optitool search`: validate, open (or continue) the study, run trials, re-measure the front, write results."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from optitool.atomic import FolderLock
from optitool.config import PipelineSpec
from optitool.errors import ConfigError


def run_search(spec: PipelineSpec, registry: Any, folder: Path, *, executor: str = "local",
               address: str | None = None, storage: str | None = None, cache: Path | None = None, device: str = "auto",
               say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or continue) the search of `spec` in `folder`; returns what search.json holds."""
    search = spec.search
    if search is None or spec.source is None:
        raise ConfigError(f"{spec.source or 'pipeline'}: no [search] table; it names the settings to search, e.g.\n"
                          '[search]\ntrials = 12\n[search.parameters]\n"passes.0.sparsity" = { low = 0.3, high = 0.8 }')
    if storage is not None:  # usage errors before the search folder is made
        from optitool.search.study import check_storage

        check_storage(storage)
    if executor == "ray" and address is not None:
        from optitool.search.executors import probe_cluster

        probe_cluster(address)
    folder.mkdir(parents=True, exist_ok=True)
    with FolderLock(folder, what="search"):  # a second search on this folder would requeue this one's trials
        return _search_in(spec, registry, folder, executor, address, storage, cache, device, say)


def _search_in(spec: PipelineSpec, registry: Any, folder: Path, executor: str, address: str | None,
               storage: str | None, cache: Path | None, device: str, say: Callable[[str], None]) -> dict[str, Any]:
    from optitool.environment import describe
    from optitool.search.executors import make_executor
    from optitool.search.remeasure import remeasure
    from optitool.search.results import best_pipeline, choose_best, remeasured_latency, write_results
    from optitool.search.study import (
        check_same_pipeline,
        open_study,
        pareto_front,
        records,
        requeue_interrupted,
        search_loop,
    )

    search = spec.search
    check_same_pipeline(folder, spec.source.read_text(encoding="utf-8"))
    seed = spec.seed if search.seed is None else search.seed
    study = open_study(search, spec.name, seed, folder, storage)
    if storage is None:  # with a shared database a RUNNING trial may be another worker's
        again = requeue_interrupted(study)
        if again:
            say(f"{again} trial(s) interrupted earlier will run again")
    from optitool.search.shared_storage import pipeline_inputs

    runner = make_executor(executor, spec.source.resolve(), folder / "trials",
                           cache.resolve() if cache is not None else None, device, search, address,
                           pipeline_inputs(spec))
    try:
        say(f"searching {len(search.parameters)} settings with {search.sampler} "
            f"({runner.capacity} trial(s) at a time, {executor}"
            + (f" on {runner.nodes} node(s), each seeing the search's files" if executor == "ray" else "")
            + f"); trials in {folder / 'trials'}")
        search_loop(study, search, runner, say)
    finally:
        runner.close()
    trials = records(study)
    front = pareto_front(trials, search.objectives)
    by_first = next(iter(search.objectives.items()))
    front = sorted(front, key=lambda t: t.values[by_first[0]] * (1 if by_first[1] == "minimize" else -1))[:8]
    remeasured: dict[int, Any] = {}
    measured: list[dict[str, Any]] = []
    if front and spec.benchmark.enabled:
        say(f"re-measuring {len(front)} Pareto candidate(s) and the baseline side by side")
        with _library_output_in(folder / "remeasure.log"):
            measured = remeasure(spec, registry, {f"trial {t.number}": Path(t.folder) for t in front},
                                 _device(device, spec))
        for t, record in zip(front, measured[1:], strict=True):
            remeasured[t.number] = remeasured_latency(record, search.latency_shape)
    best = choose_best(front, remeasured, search)
    text = best_pipeline(spec.raw, best.params, spec.base_dir, folder / "best.toml") if best else None
    env = describe(spec.benchmark.threads or None)
    machine = f"Machine: {env.get('cpu', '?')}, {env.get('cpu_count', '?')} cores, device {_device(device, spec)}."
    return write_results(folder, spec.name, search, trials, front, remeasured, best, measured, text, machine)


@contextmanager
def _library_output_in(path: Path) -> Iterator[None]:
    """What the libraries print while the front is loaded and timed goes to a log file, as in a run."""
    import logging

    from optitool.report.console import library_output_to_log

    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    library = logging.getLogger("optitool.library")
    library.addHandler(handler)
    library.propagate, level = False, library.level
    library.setLevel(logging.INFO)
    try:
        with library_output_to_log(library, verbose=False):
            yield
    finally:
        library.removeHandler(handler)
        library.propagate = True
        library.setLevel(level)
        handler.close()


def _device(device: str, spec: PipelineSpec) -> str:
    from optitool.runner import resolve_device

    return resolve_device(device if device != "auto" else spec.benchmark.device)
