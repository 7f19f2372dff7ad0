"""The chain: load the model, run each pass, save and evaluate each stage, benchmark, report.

Everything that can be checked is checked in `config` before this runs. Each stage folder appears only
when complete (staging folder + rename), and report.json is rewritten after every stage, so a failed or
interrupted run keeps its earlier stages on disk and in the report.
"""

from __future__ import annotations

import logging
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optitool import atomic
from optitool.artifacts import ModelArtifact, OnnxModel, TorchModel
from optitool.bench.memory import rss_mb
from optitool.config import PipelineSpec, check_run_dir_free, resolve_run_dir
from optitool.errors import ConfigError, OptitoolError, PassError, RunError
from optitool.lm import is_causal_lm
from optitool.passes import PassContext
from optitool.plugins import Plugins

SCHEMA_VERSION = 1


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA GPU on this machine; use "
                          "--device cpu or auto")
    return requested


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class PeakMemory:
    """Peak resident memory (and CUDA allocator peak) while a block runs, sampled in a thread."""

    def __init__(self, device: str) -> None:
        self.device, self.peak_rss = device, 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_rss = max(self.peak_rss, rss_mb())

    def __enter__(self) -> PeakMemory:
        import torch

        self.peak_rss = rss_mb()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, rss_mb())

    def as_metrics(self) -> dict[str, float]:
        import torch

        out = {"pass_peak_rss_mb": round(self.peak_rss, 1)}
        if self.device == "cuda":
            out["pass_peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out


def _private_copy(model: ModelArtifact) -> ModelArtifact:
    """A pass may change the model it is given in place; earlier stages must not change with it."""
    import copy
    import dataclasses

    if isinstance(model, OnnxModel):
        return dataclasses.replace(model)
    return dataclasses.replace(model, module=copy.deepcopy(model.module), masks=dict(model.masks),
                               overrides=copy.deepcopy(model.overrides))


def _restorable(folder: Path | None) -> bool:
    """A stage the cache can give back: an ONNX file, or torch weights that reload onto their origin."""
    import json

    if folder is None:
        return False
    if (folder / "model.onnx").is_file():
        return True
    meta = folder / "model.json"
    return meta.is_file() and json.loads(meta.read_text()).get("reloadable", True) and \
        (folder / "model.safetensors").is_file()


@dataclass
class Stage:
    name: str
    artifact: ModelArtifact
    record: dict[str, Any]
    folder: Path | None = None


@dataclass
class RunResult:
    report: dict[str, Any]
    run_dir: Path
    stages: list[Stage] = field(default_factory=list)


def prepare_run_dir(spec: PipelineSpec, output: str | None, overwrite: bool) -> Path:
    run_dir = resolve_run_dir(spec, output)
    check_run_dir_free(run_dir, overwrite)
    return run_dir


def load_model_and_inputs(spec: PipelineSpec, registry: Any) -> tuple[ModelArtifact, Any]:
    """The pipeline's model, and its data as model inputs (tokenized with the model's tokenizer)."""
    from optitool.data.inputs import InputSource
    from optitool.data.sources import Dataset, load_dataset

    dataset = load_dataset(spec.data, spec.base_dir, spec.seed) if spec.data else Dataset({}, [])
    loader = registry.loaders[spec.model.source].obj
    model = loader.load(spec.model, spec.base_dir)
    max_length = (spec.data.max_length if spec.data and spec.data.max_length else spec.model.max_length)
    tokenizer = getattr(model, "tokenizer", None)
    inputs = InputSource(dataset, tokenizer=tokenizer, input_specs=spec.model.inputs,
                         input_names=getattr(model, "input_names", None), max_length=max_length, seed=spec.seed)
    return model, inputs


class Runner:
    def __init__(self, spec: PipelineSpec, plugins: Plugins, run_dir: Path, *, device: str = "auto",
                 overwrite: bool = False, quiet: bool = False, benchmark: bool = True, verbose: bool = False,
                 cache: Path | None = None) -> None:
        from optitool.cache import StageCache
        from optitool.report.console import RunConsole

        self.cache = StageCache(cache) if cache is not None else None
        self._chain_key: str | None = None  # the stage cache key of the stage just made (None: not cacheable)
        self.spec, self.plugins, self.registry = spec, plugins, plugins.registry
        self.run_dir, self.overwrite, self.quiet, self.do_benchmark = run_dir, overwrite, quiet, benchmark
        self.verbose = verbose
        self.console = RunConsole(quiet=quiet)
        self.requested_device = device if device != "auto" else spec.benchmark.device
        self.log = logging.getLogger("optitool.run")
        self.stages: list[Stage] = []
        self.report: dict[str, Any] = {}
        self._state: dict[str, Any] = {}  # ctx.state, shared by the passes of this run

    # ------------------------------------------------------------------------------------------ set-up
    def _load(self) -> tuple[ModelArtifact, Any]:
        return load_model_and_inputs(self.spec, self.registry)

    def _open_run_dir(self) -> None:
        try:
            if self.run_dir.exists() and self.overwrite:
                shutil.rmtree(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise atomic.cannot_create(self.run_dir, exc) from None
        if self.spec.source is not None:
            shutil.copyfile(self.spec.source, self.run_dir / "pipeline.toml")
        atomic.write_json(self.run_dir / "pipeline.resolved.json", self.spec.resolved())
        handler = logging.FileHandler(self.run_dir / "run.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._buffer.setTarget(handler)  # what was logged before the folder existed (model load, evaluation)
        self._buffer.flush()
        self._logger.removeHandler(self._buffer)
        self._logger.addHandler(handler)
        self._handlers.append(handler)

    # ------------------------------------------------------------------------------------------ the run
    def _notify(self, hook_name: str, **kwargs: Any) -> None:
        """A lifecycle hook; a plugin failing in it is optitool's own warning: on the terminal and in run.log."""

        def failed(message: str) -> None:
            self.log.warning(message)
            self.console.warn(message)

        self.plugins.notify(hook_name, on_failure=failed, **kwargs)

    def run(self) -> RunResult:
        """Run the pipeline into the run folder, which no other optitool process may write meanwhile.

        Everything optitool and the libraries it drives log, print or warn goes to run.log (held in memory
        until the folder exists); the terminal gets the run's progress lines only, unless verbose."""
        from logging.handlers import MemoryHandler

        from optitool.report.console import library_output_to_log

        self._logger = logging.getLogger("optitool")
        self._buffer = MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1)
        self._handlers: list[logging.Handler] = [self._buffer]
        saved = (self._logger.level, self._logger.propagate)
        self._logger.setLevel(logging.INFO)
        self._logger.addHandler(self._buffer)
        self._logger.propagate = self.verbose  # libraries such as onnxruntime's quantizer call basicConfig
        try:
            with atomic.FolderLock(self.run_dir), \
                    library_output_to_log(logging.getLogger("optitool.library"), verbose=self.verbose):
                check_run_dir_free(self.run_dir, self.overwrite)  # again: another run may have made it meanwhile
                return self._run()
        finally:
            for handler in self._handlers:
                self._logger.removeHandler(handler)
                handler.close()
            self._logger.setLevel(saved[0])
            self._logger.propagate = saved[1]

    def _run(self) -> RunResult:
        from optitool.environment import describe

        device = resolve_device(self.requested_device)
        seed_everything(self.spec.seed)
        with self.console.step(f"loading the model ({self.spec.model.source}) and data"):
            baseline, inputs = self._load()
        if self.spec.evaluation is not None:
            from optitool.lm_tasks.scoring import check_scorable

            check_scorable(baseline, inputs.tokenizer)
        with self.console.step("evaluating the baseline"):
            baseline_metrics = self._evaluate_baseline(baseline, inputs, device)  # may refuse the data: no write yet
        self._open_run_dir()
        try:
            self.report = {"schema_version": SCHEMA_VERSION, "status": "running", "name": self.spec.name,
                           "device": device, "environment": describe(self.spec.benchmark.threads or None),
                           "pipeline": self.spec.resolved(), "stages": []}
            self._notify("optitool_pipeline_start", spec=self.spec, run_dir=self.run_dir)
            self._run_stages(baseline, baseline_metrics, inputs, device)
            if self.spec.evaluation is not None:
                self._score_tasks(inputs, device)
            if self.do_benchmark and self.spec.benchmark.enabled:
                self._benchmark(inputs, device)
            self.report["status"] = "finished"
            if self.spec.budget is not None:
                from optitool.budget import check_budget

                self.report["budget"] = check_budget(self.report, self.spec.budget)
            if self.spec.output.plots:
                from optitool.report.plots import write_plots

                self.report["plots"] = [str(p.relative_to(self.run_dir)) for p in
                                        write_plots(self.report, self.run_dir / "plots")]
            return RunResult(self.report, self.run_dir, self.stages)
        except KeyboardInterrupt:
            self.report["status"] = "interrupted"
            raise
        except OptitoolError as exc:
            self.report.update(status="failed", error=str(exc))
            raise
        except Exception as exc:
            self.report.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self._write_report()

    def _evaluate_baseline(self, baseline: ModelArtifact, inputs: Any, device: str) -> dict[str, Any]:
        from optitool.evaluation import StageEvaluator

        self.evaluator = StageEvaluator(baseline, inputs, self.registry, device, self.spec.seed)
        try:
            return self.evaluator.baseline_metrics()
        except OptitoolError:
            raise
        except Exception as exc:  # noqa: BLE001 - the model cannot take the inputs the pipeline makes for it
            batches = self.evaluator.batches
            shapes = ", ".join(f"{k}: {list(v.shape)} {str(v.dtype).removeprefix('torch.')}"
                               for k, v in batches[0].inputs.items()) if batches else "none"
            source = "[model.inputs]" if not inputs.is_text else "the tokenizer and [data]"
            raise ConfigError(f"the model could not run on the inputs made from {source} ({shapes}): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; make "
                              f"{source} match what the model's forward takes") from None

    def _run_stages(self, baseline: ModelArtifact, baseline_metrics: dict[str, Any], inputs: Any,
                    device: str) -> None:
        from optitool.models.store import stage_metrics

        origin = getattr(baseline, "origin", None) or self.spec.model.model_dump(exclude_none=True)
        if isinstance(baseline, OnnxModel):
            origin = {**origin, "path": str(baseline.path.resolve())}
        record = {"name": "baseline", "pass": None, "plugin": None, "kind": baseline.kind, "artifact": None,
                  "origin": origin, "metrics": stage_metrics(baseline), "benchmarks": [], "seconds": 0.0,
                  "flags": []}
        record["metrics"].update(baseline_metrics)
        folder = self.run_dir / "00-baseline"
        with atomic.staging_dir(folder) as tmp:
            atomic.write_json(tmp / "stage.json", record)
        self._add_stage(Stage("baseline", baseline, record, None))
        if self.cache is not None:
            self._chain_key = self._first_key(device)
        model = baseline
        for number, pass_spec in enumerate(self.spec.active_passes, start=1):
            model = self._run_pass(number, pass_spec, model, inputs, device)
        unsettled = self._state.get("_handed_on", {})
        if unsettled:
            raise RunError("; ".join(message for _, message in unsettled.values()))

    def _run_pass(self, number: int, pass_spec: Any, model: ModelArtifact, inputs: Any,
                  device: str) -> ModelArtifact:
        plugin = self.registry.passes[pass_spec.pass_name].plugin
        folder = self.run_dir / f"{number:02d}-{pass_spec.stage_name}"
        where = f"pass {pass_spec.pass_name!r} (plugin {plugin!r}, stage {pass_spec.stage_name!r})"
        self.log.info("running %s", where)
        key = self._stage_key(number, pass_spec, plugin)
        hit = self.cache.lookup(key) if self.cache is not None and key is not None else None
        if hit is not None:
            with self.console.step(f"[{number}/{len(self.spec.active_passes)}] {pass_spec.stage_name} "
                                   f"({pass_spec.pass_name}): from the stage cache"):
                return self._restore(hit, pass_spec, folder)
        handed_on = dict(self._state.get("_handed_on", {}))
        with self.console.step(f"[{number}/{len(self.spec.active_passes)}] {pass_spec.stage_name} "
                               f"({pass_spec.pass_name}): run, save, evaluate"):
            result = self._run_pass_here(pass_spec, model, inputs, device, plugin, folder, where)
        if key is not None and self.cache is not None:
            stage = self.stages[-1]
            if self._state.get("_handed_on", {}) != handed_on or not _restorable(stage.folder):
                self._chain_key = None  # what this pass left for later ones is not in the cache: stop here
            else:
                self.cache.store(key, stage.folder, stage.record, getattr(result, "masks", {}) or {})
        return result

    # ------------------------------------------------------------------------------------------ stage cache
    def _first_key(self, device: str) -> str:
        """What every stage of this run depends on: the model's and the data's content (files and user code),
        seed, device, the libraries that compute, and optitool's own code (its version never changes while
        it is edited)."""
        import optitool
        from optitool.cache import code_digest, data_identity, library_versions, model_identity, stage_key
        from optitool.version import __version__

        spec = self.spec
        data = spec.data.model_dump() if spec.data else None
        return stage_key({"model": model_identity(spec.model.model_dump(exclude_none=True), spec.base_dir),
                          "data": data_identity(data, spec.base_dir), "seed": spec.seed, "device": device,
                          "optitool": __version__, "core": code_digest(optitool.__file__),
                          "libraries": library_versions()})

    def _stage_key(self, number: int, pass_spec: Any, plugin: str) -> str | None:
        from optitool.cache import stage_key

        if self.cache is None or self._chain_key is None:
            return None
        settings = self.spec.resolved()["passes"][pass_spec.index]
        info = next((i for i in self.plugins.infos if i.name == plugin), None)
        self._chain_key = stage_key({"parent": self._chain_key, "number": number, "pass": settings,
                                     "plugin": plugin, "version": info.version if info else "",
                                     "code": self._pass_code(pass_spec.pass_name, info)})
        return self._chain_key

    def _pass_code(self, pass_name: str, info: Any) -> list[str]:
        """The source of the plugin that provides a pass and of the module that defines its class (a digest of
        their package's files; built-in plugins keep version 0.1.0 while they are edited)."""
        import inspect
        import sys

        from optitool.cache import code_digest

        files = [getattr(sys.modules.get(info.module), "__file__", None)] if info is not None else []
        try:
            files.append(inspect.getfile(self.registry.passes[pass_name].obj))
        except (TypeError, KeyError, AttributeError):
            pass
        return [code_digest(f) for f in dict.fromkeys(files) if f]

    def _restore(self, hit: tuple[Path, dict[str, Any]], pass_spec: Any, folder: Path) -> ModelArtifact:
        """A stage from the cache: its files into the run folder, its model loaded, its record marked."""
        from optitool.cache import MANIFEST, MASKS, StageCache
        from optitool.models.loaders import load_stage

        entry, cached = hit
        with atomic.staging_dir(folder) as tmp:
            for path in entry.rglob("*"):
                if path.is_file() and path.name not in (MANIFEST, MASKS):
                    target = tmp / path.relative_to(entry)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target)
            record = {**cached, "benchmarks": [], "cached": True}
            atomic.write_json(tmp / "stage.json", record)
        baseline = self.stages[0].artifact
        artifact = load_stage(folder, self.registry.loader_view(),
                              base=baseline if isinstance(baseline, TorchModel) else None)
        if isinstance(artifact, TorchModel):
            artifact.masks = StageCache.masks(entry)
        self._add_stage(Stage(pass_spec.stage_name, artifact, record, folder))
        self._notify("optitool_pass_finished", stage=record, run_dir=self.run_dir)
        return artifact

    def _run_pass_here(self, pass_spec: Any, model: ModelArtifact, inputs: Any, device: str, plugin: str,
                       folder: Path, where: str) -> ModelArtifact:
        from optitool.models.onnx_files import carry_companions
        from optitool.models.store import save_artifact, stage_metrics

        instance = pass_spec.make(self.registry)
        with atomic.staging_dir(folder) as tmp:
            ctx = PassContext(device=device, seed=self.spec.seed, run_dir=self.run_dir, stage_dir=tmp,
                              inputs=inputs, logger=logging.getLogger(f"optitool.pass.{pass_spec.pass_name}"),
                              quiet=self.quiet, state=self._state, stages={s.name: s.artifact for s in self.stages},
                              load_model=self._load_named, pass_name=pass_spec.pass_name,
                              console=None if self.quiet else self.console.console,
                              architectures=tuple(r.obj for r in self.registry.architectures.values()),
                              before_compression=self._before_compression())
            start = time.perf_counter()
            try:
                with PeakMemory(device) as memory:
                    result = instance.run(_private_copy(model), ctx)
            except (KeyboardInterrupt, RunError):
                raise
            except OptitoolError as exc:
                raise RunError(f"{where} failed: {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - a plugin's bug is reported by name, not as a traceback
                self.log.exception("%s raised", where)
                raise RunError(f"{where} raised {type(exc).__name__}: {exc}") from exc
            seconds = time.perf_counter() - start
            if not isinstance(result, ModelArtifact) or result.kind != pass_spec.output_kind:
                got = getattr(result, "kind", type(result).__name__)
                raise RunError(f"{where} returned {got!r}, but it declares that it gives a "
                               f"{pass_spec.output_kind} model")
            if isinstance(result, OnnxModel) and result.task is None:  # the task survives a change of kind
                result.task = model.task if isinstance(model, OnnxModel) else (
                    "text-generation" if is_causal_lm(model) else None)
            file_name, saved = save_artifact(result, tmp)
            if isinstance(result, OnnxModel) and isinstance(model, OnnxModel):
                carry_companions(model.path, tmp / file_name)
            metrics = {**stage_metrics(result, saved), **memory.as_metrics(), **ctx.metrics}
            metrics.update(self.evaluator(result))
            record = {"name": pass_spec.stage_name, "pass": pass_spec.pass_name, "plugin": plugin,
                      "kind": result.kind, "artifact": f"{folder.name}/{file_name}", "metrics": metrics,
                      "benchmarks": [], "seconds": round(seconds, 3), "flags": list(ctx.flags)}
            atomic.write_json(tmp / "stage.json", record)
        if isinstance(result, OnnxModel):
            result.path = folder / "model.onnx"
        self._add_stage(Stage(pass_spec.stage_name, result, record, folder))
        self._notify("optitool_pass_finished", stage=record, run_dir=self.run_dir)
        return result

    def _before_compression(self) -> ModelArtifact | None:
        """The stage that entered the first pass of the chain so far whose class `compresses`."""
        for earlier, stage in zip(self.stages, self.stages[1:], strict=False):
            name = stage.record.get("pass")
            if name in self.registry.passes and self.registry.pass_class(name).compresses:
                return earlier.artifact
        return None

    def _load_named(self, table: dict[str, Any]) -> ModelArtifact:
        """Load a model a pass's settings name (a student, a teacher) with the pipeline's loaders."""
        from pydantic import ValidationError

        from optitool.config import ModelSpec, format_validation_error

        try:
            spec = ModelSpec.model_validate(table)
        except ValidationError as exc:
            raise PassError(format_validation_error(exc, "model table")) from None
        if spec.source not in self.registry.loaders:
            raise PassError(f"unknown model source {spec.source!r}")
        loader = self.registry.loaders[spec.source].obj
        loader.validate(spec, self.spec.base_dir, "model table")
        return loader.load(spec, self.spec.base_dir)

    def _add_stage(self, stage: Stage) -> None:
        self.stages.append(stage)
        self._refresh_stages()

    def _refresh_stages(self) -> None:
        self.report["stages"] = [s.record for s in self.stages]
        self._write_report()

    def _score_tasks(self, inputs: Any, device: str) -> None:
        """[evaluation]'s lm-eval tasks on its stages, each stage's drop from the baseline paired by item."""
        from optitool.lm_tasks.scoring import score_stages

        loader = self.registry.loaders[self.spec.model.source].obj
        context = loader.context_length(self.spec.model, self.spec.base_dir) \
            if hasattr(loader, "context_length") else None
        score_stages(self.stages, self.spec, inputs.tokenizer, device, context_length=context,
                     baseline_folder=self.run_dir / "00-baseline", console=self.console, log=self.log,
                     stage_done=self._refresh_stages)

    def _benchmark(self, inputs: Any, device: str) -> None:
        from optitool.bench.suite import BenchTarget, benchmark_targets

        wanted = self.spec.benchmark.stages
        targets = [BenchTarget(s.name, s.artifact, s.record, s.folder) for s in self.stages
                   if wanted == "all" or s.name in wanted]
        def shape_done(done: int, total: int, shape: str) -> None:
            self.console.say(f"  timed shape {shape} ({done}/{total})")

        try:
            what = "generation" if self.evaluator.causal_lm else "benchmarking"
            with self.console.step(f"{what} of {len(targets)} stages on {device}, interleaved"):
                benchmark_targets(targets, self.spec.benchmark, self.registry, device, inputs, self.log,
                                  progress=shape_done, generation=self.evaluator.causal_lm)
        except OptitoolError:
            raise
        except Exception as exc:  # noqa: BLE001
            self.log.exception("benchmark failed")
            raise RunError(f"the benchmark failed: {type(exc).__name__}: {exc}") from exc
        for stage in self.stages:
            if stage.folder is not None and stage.folder.exists():
                atomic.write_json(stage.folder / "stage.json", stage.record)

    def _write_report(self) -> None:
        from optitool.report.markdown import render

        if self.report:
            atomic.write_json(self.run_dir / "report.json", self.report)
            atomic.write_text(self.run_dir / "report.md", render(self.report))
            if self.report.get("status") != "running":
                self._notify("optitool_report_written", report=self.report,
                                    path=self.run_dir / "report.json")
