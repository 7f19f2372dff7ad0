"""TOML pipeline file -> PipelineSpec, fully validated (every pass's settings included) before anything loads."""

from __future__ import annotations

import copy
import difflib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from optitool.errors import ConfigError
from optitool.passes import Pass, PassConfig
from optitool.registry import Registry
from optitool.search.spec import PARAMETER, STAGE_OBJECTIVES, Range, SearchSpec, set_parameter
from optitool.spec import BenchmarkSpec, BudgetSpec, DataSpec, EvaluationSpec, ModelSpec, OutputSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RESERVED_PASS_KEYS = ("pass", "name", "enabled")


class PassSpec(BaseModel):
    """One `[[passes]]` entry: the registered pass, its stage name and its validated settings."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    index: int
    pass_name: str
    stage_name: str
    enabled: bool
    settings: dict[str, Any]
    config: PassConfig
    input_kind: str = ""
    output_kind: str = ""

    def make(self, registry: Registry) -> Pass:
        return registry.pass_class(self.pass_name)(self.config)


class PipelineSpec(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    name: str
    seed: int
    model: ModelSpec
    data: DataSpec | None
    passes: list[PassSpec]
    benchmark: BenchmarkSpec
    budget: BudgetSpec | None
    output: OutputSpec
    search: SearchSpec | None = None
    evaluation: EvaluationSpec | None = None
    evaluation_tasks: list[Any] = []  # the TaskRefs [evaluation] names, resolved by validation
    base_dir: Path
    source: Path | None
    raw: dict[str, Any]

    @property
    def active_passes(self) -> list[PassSpec]:
        return [p for p in self.passes if p.enabled]

    def resolved(self) -> dict[str, Any]:
        """The configuration as run: every default filled in, for report.json and the run folder."""
        return {
            "name": self.name, "seed": self.seed,
            "model": self.model.model_dump(exclude_defaults=False),
            "data": self.data.model_dump() if self.data else None,
            "passes": [{"pass": p.pass_name, "name": p.stage_name, "enabled": p.enabled,
                        **p.config.model_dump(mode="json")} for p in self.passes],
            "benchmark": self.benchmark.model_dump(),
            "budget": self.budget.model_dump(exclude_none=True) if self.budget else None,
            "evaluation": self.evaluation.model_dump() if self.evaluation else None,
            "output": self.output.model_dump(),
        }


# ---------------------------------------------------------------------------------------------- parsing


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _explain(error: dict[str, Any]) -> str:
    kind, loc = error["type"], error["loc"]
    if kind == "extra_forbidden":
        return f"unknown key {loc[-1]!r}"
    if kind == "missing":
        return f"required key {loc[-1]!r} is missing"
    got = error.get("input")
    shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
    message = error["msg"].removeprefix("Value error, ").rstrip(".")
    return f"{message}{shown}"


def format_validation_error(exc: ValidationError, where: str, prefix: tuple[Any, ...] = ()) -> str:
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in (*prefix, *err["loc"]) if not (isinstance(p, str) and p.startswith("function-")))
        problems.append(f"{_where(loc[:-1] if err['type'] in ('extra_forbidden', 'missing') else loc) if loc else ''}"
                        f"{': ' if loc else ''}{_explain(err)}")
    return f"{where}: " + "; ".join(problems)


def parse_value(text: str) -> Any:
    """A --set value is read as a TOML value (0.7, true, [1, 2], "x"), or as a plain string otherwise."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, for example --set passes.0.sparsity=0.7")
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {here!r} does not exist (the list has {len(node)} entries, "
                                  f"numbered from 0)")
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                if here in _SECTIONS:
                    node[part] = {}
                else:
                    raise ConfigError(f"--set {key}: there is no {here!r} in the pipeline")
            node = node[part]
        else:
            raise ConfigError(f"--set {key}: {here!r} is a value, not a table")
    if not isinstance(node, dict):
        raise ConfigError(f"--set {key}: cannot set {parts[-1]!r} inside a list or value")
    node[parts[-1]] = parse_value(value.strip())


_SECTIONS = ("model", "data", "benchmark", "budget", "output", "evaluation", "data.splits", "model.inputs")
_TOP_KEYS = {"name", "seed", "model", "data", "passes", "benchmark", "budget", "evaluation", "output", "search"}


def load_pipeline(path: str | Path, registry: Registry, overrides: tuple[str, ...] = ()) -> PipelineSpec:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"pipeline file {str(path)!r} is a folder; name the .toml file inside it")
    if not path.is_file():
        raise ConfigError(f"pipeline file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the pipeline file: {exc}") from exc
    return parse_pipeline_text(text, registry, base_dir=path.resolve().parent, source=path, overrides=overrides)


def parse_pipeline_text(text: str, registry: Registry, *, base_dir: Path, source: Path | None = None,
                        overrides: tuple[str, ...] = ()) -> PipelineSpec:
    where = str(source) if source else "pipeline"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from exc
    raw = copy.deepcopy(raw)
    for assignment in overrides:
        apply_override(raw, assignment)
    return build_spec(raw, registry, base_dir=base_dir, source=source, where=where, overrides=overrides)


def _section(cls: type[BaseModel], raw: Any, key: str, where: str, overrides: tuple[str, ...]) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: [{key}] must be a table, not {type(raw).__name__}")
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        message = format_validation_error(exc, where, (key,))
        raise ConfigError(message + _override_hint(overrides, key)) from None


def _override_hint(overrides: tuple[str, ...], prefix: str) -> str:
    used = [o.partition("=")[0] for o in overrides if o.startswith(prefix)]
    return f" (set on the command line with --set {', --set '.join(used)})" if used else ""


def build_spec(raw: dict[str, Any], registry: Registry, *, base_dir: Path, source: Path | None = None,
               where: str = "pipeline", overrides: tuple[str, ...] = ()) -> PipelineSpec:
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key {unknown[0]!r}; the pipeline file knows "
                          f"{', '.join(sorted(_TOP_KEYS))}" + _override_hint(overrides, unknown[0]))
    name = raw.get("name", source.stem if source else "pipeline")
    seed = raw.get("seed", 0)
    if not isinstance(name, str) or not name or any(c in name for c in "/\\"):
        raise ConfigError(f"{where}: `name` must be a non-empty string without slashes (got {name!r})")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{where}: `seed` must be an integer (got {seed!r})")
    if "model" not in raw:
        raise ConfigError(f"{where}: the [model] table is missing; it says which model to load, e.g.\n"
                          '[model]\nsource = "hf"\npath = "path/to/model"')
    model = _section(ModelSpec, raw["model"], "model", where, overrides)
    data = _section(DataSpec, raw["data"], "data", where, overrides) if "data" in raw else None
    benchmark = _section(BenchmarkSpec, raw.get("benchmark", {}), "benchmark", where, overrides)
    budget = _section(BudgetSpec, raw["budget"], "budget", where, overrides) if "budget" in raw else None
    output = _section(OutputSpec, raw.get("output", {}), "output", where, overrides)
    evaluation = _section(EvaluationSpec, raw["evaluation"], "evaluation", where, overrides) \
        if "evaluation" in raw else None
    _check_loader(model, registry, base_dir, where)
    passes = _build_passes(raw.get("passes", []), registry, where, overrides)
    _check_kinds(passes, registry, _initial_kind(model, registry), where)
    _check_runtimes(benchmark, registry, where)
    _check_stage_names(passes, registry, benchmark, budget, where)
    _check_context(model, data, benchmark, registry, base_dir, where)
    _check_budget_shapes(benchmark, budget, where)
    task = _declared_task(model, registry, base_dir)
    if task is not None:
        _check_language_model_budget(task, budget, where)
        for spec in passes:
            if spec.enabled:
                try:
                    spec.make(registry).check_task(task)
                except ConfigError as exc:
                    raise ConfigError(f"{where}: passes[{spec.index}] (pass {spec.pass_name!r}): {exc}") from None
    _check_widths(passes, registry, model, base_dir, where)
    _check_data_needs(passes, registry, data, task, where)
    evaluation_tasks = _check_evaluation(evaluation, budget, model, passes, task, registry, base_dir, where)
    search = _parse_search(raw, where)
    if search is not None:
        _check_search(search, raw, registry, base_dir, where, source)
    spec = PipelineSpec(name=name, seed=seed, model=model, data=data, passes=passes, benchmark=benchmark,
                        budget=budget, output=output, search=search, evaluation=evaluation,
                        evaluation_tasks=evaluation_tasks, base_dir=base_dir, source=source, raw=raw)
    if data is not None:
        from optitool.data.sources import check_data_spec

        check_data_spec(data, base_dir, where)
    return spec


def _check_loader(model: ModelSpec, registry: Registry, base_dir: Path, where: str) -> None:
    if model.source not in registry.loaders:
        raise ConfigError(f"{where}: [model].source = {model.source!r} is not a known model loader; "
                          f"known: {', '.join(sorted(registry.loaders))}")
    loader = registry.loaders[model.source].obj
    validate = getattr(loader, "validate", None)
    if validate is not None:
        validate(model, base_dir, where)


def _initial_kind(model: ModelSpec, registry: Registry) -> str:
    return getattr(registry.loaders[model.source].obj, "kind", "torch")


def _build_passes(entries: Any, registry: Registry, where: str, overrides: tuple[str, ...]) -> list[PassSpec]:
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: `passes` must be an array of tables ([[passes]]), not {type(entries).__name__}")
    specs: list[PassSpec] = []
    names: set[str] = set()
    for i, entry in enumerate(entries):
        here = f"{where}: passes[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{here} must be a table")
        if "pass" not in entry:
            raise ConfigError(f"{here} has no `pass` key naming the pass to run (`optitool passes` lists them)")
        pass_name = entry["pass"]
        if pass_name not in registry.passes:
            known = sorted(registry.passes)
            close = difflib.get_close_matches(str(pass_name), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{here}: unknown pass {pass_name!r}{hint} Known passes: {', '.join(known)} "
                              "(`optitool passes` lists them with their plugins)")
        stage_name = entry.get("name", pass_name)
        enabled = entry.get("enabled", True)
        if not isinstance(stage_name, str) or not stage_name or stage_name == "baseline":
            raise ConfigError(f"{here}: `name` must be a non-empty string other than 'baseline'")
        if not isinstance(enabled, bool):
            raise ConfigError(f"{here}: `enabled` must be true or false (got {enabled!r})")
        if enabled and stage_name in names:
            raise ConfigError(f"{here}: stage name {stage_name!r} is used twice; give one of them `name = \"...\"`")
        names.add(stage_name)
        settings = {k: v for k, v in entry.items() if k not in RESERVED_PASS_KEYS}
        cls = registry.pass_class(pass_name)
        try:
            config = cls.Config.model_validate(settings)
        except ValidationError as exc:
            message = format_validation_error(exc, f"{here} (pass {pass_name!r}, plugin "
                                                   f"{registry.passes[pass_name].plugin!r})")
            raise ConfigError(message + _override_hint(overrides, f"passes.{i}.")) from None
        specs.append(PassSpec(index=i, pass_name=pass_name, stage_name=stage_name, enabled=enabled,
                              settings=settings, config=config))
    return specs


def _converters(registry: Registry, have: str, need: tuple[str, ...]) -> str:
    """Passes some plugin provides that turn a `have` model into one of `need`, for the error message."""
    found = sorted(name for name, reg in registry.passes.items()
                   if have in reg.obj.accepted_kinds() and reg.obj.gives in need)
    return f" ({', '.join(found)} turn{'s' if len(found) == 1 else ''} a {have} model into {' or '.join(need)})" \
        if found else ""


def _check_kinds(passes: list[PassSpec], registry: Registry, kind: str, where: str) -> None:
    previous = "the model loader"
    for spec in passes:
        if not spec.enabled:
            continue
        instance = spec.make(registry)
        accepted = instance.accepted_kinds()
        if kind not in accepted:
            raise ConfigError(
                f"{where}: passes[{spec.index}] (pass {spec.pass_name!r}) takes {' or '.join(accepted)} models, "
                f"but {previous} gives {'an' if kind[0] in 'aeiou' else 'a'} {kind} model; reorder the passes or "
                f"convert the model first{_converters(registry, kind, accepted)}")
        instance.check(kind)
        spec.input_kind, spec.output_kind = kind, instance.output_kind(kind)
        kind = spec.output_kind
        previous = f"passes[{spec.index}] (pass {spec.pass_name!r})"
    kinds = {kind} | {p.input_kind for p in passes if p.enabled}
    if "onnx" in kinds and importlib.util.find_spec("onnxruntime") is None:
        raise ConfigError(f"{where}: this pipeline makes ONNX models, which are evaluated and benchmarked with "
                          "onnxruntime, and onnxruntime is not installed; pip install \"optitool[cpu]\" (or "
                          "\"optitool[gpu]\" on a CUDA machine, never both)")


def _check_stage_names(passes: list[PassSpec], registry: Registry, benchmark: BenchmarkSpec,
                       budget: BudgetSpec | None, where: str) -> None:
    """Stages named in [benchmark] and [budget] must be stages this pipeline makes, and a stage a pass
    setting names (a distillation teacher) one made before that pass."""
    names = ["baseline"] + [p.stage_name for p in passes if p.enabled]
    earlier = ["baseline"]
    for spec in passes:
        if not spec.enabled:
            continue
        for setting, name in spec.make(registry).stages_named().items():
            if name not in earlier:
                raise ConfigError(f"{where}: passes[{spec.index}] (pass {spec.pass_name!r}): {setting} = {name!r} is "
                                  f"not a stage made before it; the stages before it are {', '.join(earlier)}")
        earlier.append(spec.stage_name)
    wanted = [] if benchmark.stages == "all" else [("[benchmark].stages", s) for s in benchmark.stages]
    if budget is not None and budget.stage != "final":
        wanted.append(("[budget].stage", budget.stage))
    for key, name in wanted:
        if name not in names:
            raise ConfigError(f"{where}: {key} names {name!r}, which is not a stage of this pipeline; its stages "
                              f"are {', '.join(names)}" + (" (and 'final', the last)" if key == "[budget].stage" else ""))


def _check_evaluation(evaluation: EvaluationSpec | None, budget: BudgetSpec | None, model: ModelSpec,
                      passes: list[PassSpec], task: str | None, registry: Registry, base_dir: Path,
                      where: str) -> list[Any]:
    from optitool.lm_tasks.validate import check_evaluation

    loader = registry.loaders[model.source].obj
    context = loader.context_length(model, base_dir) if hasattr(loader, "context_length") else None
    names = ["baseline"] + [p.stage_name for p in passes if p.enabled]
    return check_evaluation(evaluation, budget, model_task=task, context_length=context, stage_names=names,
                            base_dir=base_dir, where=where)


def _check_context(model: ModelSpec, data: DataSpec | None, benchmark: BenchmarkSpec, registry: Registry,
                   base_dir: Path, where: str) -> None:
    """Sequence lengths beyond what the model takes fail deep inside it after minutes of loading: refuse
    them now where the model's files say its context length."""
    loader = registry.loaders[model.source].obj
    limit = loader.context_length(model, base_dir) if hasattr(loader, "context_length") else None
    if limit is None:
        return
    asked = [("[model].max_length", model.max_length)]
    if data is not None and data.max_length:
        asked.append(("[data].max_length", data.max_length))
    if benchmark.enabled:
        asked += [("[benchmark].sequence_lengths", n) for n in benchmark.sequence_lengths]
        if hasattr(loader, "generates") and loader.generates(model, base_dir):  # a prompt, then its new tokens
            asked += [(f"[benchmark].sequence_lengths ({n}) + new_tokens ({benchmark.new_tokens})",
                       n + benchmark.new_tokens) for n in benchmark.sequence_lengths]
    for key, length in asked:
        if length > limit:
            raise ConfigError(f"{where}: {key} asks for {length} tokens, but the model takes at most {limit} "
                              "(its context length)")


def _check_budget_shapes(benchmark: BenchmarkSpec, budget: BudgetSpec | None, where: str) -> None:
    """A latency or memory limit the benchmark never measures could only ever fail."""
    if budget is None:
        return
    timed = [k for k in ("min_speedup", "max_latency_ms", "max_peak_memory_mb") if getattr(budget, k) is not None]
    if timed and not benchmark.enabled:
        raise ConfigError(f"{where}: [budget].{timed[0]} needs the benchmark, and [benchmark] enabled = false")
    if budget.max_peak_memory_mb is not None and not benchmark.memory:
        raise ConfigError(f"{where}: [budget].max_peak_memory_mb needs memory measurements, and [benchmark] "
                          "memory = false")
    if not isinstance(budget.max_latency_ms, dict):
        return
    shapes = [f"{b}x{n}" for b in benchmark.batch_sizes for n in benchmark.sequence_lengths]
    shapes += [f"{s} {measure}" for s in list(shapes) for measure in ("ttft", "decode")]  # causal LMs
    shapes += [str(b) for b in benchmark.batch_sizes]  # models without a sequence axis
    for shape in budget.max_latency_ms:
        if shape not in shapes:
            raise ConfigError(f"{where}: [budget].max_latency_ms has a limit for shape {shape!r}, which "
                              f"[benchmark] does not measure; it measures {', '.join(shapes)} (batch x sequence "
                              "length; '<shape> ttft' and '<shape> decode' for causal language models; batch "
                              "alone for models without a sequence axis)")


LANGUAGE_MODEL_BUDGETS = ("max_perplexity_increase", "min_token_agreement", "min_generation_agreement")
ENCODER_BUDGETS = ("max_accuracy_drop", "min_fidelity")


def _declared_task(model: ModelSpec, registry: Registry, base_dir: Path) -> str | None:
    """The task the model's files declare, when its loader can tell without loading it."""
    says = getattr(registry.loaders[model.source].obj, "task", None)
    return says(model, base_dir) if says is not None else None


def _check_language_model_budget(task: str, budget: BudgetSpec | None, where: str) -> None:
    """Perplexity, token and generation agreement, time to first token and decode latency are measured for
    causal language models only, and accuracy and fidelity (on the main output) for every other model: a
    budget on what the model's task never measures could only ever fail, after the run."""
    if budget is None:
        return
    if task == "text-generation":
        asked = [f"[budget].{k}" for k in ENCODER_BUDGETS if getattr(budget, k) is not None]
        if asked:
            raise ConfigError(f"{where}: {asked[0]} is measured on classifiers and encoders, and [model] is a causal "
                              "language model, which is judged per token: use max_perplexity_increase, "
                              "min_token_agreement or min_generation_agreement instead")
        plain = [shape for shape in budget.max_latency_ms or {} if not shape.endswith((" ttft", " decode"))] \
            if isinstance(budget.max_latency_ms, dict) else []
        if plain:
            raise ConfigError(f"{where}: [budget].max_latency_ms has a limit for shape {plain[0]!r}, and a causal "
                              "language model is timed in generation only: limit '<shape> ttft' (time to the first "
                              f"token) or '<shape> decode' (each further token), e.g. '{plain[0]} decode'")
        return
    asked = [f"[budget].{k}" for k in LANGUAGE_MODEL_BUDGETS if getattr(budget, k) is not None]
    if isinstance(budget.max_latency_ms, dict):
        asked += [f"[budget].max_latency_ms {shape!r}" for shape in budget.max_latency_ms
                  if shape.endswith((" ttft", " decode"))]
    if asked:
        raise ConfigError(f"{where}: {asked[0]} is measured for causal language models only, and [model] is a "
                          f"{task!r} model (its config names no ...ForCausalLM architecture); drop that limit, or "
                          'load a causal LM (task = "text-generation")')


def _check_widths(passes: list[PassSpec], registry: Registry, model: ModelSpec, base_dir: Path, where: str) -> None:
    """Settings the model's layer widths cannot take (a quantization block that does not divide them) are
    refused before anything loads, as far down the chain as the widths are known to hold."""
    says = getattr(registry.loaders[model.source].obj, "weight_widths", None)
    widths = says(model, base_dir) if says is not None else None
    if not widths:
        return
    for spec in passes:
        if not spec.enabled:
            continue
        instance = spec.make(registry)
        try:
            instance.check_widths(widths)
        except ConfigError as exc:
            raise ConfigError(f"{where}: passes[{spec.index}] (pass {spec.pass_name!r}): {exc}") from None
        if not instance.keeps_widths:
            return


def _check_data_needs(passes: list[PassSpec], registry: Registry, data: DataSpec | None, task: str | None,
                      where: str) -> None:
    """A pass that needs a split (or labels in it) says so in `data_needs`; a pipeline that cannot give
    them is refused now rather than after the passes before it have run. A causal LM's text is its own
    labels (each next token)."""
    for spec in passes:
        if not spec.enabled:
            continue
        for split, what in spec.make(registry).data_needs().items():
            here = f"{where}: passes[{spec.index}] (pass {spec.pass_name!r})"
            if data is None or not data.declares_split(split):
                raise ConfigError(f"{here} needs a {split!r} split of real data, and the pipeline has none; add a "
                                  f"[data] table that reads examples (folder, jsonl, csv, ...) with a {split} "
                                  f"entry in [data.splits], e.g. splits = {{ {split} = 0.5, eval = 0.2 }}")
            if what == "labels" and not data.has_labels and task != "text-generation":
                raise ConfigError(f"{here} needs labels in the {split!r} split, and [data] declares none "
                                  "(label_field is empty); give the data labels or change the pass's settings")


def resolve_run_dir(spec: PipelineSpec, output: str | None) -> Path:
    """The run folder (--output, else [output].dir), absolute; refused when it cannot be a folder."""
    where = "--output" if output else f"{spec.source or 'pipeline'}: [output].dir"
    run_dir = (Path(output) if output else Path(spec.output.folder(spec.name))).expanduser().absolute()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{where}: {run_dir} is an existing file, not a folder; choose another run folder")
    for parent in run_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{where}: {run_dir} lies under {parent}, which is a file; choose another run folder")
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: {run_dir} cannot be written ({existing} is not writable); choose another "
                          "run folder")
    return run_dir


RUN_FOLDER_MARKS = ("report.json", "pipeline.resolved.json")


def check_run_dir_free(run_dir: Path, overwrite: bool) -> None:
    """A run never mixes with what is in its folder: an existing non-empty folder is refused, and
    --overwrite replaces only a folder an optitool run wrote (never, say, the current folder by mistake)."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"the run folder {run_dir} already exists; pass --overwrite to replace it or "
                          "--output to choose another")
    if not any((run_dir / mark).is_file() for mark in RUN_FOLDER_MARKS):
        raise ConfigError(f"{run_dir} is not empty and is not an optitool run folder (it has no "
                          f"{' or '.join(RUN_FOLDER_MARKS)}); --overwrite replaces only run folders, so nothing "
                          "was deleted: choose another --output")


def _check_runtimes(benchmark: BenchmarkSpec, registry: Registry, where: str) -> None:
    for name in benchmark.runtimes:
        if name not in registry.runtimes:
            raise ConfigError(f"{where}: [benchmark].runtimes names {name!r}, which is not a known runtime; "
                              f"known: {', '.join(sorted(registry.runtimes))}")


def _parse_search(raw: dict[str, Any], where: str) -> SearchSpec | None:
    table = raw.get("search")
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [search] must be a table")
    try:
        return SearchSpec.model_validate(table)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where, ("search",))) from None


RANGE_VALUES_CHECKED = 256  # an integer range this short has every value checked, not only its ends


def _values_to_check(value: list[Any] | Range) -> list[Any]:
    """Every value a parameter can take where they can be listed (choices, a grid, a short integer range: a
    pass may refuse one in the middle, like a block size that is not a power of 2), else a range's ends."""
    if not isinstance(value, Range):
        return list(value)
    if value.step is not None:
        return value.grid()
    if value.integer and value.high - value.low < RANGE_VALUES_CHECKED:
        return list(range(int(value.low), int(value.high) + 1))
    return value.ends()


LANGUAGE_MODEL_OBJECTIVES = ("perplexity", "token_agreement", "kl_to_baseline", "generation_agreement")


def _check_objectives_for_task(search: SearchSpec, raw: dict[str, Any], registry: Registry, base_dir: Path,
                               where: str) -> None:
    """A causal LM is judged per token, anything else on its main output: an objective its task never
    reports would leave every trial without a value (and the search without a result)."""
    model = raw.get("model")
    if not isinstance(model, dict) or model.get("source") not in registry.loaders:
        return
    task = _declared_task(ModelSpec.model_validate(model), registry, base_dir)
    if task is None:
        return
    causal = task == "text-generation"
    for name in search.objectives:
        if causal and name in registry.metrics:
            raise ConfigError(f"{where}: [search] objective {name!r} is measured on classifiers and encoders, and "
                              "[model] is a causal language model: use one of "
                              f"{', '.join(LANGUAGE_MODEL_OBJECTIVES)}, latency_ms or size_mb")
        if not causal and name in LANGUAGE_MODEL_OBJECTIVES:
            raise ConfigError(f"{where}: [search] objective {name!r} is measured for causal language models only, "
                              f"and [model] is a {task!r} model: use one of {', '.join(sorted(registry.metrics))}, "
                              "latency_ms or size_mb")


def _check_search(search: SearchSpec, raw: dict[str, Any], registry: Registry, base_dir: Path, where: str,
                 source: Path | None) -> None:
    """Every parameter names an existing pass setting, and the pipeline with each of its values (both ends
    of a range) is valid; the objectives can be measured."""
    passes = raw.get("passes", [])
    base = {k: v for k, v in raw.items() if k != "search"}
    for key, value in search.parameters.items():
        here = f"{where}: [search] parameters {key!r}"
        match = PARAMETER.match(key)
        if not match:
            raise ConfigError(f"{here}: a parameter is a pass setting written passes.N.setting (N from 0), "
                              "for example \"passes.0.sparsity\"")
        index, setting = int(match[1]), match[2]
        if index >= len(passes) or not isinstance(passes[index], dict):
            raise ConfigError(f"{here}: the pipeline has {len(passes)} passes (numbered from 0)")
        name = passes[index].get("pass")
        known = set(registry.pass_class(name).Config.model_fields) | {"enabled"} if name in registry.passes else set()
        if known and setting not in known:
            raise ConfigError(f"{here}: pass {name!r} has no setting {setting!r}; it has "
                              f"{', '.join(sorted(known))}")
        if search.sampler == "grid" and isinstance(value, Range) and value.step is None:
            raise ConfigError(f"{here}: a range in a grid search needs a step")
        for candidate in _values_to_check(value):
            trial = copy.deepcopy(base)
            set_parameter(trial, key, candidate)
            try:
                build_spec(trial, registry, base_dir=base_dir, source=source, where=where)
            except ConfigError as exc:
                raise ConfigError(f"{here}: the value {candidate!r} is refused: {exc}") from None
    known = sorted({*STAGE_OBJECTIVES, *registry.metrics})
    unknown = [name for name in search.objectives if name not in known]
    if unknown:
        raise ConfigError(f"{where}: [search] objective {unknown[0]!r} is no metric a stage reports; objectives "
                          f"name one of {', '.join(known)}")
    _check_objectives_for_task(search, raw, registry, base_dir, where)
    bench = raw.get("benchmark", {})
    if "latency_ms" in search.objectives and isinstance(bench, dict) and bench.get("enabled") is False:
        raise ConfigError(f"{where}: [search] objective 'latency_ms' needs the benchmark; [benchmark] "
                          "enabled = false")
