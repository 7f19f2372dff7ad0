"""One test per hook (test_api.py checks that none is missing): each hook, implemented by a plugin the
way docs/plugins.md shows, does what the documentation promises in a real run."""

from __future__ import annotations

import json
import types

import optitool
from optitool.testing import TINY_MLP_TOML, run_snippet, tiny_mlp

MLP = TINY_MLP_TOML


def plugin(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(module, hook, optitool.hookimpl(fn))
    return module


class Negate(optitool.Pass):
    """Flip the sign of the last layer (a change the metrics must see)."""

    name = "acme.negate"
    takes = "torch"
    gives = "torch"

    def run(self, model, ctx):
        import torch

        with torch.no_grad():
            model.module[-1].weight.neg_()
            model.module[-1].bias.neg_()
        return model


def test_hook_optitool_register_passes(tmp_path):
    acme = plugin("acme", optitool_register_passes=lambda registry: registry.add(Negate))
    report = run_snippet(MLP + '[[passes]]\npass = "acme.negate"\n', tmp_path, plugins=(acme,)).report
    assert report["stages"][1]["plugin"] == "acme" and report["stages"][1]["metrics"]["fidelity"] < -0.99


def test_hook_optitool_register_loaders(tmp_path):
    class Zoo(optitool.Loader):
        name, needs = "acme.zoo", ()

        def load(self, spec: optitool.ModelSpec, base_dir):
            return optitool.TorchModel(tiny_mlp(hidden=spec.kwargs["hidden"]), input_names=["x"])

    acme = plugin("acme", optitool_register_loaders=lambda registry: registry.add_loader(Zoo()))
    snippet = '[model]\nsource = "acme.zoo"\nkwargs = { hidden = 8 }\n[model.inputs]\nx = ["batch", 16]\n'
    report = run_snippet(snippet, tmp_path, plugins=(acme,)).report
    assert report["stages"][0]["metrics"]["parameters"] == 16 * 8 + 8 + 8 * 8 + 8 + 8 * 4 + 4


def test_hook_optitool_register_runtimes(tmp_path):
    calls = []

    class Counting(optitool.Runtime):
        name = "acme.counting"
        kinds = ("torch",)

        def prepare(self, artifact, device, threads):
            return lambda inputs: calls.append(inputs["x"].shape[0])

    acme = plugin("acme", optitool_register_runtimes=lambda registry: registry.add_runtime(Counting))
    snippet = MLP + ('[benchmark]\nruntimes = ["acme.counting"]\nbatch_sizes = [3]\nwarmup = 0\nmin_iterations = 4\n'
                     'max_iterations = 4\nmin_seconds = 0\nmemory = false\n')
    report = run_snippet(snippet, tmp_path, plugins=(acme,), benchmark=True).report
    entry = report["stages"][0]["benchmarks"][0]
    assert entry["runtime"] == "acme.counting" and entry["iterations"] == 4 and calls == [3] * 4


def test_hook_optitool_register_metrics(tmp_path):
    def mean_output(evaluation: optitool.Evaluation) -> float:
        return float(evaluation.outputs.mean())

    acme = plugin("acme", optitool_register_metrics=lambda registry: registry.add_metric("acme.mean", mean_output))
    report = run_snippet(MLP + '[[passes]]\npass = "acme.negate"\n', tmp_path,
                         plugins=(acme, plugin("negate", optitool_register_passes=lambda registry: registry.add(
                             Negate)))).report
    base, negated = (s["metrics"]["acme.mean"] for s in report["stages"])
    assert base != negated


def toy_transformer():
    import torch

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = torch.nn.Module()
            for name in ("q", "k", "v", "o"):
                setattr(self.mix, name, torch.nn.Linear(8, 8))
            self.ff = torch.nn.Module()
            self.ff.up, self.ff.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x):
            x = x + self.mix.o(self.mix.v(x))
            return x + self.ff.down(torch.relu(self.ff.up(x)))

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.ModuleList([Block(), Block()])
            self.out = torch.nn.Linear(8, 3)

        def forward(self, x):
            for block in self.body:
                x = block(x)
            return self.out(x)

    torch.manual_seed(0)
    return Toy()


def test_hook_optitool_register_architectures(tmp_path):
    toy = optitool.Architecture(family="acme.toy", model_types=(), blocks="body", attention="mix",
                                attention_in=("mix.q", "mix.k", "mix.v"), attention_out="mix.o",
                                mlp_in=("ff.up",), mlp_out="ff.down")
    acme = plugin("acme", optitool_register_architectures=lambda registry: registry.add_architecture(toy))
    snippet = ('[model]\nsource = "python"\nfactory = "tests.test_hookspecs:toy_transformer"\n[model.inputs]\n'
               'x = ["batch", 8]\n[[passes]]\npass = "structured_prune"\nsparsity = 0.5\n')
    metrics = run_snippet(snippet, tmp_path, plugins=(acme,)).report["stages"][1]["metrics"]
    assert metrics["family"] == "acme.toy" and metrics["mlp_channels_kept"] == [8, 8]


def test_hook_optitool_pipeline_start(tmp_path):
    seen = []
    acme = plugin("acme", optitool_pipeline_start=lambda spec, run_dir: seen.append(
        (spec.name, run_dir.is_dir(), (run_dir / "report.json").exists())))
    run_snippet('name = "started"\n' + MLP, tmp_path, plugins=(acme,))
    assert seen == [("started", True, False)]


def test_hook_optitool_pass_finished(tmp_path):
    seen = []
    acme = plugin("acme", optitool_pass_finished=lambda stage, run_dir: seen.append(
        (stage["name"], (run_dir / stage["artifact"]).is_file())))
    run_snippet(MLP + '[[passes]]\npass = "magnitude_prune"\nsparsity = 0.5\n', tmp_path, plugins=(acme,))
    assert seen == [("magnitude_prune", True)]


def test_hook_optitool_report_written(tmp_path):
    seen = []
    acme = plugin("acme", optitool_report_written=lambda report, path: seen.append(
        (report["status"], json.loads(path.read_text())["status"])))
    run_snippet(MLP, tmp_path, plugins=(acme,))
    assert seen == [("finished", "finished")]
