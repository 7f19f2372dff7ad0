from __future__ import annotations

import logging
import sys
import types
import warnings

from click.testing import CliRunner

import optitool
from optitool.cli import cli

TORCH_LIKE = logging.getLogger("torchlike")  # configured at import, writing to the real terminal, as torch's is
TORCH_LIKE_HANDLER = logging.StreamHandler(sys.__stderr__)
TORCH_LIKE.addHandler(TORCH_LIKE_HANDLER)


class Noisy(optitool.Pass):
    """A pass that does what exporters and libraries do: print steps, warn, log to their own handlers."""

    name = "acme.noisy"
    takes = "torch"
    gives = "torch"

    def run(self, model, ctx):
        print("[exporter] Translate the graph into ONNX... ✅")
        warnings.warn("this API is deprecated", UserWarning, stacklevel=1)
        library = logging.getLogger(f"somelibrary.{id(ctx)}")  # a library configuring its logger on first use
        library.addHandler(logging.StreamHandler(sys.stderr))
        library.warning("somelibrary is not installed. Skipping it")
        TORCH_LIKE.warning("torchlike: Skipping torchvision::nms")
        return model


def _run(tmp_path, *extra):
    from optitool import plugins

    module = types.ModuleType("acme_noisy")
    module.optitool_register_passes = optitool.hookimpl(lambda registry: registry.add(Noisy))
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('[model]\nsource = "python"\nfactory = "optitool.testing:tiny_mlp"\n[model.inputs]\n'
                        'x = ["batch", 16]\n[[passes]]\npass = "acme.noisy"\n[benchmark]\nenabled = false\n')
    real = plugins.get_plugin_manager
    plugins.get_plugin_manager = lambda **kw: real(**{**kw, "modules": (module,)})
    try:
        out = tmp_path / ("out" + "".join(extra))
        return CliRunner().invoke(cli, ["run", str(pipeline), "-o", str(out), *extra]), out
    finally:
        plugins.get_plugin_manager = real


NOISE = ("[exporter] Translate the graph", "this API is deprecated", "somelibrary is not installed",
         "Skipping torchvision::nms")


def test_library_noise_goes_to_run_log_not_the_terminal(tmp_path):
    result, out = _run(tmp_path)
    assert result.exit_code == 0, result.output
    log = (out / "run.log").read_text()
    for line in NOISE:
        assert line not in result.output, line
        assert line in log, line
    assert "loading the model" in result.output and "acme.noisy" in result.output
    assert TORCH_LIKE_HANDLER.stream is sys.__stderr__  # put back after the run
    assert "loading the model" not in log or "optitool.library" in log  # the log has the library's lines


def test_verbose_lets_libraries_print(tmp_path):
    result, _ = _run(tmp_path, "--verbose")
    assert result.exit_code == 0, result.output
    assert "[exporter] Translate the graph" in result.output and "somelibrary is not installed" in result.output


def test_a_handler_a_library_makes_on_the_redirected_stdout_does_not_loop_afterwards():
    """onnxruntime-genai's builder, imported inside a run, makes a logging handler on whatever sys.stdout is
    then: our redirection. Left there, every later record would feed back into the run's logger forever."""
    from optitool.report.console import library_output_to_log

    run_logger = logging.getLogger("optitool.test.run")
    run_logger.addHandler(logging.StreamHandler(sys.stdout))
    library = logging.getLogger("acme.imported_during_the_run")
    try:
        with library_output_to_log(run_logger, verbose=False):
            library.addHandler(logging.StreamHandler(sys.stdout))
        library.warning("after the run")  # RecursionError before the fix
        assert library.handlers[0].stream is sys.stderr
    finally:
        library.handlers.clear()
        run_logger.handlers.clear()
