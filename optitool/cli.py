"""The command line. Imports here stay light: torch and onnxruntime load only inside commands that run models."""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from optitool.errors import BudgetError, ConfigError, OptitoolError, Terminated

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def _fail(message: str, code: int) -> None:
    click.echo(f"optitool: error: {message}", err=True)
    sys.exit(code)


def handled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn optitool's errors into a one-paragraph message and an exit code; a traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        previous = _on_sigterm(_terminate)
        try:
            return fn(*args, **kwargs)
        except OptitoolError as exc:
            if debug:
                traceback.print_exc()
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt as exc:
            what = "terminated" if isinstance(exc, Terminated) else "interrupted"
            click.echo(f"optitool: {what}; finished stages are kept, no half-written stage was left", err=True)
            sys.exit(EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - last resort: still no traceback unless asked
            if debug:
                traceback.print_exc()
            _fail(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)", EXIT_FAILED)
        finally:
            _on_sigterm(previous)

    return wrapper


def _on_sigterm(handler: Any) -> Any:
    """Install a SIGTERM handler where one can be (the main thread); returns the previous one."""
    import signal
    import threading

    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--block", "blocked", multiple=True, metavar="PLUGIN", help="Do not load this plugin (repeatable).")
@click.version_option(package_name="optitool")
@click.pass_context
def cli(ctx: click.Context, debug: bool, blocked: tuple[str, ...]) -> None:
    """optitool: make a model smaller and faster, and prove it.

    \b
    optitool run PIPELINE.toml      run the passes, evaluate, benchmark and report
    optitool validate PIPELINE.toml check a pipeline without loading anything
    optitool passes                 list the passes plugins provide
    optitool bench MODEL            benchmark a model or run folder
    optitool compare BASE NEW       compare two reports, flag regressions beyond the noise

    Exit codes: 0 success, 1 run failed or budget not met, 2 usage or configuration error.
    """
    ctx.obj = {"blocked": blocked}


def _plugins(ctx: click.Context) -> Any:
    import warnings

    from optitool.plugins import get_plugin_manager

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plugins = get_plugin_manager(blocked=ctx.find_root().obj["blocked"])
    for w in caught:
        click.echo(f"optitool: warning: {w.message}", err=True)
    return plugins


def _spec(ctx: click.Context, pipeline: str, overrides: tuple[str, ...], output: str | None) -> tuple[Any, Any, Path]:
    """The plugins, the validated pipeline and its run folder: everything `validate` checks."""
    from optitool.config import load_pipeline, resolve_run_dir

    plugins = _plugins(ctx)
    spec = load_pipeline(pipeline, plugins.registry, overrides)
    return plugins, spec, resolve_run_dir(spec, output)


@cli.command()
@click.argument("pipeline", type=click.Path())
@click.option("--output", "-o", type=click.Path(), help="Run folder (default: [output].dir, runs/<name>).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a pipeline key, e.g. --set passes.0.sparsity=0.7 (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder.")
@click.option("--no-benchmark", is_flag=True, help="Skip the benchmark (evaluation still runs).")
@click.option("--quiet", "-q", is_flag=True, help="Only errors and the final verdict.")
@click.option("--verbose", "-v", is_flag=True, help="Let libraries print to the terminal (otherwise: run.log).")
@click.option("--cache", "cache", type=click.Path(), help="A stage cache folder: stages computed before with the "
              "same model, data, settings, plugins and seed are taken from it, new ones added.")
@click.pass_context
@handled
def run(ctx: click.Context, pipeline: str, output: str | None, device: str, overrides: tuple[str, ...],
        overwrite: bool, no_benchmark: bool, quiet: bool, verbose: bool, cache: str | None) -> None:
    """Run PIPELINE: load the model, run the passes, evaluate, benchmark, write the report."""
    from optitool.distributed import relaunch, torchrun_world
    from optitool.paths import writable_folder
    from optitool.report.table import budget_lines, terminal_table
    from optitool.runner import Runner, prepare_run_dir

    plugins, spec, run_dir = _spec(ctx, pipeline, overrides, output)
    rank, size = torchrun_world()
    if rank > 0:  # rank 0 writes the run; the others follow the same chain in a folder of their own
        import shutil
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix=f"optitool-rank{rank}-"))
        try:
            Runner(spec, plugins, scratch / "run", device=device, quiet=True, benchmark=False, verbose=verbose).run()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    if cache:
        writable_folder(Path(cache), "--cache")
    run_dir = prepare_run_dir(spec, output, overwrite)
    processes = max([p.make(plugins.registry).processes() for p in spec.active_passes] + [1])
    if processes > 1 and size == 1:
        root = ctx.find_root()
        args = [*(["--debug"] if root.params.get("debug") else []),
                *sum((["--block", b] for b in root.obj["blocked"]), []),
                "run", pipeline, "--output", str(run_dir), "--device", device,
                *sum((["--set", o] for o in overrides), [])]
        args += [flag for flag, on in (("--overwrite", overwrite), ("--no-benchmark", no_benchmark), ("--quiet", quiet),
                                       ("--verbose", verbose)) if on] + (["--cache", cache] if cache else [])
        click.echo(f"a pass trains on {processes} processes: running under torchrun", err=True)
        ctx.exit(relaunch(processes, args))
    if size > 1 and cache:  # a rank taking a stage from the cache would leave the others waiting in training
        click.echo("optitool: warning: the stage cache is not used under torchrun", err=True)
        cache = None
    result = Runner(spec, plugins, run_dir, device=device, overwrite=overwrite, quiet=quiet,
                    benchmark=not no_benchmark, verbose=verbose, cache=Path(cache) if cache else None).run()
    report = result.report
    if not quiet:
        click.echo("\n" + terminal_table(report))
    for line in budget_lines(report.get("budget")):
        click.echo(line)
    click.echo(f"report: {run_dir / 'report.json'}  summary: {run_dir / 'report.md'}")
    budget = report.get("budget")
    if budget and not budget["passed"]:
        failed = [c["message"] for c in budget["checks"] if not c["passed"]]
        raise BudgetError("budget not met: " + "; ".join(failed))


@cli.command()
@click.argument("pipeline", type=click.Path())
@click.option("--output", "-o", type=click.Path(), help="Search folder (default: runs/<name>-search); an "
              "existing one is continued.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: trials one after another in fresh processes; ray: Ray tasks, several at once.")
@click.option("--address", help="With --executor ray: an existing Ray cluster (default: a local Ray started here).")
@click.option("--storage", help="An Optuna database URL shared by workers on several machines (default: SQLite "
              "in the search folder).")
@click.option("--cache", "cache_dir", type=click.Path(), help="The stage cache trials share (default: cache/ in "
              "the search folder); name one folder for several searches to share their stages.")
@click.option("--no-cache", is_flag=True, help="Compute every stage of every trial.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.pass_context
@handled
def search(ctx: click.Context, pipeline: str, output: str | None, executor: str, address: str | None,
           storage: str | None, cache_dir: str | None, no_cache: bool, device: str) -> None:
    """Search PIPELINE's [search] settings: each trial a run in its own folder, the Pareto candidates
    re-measured side by side, the chosen one written to best.toml. Exit 1 when no trial meets the budget."""
    from optitool.paths import writable_folder
    from optitool.search.driver import run_search

    plugins, spec, run_dir = _spec(ctx, pipeline, (), None)
    folder = writable_folder(Path(output) if output else run_dir.with_name(run_dir.name + "-search"), "the search folder")
    cache = None if no_cache else writable_folder(Path(cache_dir) if cache_dir else folder / "cache", "--cache")
    result = run_search(spec, plugins.registry, folder, executor=executor, address=address, storage=storage,
                        cache=cache, device=device, say=click.echo)
    click.echo(f"search: {folder / 'search.json'}  summary: {folder / 'search.md'}")
    if result["best"] is None:
        raise BudgetError(f"no trial met the budget ({result['counts']['infeasible']} over budget, "
                          f"{result['counts']['failed']} failed)")
    click.echo(f"chosen: trial {result['best']}; reproduce it with: optitool run {folder / 'best.toml'}")


@cli.command()
@click.argument("pipeline", type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@click.option("--output", "-o", type=click.Path(), help="The run folder `run` would use, checked too.")
@click.pass_context
@handled
def validate(ctx: click.Context, pipeline: str, overrides: tuple[str, ...], output: str | None) -> None:
    """Check PIPELINE (every pass's settings and the chain of kinds) without loading any model."""
    _, spec, _ = _spec(ctx, pipeline, overrides, output)
    chain = " -> ".join(["model"] + [f"{p.stage_name} ({p.input_kind}->{p.output_kind})" for p in spec.active_passes])
    click.echo(f"{pipeline}: valid. {chain}")


def _pass_rows(plugins: Any) -> list[dict[str, Any]]:
    infos = {i.name: i for i in plugins.infos}
    rows = []
    for name, reg in sorted(plugins.registry.passes.items()):
        cls = reg.obj
        info = infos.get(reg.plugin)
        rows.append({"name": name, "plugin": reg.plugin, "version": info.version if info else "",
                     "origin": info.origin if info else "", "takes": list(cls.accepted_kinds()), "gives": cls.gives,
                     "description": (cls.__doc__ or "").strip().split("\n")[0],
                     "schema": cls.Config.model_json_schema()})
    return rows


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable list with each pass's settings schema.")
@click.option("--schema", metavar="NAME", help="Print the JSON Schema of one pass's settings.")
@click.pass_context
@handled
def passes(ctx: click.Context, as_json: bool, schema: str | None) -> None:
    """List every registered pass with its plugin, the kinds it takes and gives, and its settings."""
    rows = _pass_rows(_plugins(ctx))
    if schema:
        match = [r for r in rows if r["name"] == schema]
        if not match:
            raise ConfigError(f"no pass named {schema!r}; known: {', '.join(r['name'] for r in rows)}")
        click.echo(json.dumps(match[0]["schema"], indent=2))
        return
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        kinds = f"{'|'.join(r['takes'])} -> {r['gives']}"
        click.echo(f"{r['name']:<20} {kinds:<22} {r['plugin']} {r['version']} ({r['origin']})")
        if r["description"]:
            click.echo(f"    {r['description']}")
        for key, prop in r["schema"].get("properties", {}).items():
            default = prop.get("default", "(required)")
            click.echo(f"    {key:<22} {prop.get('description', '')[:70]}  [default: {default}]")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handled
def plugins(ctx: click.Context, as_json: bool) -> None:
    """Show each plugin: version, where it came from, what it registers, and errors of broken ones."""
    loaded = _plugins(ctx)
    rows = [{"name": i.name, "module": i.module, "version": i.version, "origin": i.origin, "blocked": i.blocked,
             "error": i.error, "registers": {k: v for k, v in i.registered.items() if v}} for i in loaded.infos]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        state = "BLOCKED" if r["blocked"] else ("BROKEN" if r["error"] else "ok")
        click.echo(f"{r['name']:<12} {r['version'] or '-':<8} {r['origin']:<12} {state:<8} {r['module']}")
        for what, names in r["registers"].items():
            click.echo(f"    {what}: {', '.join(names)}")
        if r["error"]:
            click.echo(f"    error: {r['error']}")


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--source", default="auto", show_default=True,
              help="Loader for MODEL (auto: run folder, stage folder, .onnx file or Hugging Face folder).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--runtime", "runtimes", multiple=True, help="Runtime(s) to use (default: torch_eager, onnxruntime).")
@click.option("--batch-sizes", default="1,8", show_default=True)
@click.option("--sequence-lengths", default="128", show_default=True)
@click.option("--threads", type=int, default=0, help="Intra-op threads (0: all cores).")
@click.option("--min-iterations", type=int, default=20, show_default=True)
@click.option("--min-seconds", type=float, default=2.0, show_default=True)
@click.option("--memory/--no-memory", default=False, show_default=True, help="Peak memory in a fresh process.")
@click.option("--output", "-o", type=click.Path(), help="Write the report (JSON) here.")
@click.pass_context
@handled
def bench(ctx: click.Context, model: str, source: str, device: str, runtimes: tuple[str, ...], batch_sizes: str,
          sequence_lengths: str, threads: int, min_iterations: int, min_seconds: float, memory: bool,
          output: str | None) -> None:
    """Benchmark MODEL (a model, a stage folder or a whole run folder) without a pipeline."""
    from optitool.bench.standalone import bench_command

    def ints(text: str, name: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--{name} must be comma-separated integers, not {text!r}") from None
        if not values or min(values) < 1:
            raise ConfigError(f"--{name} needs positive integers")
        return values

    report = bench_command(_plugins(ctx), Path(model), source=source, device=device, runtimes=list(runtimes),
                           batch_sizes=ints(batch_sizes, "batch-sizes"),
                           sequence_lengths=ints(sequence_lengths, "sequence-lengths"), threads=threads,
                           min_iterations=min_iterations, min_seconds=min_seconds, memory=memory)
    from optitool.report.table import terminal_table

    click.echo(terminal_table(report))
    if output:
        from optitool import atomic

        atomic.write_json(Path(output), report)
        click.echo(f"report: {output}")


def _percent(text: str) -> float:
    try:
        return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ConfigError(f"--max-regression must be a number or a percentage like 5%, not {text!r}") from None


@cli.command()
@click.argument("base", type=click.Path())
@click.argument("new", type=click.Path())
@click.option("--max-regression", default="5%", show_default=True, help="Latency slowdown allowed beyond the noise.")
@click.option("--max-metric-drop", type=float, default=0.01, show_default=True,
              help="Absolute drop allowed in accuracy, fidelity, macro F1 or top-1 agreement.")
@click.option("--markdown", is_flag=True, help="Print a Markdown table (for $GITHUB_STEP_SUMMARY).")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON (every row, its interval).")
@click.option("--allow-missing", is_flag=True,
              help="Do not fail when a measurement of BASE is missing from NEW (they are listed either way).")
@click.option("--remeasure", is_flag=True,
              help="BASE and NEW are run folders: load their stages and time them side by side here, in one "
                   "interleaved loop; latency verdicts come from that loop (what a shared CI runner needs).")
@click.option("--stage", "stages", multiple=True, help="With --remeasure: the stage(s) to time (default: the final).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="With --remeasure: where to time them.")
@click.option("--min-seconds", type=float, default=5.0, show_default=True,
              help="With --remeasure: at least this long per stage and shape (or the run's own, if longer).")
@click.option("--min-iterations", type=int, default=30, show_default=True,
              help="With --remeasure: at least this many rounds per shape (or the run's own, if more).")
@click.pass_context
@handled
def compare(ctx: click.Context, base: str, new: str, max_regression: str, max_metric_drop: float,
            markdown: bool, as_json: bool, allow_missing: bool, remeasure: bool, stages: tuple[str, ...], device: str,
            min_seconds: float, min_iterations: int) -> None:
    """Compare two reports; exit 1 when NEW regresses beyond the threshold and the noise, or lacks a
    measurement BASE has; exit 2 when either file is not an optitool report."""
    from optitool.compare import compare_reports, read_report, render

    if stages and not remeasure:
        raise ConfigError("--stage chooses what --remeasure times; without --remeasure every stage is compared")
    if remeasure:
        from optitool.bench.side_by_side import remeasure_runs

        if min_seconds < 0 or min_iterations < 3:
            raise ConfigError("--min-seconds must be >= 0 and --min-iterations >= 3")
        reports = list(remeasure_runs(_plugins(ctx), Path(base), Path(new), stages=list(stages), device=device,
                                      min_seconds=min_seconds, min_iterations=min_iterations,
                                      say=lambda text: click.echo(text, err=True)))
    else:
        reports = [read_report(Path(path)) for path in (base, new)]
    result = compare_reports(reports[0], reports[1], max_regression=_percent(max_regression),
                             max_metric_drop=max_metric_drop, allow_missing=allow_missing)
    click.echo(json.dumps(result, indent=2) if as_json else render(result, markdown=markdown))
    if result["failed"]:
        sys.exit(EXIT_FAILED)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli(prog_name="optitool")


if __name__ == "__main__":
    main()
