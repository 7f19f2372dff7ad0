from __future__ import annotations

import inspect
import re
import sys
import types
from pathlib import Path

import pytest

import optitool
from optitool import hookspecs
from optitool.plugins import get_plugin_manager


class Shrink(optitool.Pass):
    name = "acme.shrink"
    Config = optitool.PassConfig
    takes = "torch"
    gives = "torch"

    def run(self, model, ctx):
        return model


def plugin_module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def fake_entry_point(name: str, module: str, distribution: str, version: str = "0.1"):
    """An installed third-party plugin as importlib.metadata describes it."""
    class Dist:
        metadata = {"Name": distribution}

    Dist.version = version

    class EntryPoint:
        pass

    EntryPoint.name, EntryPoint.value, EntryPoint.dist = name, module, Dist()
    return EntryPoint()


def registers(pass_class):
    return optitool.hookimpl(lambda registry: registry.add(pass_class))


def test_builtins_load_through_entry_points_and_check_pending_passes():
    loaded = get_plugin_manager(autoload=False)
    assert {"magnitude_prune", "int8_quantize", "onnx_export", "distill"} <= set(loaded.registry.passes)
    origins = {i.name: i.origin for i in loaded.infos}
    assert origins["prune"] == "built-in" and origins["core"] == "core"
    loaded.pm.check_pending()
    assert not loaded.broken


def test_explicit_plugin_registers_a_pass():
    module = plugin_module("acme_plugin", optitool_register_passes=registers(Shrink))
    loaded = get_plugin_manager(autoload=False, modules=(module,))
    assert loaded.registry.passes["acme.shrink"].plugin == "acme_plugin"


def test_blocked_plugin_is_not_loaded(monkeypatch):
    monkeypatch.setenv("OPTITOOL_BLOCK_PLUGINS", "prune")
    loaded = get_plugin_manager(autoload=False)
    assert "magnitude_prune" not in loaded.registry.passes
    assert next(i for i in loaded.infos if i.name == "prune").blocked


def test_broken_plugin_is_named_and_others_still_work(monkeypatch):
    monkeypatch.setitem(sys.modules, "broken_plugin_mod", None)  # import of it fails
    with pytest.warns(UserWarning, match="broken_plugin_mod"):
        loaded = get_plugin_manager(autoload=False, plugins=("broken_plugin_mod",))
    assert "onnx_export" in loaded.registry.passes
    assert "import of 'broken_plugin_mod' failed" in loaded.broken[0].error


def test_misspelled_hook_is_refused_loudly():
    module = plugin_module("typo_plugin", optitool_register_pases=optitool.hookimpl(lambda registry: None))
    with pytest.warns(UserWarning, match="misspelled"):
        loaded = get_plugin_manager(autoload=False, modules=(module,))
    assert loaded.broken[0].name == "typo_plugin"


def test_incompatible_api_version_is_refused():
    module = plugin_module("future_plugin", OPTITOOL_API_VERSION=2, optitool_register_passes=registers(Shrink))
    with pytest.warns(UserWarning, match="API version 2"):
        loaded = get_plugin_manager(autoload=False, modules=(module,))
    assert "acme.shrink" not in loaded.registry.passes


def test_duplicate_pass_name_names_both_plugins():
    class Clash(Shrink):
        name = "onnx_export"

    module = plugin_module("clash_plugin", optitool_register_passes=registers(Clash))
    with pytest.warns(UserWarning, match="registered twice: by plugin 'onnx' and by plugin 'clash_plugin'"):
        loaded = get_plugin_manager(autoload=False, modules=(module,))
    assert loaded.registry.passes["onnx_export"].plugin == "onnx"


def test_invalid_pass_class_is_reported():
    class NoRun(optitool.Pass):
        name = "norun"

    module = plugin_module("norun_plugin", optitool_register_passes=registers(NoRun))
    with pytest.warns(UserWarning, match="does not implement run"):
        get_plugin_manager(autoload=False, modules=(module,))


def test_autoload_switch_skips_third_party_entry_points(monkeypatch):
    from optitool import plugins as plugins_module

    monkeypatch.setattr(plugins_module, "entry_points",
                        lambda group: [fake_entry_point("acme", "acme_ep_module", "acme-optitool", "9.9")])
    monkeypatch.setitem(sys.modules, "acme_ep_module", plugin_module("acme_ep_module",
                                                                     optitool_register_passes=registers(Shrink)))
    assert "acme.shrink" in get_plugin_manager().registry.passes
    monkeypatch.setenv("OPTITOOL_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "acme.shrink" not in get_plugin_manager().registry.passes


def test_every_hook_is_documented_with_its_signature():
    doc = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("optitool_"):
            params = ", ".join(inspect.signature(fn).parameters)
            assert re.search(rf"{name}\({re.escape(params)}\)", doc), f"docs/plugins.md lacks {name}({params})"


def test_a_stage_made_by_a_plugin_loader_reloads_through_that_plugin(tmp_path):
    import json

    from optitool.models.base import Loader

    class Zoo(Loader):
        name, needs = "acme.zoo", ()

        def load(self, spec, base_dir):
            from optitool.testing import tiny_mlp

            return optitool.TorchModel(tiny_mlp(), origin=spec.model_dump(exclude_none=True), input_names=["x"])

    module = plugin_module("zoo_plugin", optitool_register_loaders=optitool.hookimpl(
        lambda registry: registry.add_loader(Zoo())))
    loaded = get_plugin_manager(autoload=False, modules=(module,))
    from optitool.config import parse_pipeline_text
    from optitool.runner import Runner

    text = '[model]\nsource = "acme.zoo"\n[model.inputs]\nx = ["batch", 16]\n[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\n'
    spec = parse_pipeline_text(text, loaded.registry, base_dir=tmp_path)
    Runner(spec, loaded, tmp_path / "run", quiet=True, benchmark=False).run()
    stage = tmp_path / "run" / "01-magnitude_prune"
    assert json.loads((stage / "model.json").read_text())["origin"]["source"] == "acme.zoo"
    stage_loader = loaded.registry.loaders["stage"].obj
    again = stage_loader.load(spec.model.model_copy(update={"source": "stage", "path": str(stage)}), tmp_path)
    assert float((again.module[0].weight == 0).float().mean()) > 0.2  # the pruned weights, not a fresh model
    without = get_plugin_manager(autoload=False).registry.loaders["stage"].obj
    with pytest.raises(optitool.ConfigError, match="'acme.zoo', a loader no plugin registers"):
        without.load(spec.model.model_copy(update={"source": "stage", "path": str(stage)}), tmp_path)


def test_a_hook_with_a_wrong_signature_is_reported_by_name_and_the_rest_work():
    def optitool_register_passes(reg):  # the spec names the argument `registry`
        reg.add(Shrink)

    module = plugin_module("wrong_signature", optitool_register_passes=optitool.hookimpl(optitool_register_passes))
    with pytest.warns(UserWarning, match="wrong_signature"):
        loaded = get_plugin_manager(autoload=False, modules=(module,))
    info = next(i for i in loaded.infos if i.name == "wrong_signature")
    assert "reg" in info.error and "does not match its specification" in info.error
    assert "onnx_export" in loaded.registry.passes and "acme.shrink" not in loaded.registry.passes


def test_a_plugin_whose_registration_fails_part_way_is_left_out_whole():
    class Other(Shrink):
        name = "acme.other"

    def register(registry):
        registry.add(Other)
        raise RuntimeError("half done")

    tracker = []
    module = plugin_module("half_plugin", optitool_register_passes=optitool.hookimpl(register),
                           optitool_report_written=optitool.hookimpl(lambda report, path: tracker.append(path)))
    with pytest.warns(UserWarning, match="half done"):
        loaded = get_plugin_manager(autoload=False, modules=(module,))
    assert "acme.other" not in loaded.registry.passes
    loaded.notify("optitool_report_written", report={}, path=Path("r.json"))
    assert tracker == []  # its lifecycle hooks are gone too


def test_lifecycle_hooks_are_called_the_way_pluggy_calls_them():
    calls = []

    def first(path):  # takes fewer arguments than the spec: legal in pluggy
        calls.append(("first", path))

    def last(report, path):
        calls.append(("last", path))

    def middle(report):
        calls.append(("middle", len(report)))

    def broken(report, path):
        raise ValueError("tracker down")

    modules = (plugin_module("p_last", optitool_report_written=optitool.hookimpl(trylast=True)(last)),
               plugin_module("p_first", optitool_report_written=optitool.hookimpl(tryfirst=True)(first)),
               plugin_module("p_broken", optitool_report_written=optitool.hookimpl(broken)),
               plugin_module("p_middle", optitool_report_written=optitool.hookimpl(middle)))
    loaded = get_plugin_manager(autoload=False, modules=modules)
    with pytest.warns(UserWarning, match="p_broken.*tracker down"):
        loaded.notify("optitool_report_written", report={"a": 1}, path=Path("r.json"))
    assert calls == [("first", Path("r.json")), ("middle", 1), ("last", Path("r.json"))]
    # the order pluggy itself uses, without the broken plugin
    loaded.pm.unregister(name="p_broken")
    calls.clear()
    loaded.pm.hook.optitool_report_written(report={"a": 1}, path=Path("r.json"))
    assert calls == [("first", Path("r.json")), ("middle", 1), ("last", Path("r.json"))]


def test_registration_hooks_may_take_fewer_arguments():
    seen = []
    module = plugin_module("no_args", optitool_register_metrics=optitool.hookimpl(lambda: seen.append(1)))
    loaded = get_plugin_manager(autoload=False, modules=(module,))
    assert seen == [1] and not loaded.broken


def test_cli_plugins_survives_a_broken_plugin_and_names_it(monkeypatch):
    from click.testing import CliRunner

    from optitool import plugins as plugins_module
    from optitool.cli import cli

    def bad(reg):
        pass

    real = plugins_module.entry_points
    monkeypatch.setattr(plugins_module, "entry_points", lambda group: [
        *real(group=group), fake_entry_point("acme_broken", "acme_broken_mod", "acme-broken")])
    monkeypatch.setitem(sys.modules, "acme_broken_mod", plugin_module(
        "acme_broken_mod", optitool_register_passes=optitool.hookimpl(bad)))
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    assert "acme_broken" in result.output and "BROKEN" in result.output and "magnitude_prune" in result.output


def test_a_failing_lifecycle_hook_is_optitools_warning_on_the_terminal_and_in_run_log(tmp_path, capsys):
    from optitool.testing import TINY_MLP_TOML, run_snippet

    def broken(stage, run_dir):
        raise ConnectionError("tracker unreachable")

    module = plugin_module("p_tracker", optitool_pass_finished=optitool.hookimpl(broken))
    result = run_snippet(TINY_MLP_TOML + '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\n', tmp_path,
                         plugins=(module,))
    assert result.report["status"] == "finished"  # a tracker never fails the run
    message = "plugin 'p_tracker' failed in optitool_pass_finished: ConnectionError: tracker unreachable"
    assert message in capsys.readouterr().err  # shown even though run_snippet runs quietly
    assert message in (result.run_dir / "run.log").read_text()
