"""The search loop: Optuna draws each trial's values (TPE, random or grid), an executor runs trials as
ordinary pipeline runs in fresh processes, and every outcome goes back to the study. The study lives in an
Optuna storage (SQLite in the search folder unless `--storage` names a database), so a search started again
on its folder continues it: finished trials are kept, a trial its killed process left running is run again."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optitool.errors import ConfigError
from optitool.search.spec import Range, SearchSpec
from optitool.search.trial import Outcome

STUDY_DB = "study.db"
PIPELINE_HASH = "pipeline.sha256"


@dataclass
class TrialRecord:
    number: int
    params: dict[str, Any]
    status: str  # feasible, infeasible, failed, interrupted
    values: dict[str, float]
    folder: str
    error: str | None
    budget: list[str]
    metrics: dict[str, Any]


def _sampler(search: SearchSpec, seed: int) -> Any:
    import optuna

    if search.sampler in ("grid", "random"):  # a grid's points are queued by `next_grid_point`
        return optuna.samplers.RandomSampler(seed=seed)
    startup = max(3, min(10, (search.trials or 30) // 3))  # a short search must still get past random start
    # the budget is the constraint: Optuna 5 takes it from each trial (set_constraint), 4 from a function
    constraints = {} if _trial_constraints() else {"constraints_func": _constraints}
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, **constraints)


def _trial_constraints() -> bool:
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def _constraints(trial: Any) -> list[float]:
    """<= 0 is feasible (Optuna's convention): a trial that failed its budget counts as a violation."""
    return [0.0 if trial.user_attrs.get("status") == "feasible" else 1.0]


def suggest(trial: Any, search: SearchSpec) -> dict[str, Any]:
    params = {}
    for key, value in search.parameters.items():
        if search.sampler == "grid" or not isinstance(value, Range):
            choices = search.grid()[key]
            params[key] = trial.suggest_categorical(key, choices)
        elif value.integer:
            params[key] = trial.suggest_int(key, int(value.low), int(value.high), step=int(value.step or 1),
                                            log=value.log)
        else:
            params[key] = trial.suggest_float(key, value.low, value.high, step=value.step, log=value.log)
    return params


def open_study(search: SearchSpec, name: str, seed: int, folder: Path, storage: str | None) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or f"sqlite:///{(folder / STUDY_DB).resolve()}"
    directions = list(search.objectives.values())
    try:
        study = optuna.create_study(storage=url, study_name=name, directions=directions,
                                    sampler=_sampler(search, seed), load_if_exists=True)
    except ValueError as exc:  # the study exists with other directions
        raise ConfigError(f"search storage {url}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy and its drivers raise many types for one cause
        raise _unusable(url, storage is None, folder, exc) from None
    if list(study.user_attrs.get("objectives", search.objectives)) != list(search.objectives):
        raise ConfigError(f"search storage {url}: the study {name!r} optimises {study.user_attrs['objectives']}, "
                          f"not {list(search.objectives)}; use a new search folder")
    study.set_user_attr("objectives", list(search.objectives))
    return study


def check_storage(url: str) -> None:
    """Open a `--storage` database once before anything is written: a URL that cannot be used is a usage
    error naming it, not a failure after the search folder was made."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        optuna.storages.RDBStorage(url)
    except Exception as exc:  # noqa: BLE001 - a bad URL, a missing driver, a refused connection, a damaged file
        raise _unusable(url, False, None, exc) from None


def _unusable(url: str, ours: bool, folder: Path | None, exc: BaseException) -> ConfigError:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    if ours and folder is not None:
        return ConfigError(f"the search folder's study database {folder / STUDY_DB} cannot be read "
                           f"({type(exc).__name__}: {first}); it may be damaged: move it away to start the search "
                           "afresh (the trial folders stay), or search into a new folder")
    return ConfigError(f"--storage {url}: the database cannot be used ({type(exc).__name__}: {first}); give an "
                       "SQLAlchemy URL that Optuna can open, e.g. sqlite:////shared/study.db or "
                       "postgresql://user@host/db (with its driver installed)")


def check_same_pipeline(folder: Path, pipeline_text: str) -> None:
    """A search continues only with the pipeline it started with: its trials would not be comparable."""
    digest = hashlib.sha256(pipeline_text.encode()).hexdigest()
    marker = folder / PIPELINE_HASH
    if marker.is_file() and marker.read_text().strip() != digest:
        raise ConfigError(f"{folder} holds a search of a different pipeline file (it changed since the search "
                          "started); search into a new folder, or put the file back")
    marker.write_text(digest + "\n")


def requeue_interrupted(study: Any) -> int:
    """Trials a killed search left RUNNING are ended as failed without an outcome (shown as interrupted) and
    queued again with their values."""
    import optuna

    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in stale:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=False)
    return len(stale)


def finished(study: Any) -> list[Any]:
    """Trials that ran to an outcome (not interrupted ones, which are run again)."""
    return [t for t in study.get_trials(deepcopy=False)
            if t.state.is_finished() and t.user_attrs.get("status") in ("feasible", "infeasible", "failed")]


def tell(study: Any, trial: Any, outcome: Outcome, folder: Path, search: SearchSpec) -> None:
    import optuna

    trial.set_user_attr("status", outcome.status)
    trial.set_user_attr("folder", str(folder))
    trial.set_user_attr("error", outcome.error)
    trial.set_user_attr("budget", outcome.budget)
    trial.set_user_attr("metrics", {k: v for k, v in outcome.metrics.items() if isinstance(v, int | float | str)})
    if _trial_constraints():
        trial.set_constraint("budget", 0.0 if outcome.status == "feasible" else 1.0)
    if outcome.status == "failed":
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(trial, [outcome.values[name] for name in search.objectives])


def records(study: Any) -> list[TrialRecord]:
    out = []
    for t in study.get_trials(deepcopy=False):
        status = t.user_attrs.get("status", "interrupted" if t.state.is_finished() else "running")
        values = dict(zip(study.user_attrs.get("objectives", []), t.values or [], strict=False))
        out.append(TrialRecord(t.number, dict(t.params), status, values, t.user_attrs.get("folder", ""),
                               t.user_attrs.get("error"), t.user_attrs.get("budget", []),
                               t.user_attrs.get("metrics", {})))
    return out


def pareto_front(trials: list[TrialRecord], objectives: dict[str, str]) -> list[TrialRecord]:
    """Feasible trials no other feasible trial beats on every objective (ties kept once, first wins)."""
    feasible = [t for t in trials if t.status == "feasible"]

    def key(t: TrialRecord) -> tuple[float, ...]:
        return tuple(t.values[n] if d == "minimize" else -t.values[n] for n, d in objectives.items())

    front, seen = [], set()
    for t in feasible:
        dominated = any(all(a <= b for a, b in zip(key(o), key(t), strict=True)) and key(o) != key(t)
                        for o in feasible)
        if not dominated and key(t) not in seen:
            front.append(t)
            seen.add(key(t))
    return front


def grid_size(search: SearchSpec) -> int:
    return math.prod(len(v) for v in search.grid().values())


def next_grid_point(study: Any, search: SearchSpec) -> dict[str, Any] | None:
    """The first point of the grid (in its natural order, the same for every executor) that no trial has
    taken; Optuna's GridSampler stops the study itself, which only works inside study.optimize."""
    import itertools

    import optuna

    grid = search.grid()
    taken = [t.params or t.system_attrs.get("fixed_params", {}) for t in study.get_trials(deepcopy=False)
             if t.state != optuna.trial.TrialState.FAIL or t.user_attrs.get("status") == "failed"]
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values, strict=True))
        if point not in taken:
            return point
    return None


def _waiting(study: Any) -> bool:
    """Whether a queued trial (an interrupted one queued again) is waiting: `ask` takes it before any point
    queued after it, so queuing another grid point then would leave that point waiting forever."""
    import optuna

    return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


def search_loop(study: Any, search: SearchSpec, executor: Any, say: Callable[[str], None]) -> None:
    """Ask for trials until the trial count, the time budget or the grid is used up, keeping the executor
    as busy as it can be (`executor.capacity` trials at once); tell the study each outcome as it comes."""
    total = search.trials or (grid_size(search) if search.sampler == "grid" else 10**9)
    if search.sampler == "grid":
        total = min(total, grid_size(search))
    deadline = time.monotonic() + search.timeout_minutes * 60 if search.timeout_minutes else math.inf
    done = len(finished(study))
    if done:
        say(f"continuing the search: {done} trials already finished")
    in_flight: dict[int, tuple[Any, Path]] = {}
    while True:
        while len(in_flight) < executor.capacity and done + len(in_flight) < total and time.monotonic() < deadline:
            if search.sampler == "grid" and not _waiting(study):  # a trial queued again goes first
                point = next_grid_point(study, search)
                if point is None:
                    break
                study.enqueue_trial(point)
            trial = study.ask()
            in_flight[trial.number] = (trial, executor.submit(trial.number, suggest(trial, search)))
        if not in_flight:
            return
        number, outcome = executor.wait_one()
        trial, folder = in_flight.pop(number)
        tell(study, trial, outcome, folder, search)
        done += 1
        _progress(study, search, number, outcome, done, total, say)


def _progress(study: Any, search: SearchSpec, number: int, outcome: Outcome, done: int, total: int,
              say: Callable[[str], None]) -> None:
    trials = records(study)
    front = pareto_front(trials, search.objectives)
    shown = " ".join(f"{k}={v:.4g}" for k, v in outcome.values.items())
    why = f" ({outcome.error})" if outcome.error else (f" ({'; '.join(outcome.budget)})" if outcome.budget else "")
    first, direction = next(iter(search.objectives.items()))
    feasible = [t for t in trials if t.status == "feasible"]
    best = (min if direction == "minimize" else max)(feasible, key=lambda t: t.values[first]) if feasible else None
    best_text = f"best {first} {best.values[first]:.4g} (trial {best.number})" if best else "no feasible trial yet"
    limit = f"/{total}" if total < 10**9 else ""
    say(f"trial {number}: {outcome.status} {shown}{why}  [{done}{limit} done, {best_text}, Pareto front "
        f"{len(front)}]")
