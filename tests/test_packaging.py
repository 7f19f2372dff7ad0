"""Each install path the README and the CI example name must be installable as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower() for r in requirements}


def test_the_two_onnxruntime_packages_are_never_installed_together():
    base = names(PROJECT["project"]["dependencies"])
    extras = {k: names(v) for k, v in PROJECT["project"]["optional-dependencies"].items()}
    assert not base & {"onnxruntime", "onnxruntime-gpu"}, "the base install must name neither onnxruntime"
    assert "onnxruntime" in extras["cpu"] and "onnxruntime-gpu" in extras["gpu"]
    for name, extra in extras.items():
        assert not {"onnxruntime", "onnxruntime-gpu"} <= extra, f"extra {name} names both onnxruntime packages"


def test_the_build_backend_understands_the_license_expression():
    requires = PROJECT["build-system"]["requires"]
    floor = next(int(m.group(1)) for r in requires if (m := re.match(r"setuptools>=(\d+)", r)))
    if isinstance(PROJECT["project"].get("license"), str):
        assert floor >= 77, "a license expression (license = \"MIT\") needs setuptools >= 77"


def test_torch_floor_is_not_below_what_the_exporter_calls_need():
    torch = next(r for r in PROJECT["project"]["dependencies"] if r.startswith("torch"))
    major, minor = map(int, re.search(r">=(\d+)\.(\d+)", torch).groups())
    assert (major, minor) >= (2, 6), "torch.onnx.export(dynamo=True, optimize=...) and Dim.DYNAMIC need torch>=2.6"


def test_readme_ci_and_workflow_install_from_the_checkout_with_one_onnxruntime():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    workflow = (ROOT / "examples" / "ci" / "optitool.yml").read_text()
    assert 'pip install -e ".[cpu,dev]"' in readme and '-e ".[cpu,dev]"' in ci
    installs = [line for line in workflow.splitlines() if "pip install" in line and "optitool" in line.lower()
                or re.search(r"pip install (-e )?\"?\.", line)]
    assert installs and all("[cpu," in line for line in installs), installs


def test_ci_installs_the_wheel_and_validates_every_example_outside_the_checkout():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip wheel" in ci and "examples/*.toml" in ci and "cd " in ci


def test_ci_runs_the_readmes_test_command_and_the_slow_cases_it_leaves_out():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = 'python -m pytest -m "not slow"'
    assert f"\n{command}\n" in readme and command in ci and "python -m pytest -m slow" in ci


def _packages_in(folder: Path) -> set[str]:
    """Dotted names of every package (a folder with __init__.py) below `folder`, named from `folder`."""
    return {".".join(init.parent.relative_to(folder).parts) for init in folder.rglob("__init__.py")
            if "__pycache__" not in init.parts and init.parent != folder}


@pytest.mark.slow
def test_the_wheel_holds_every_package_of_the_core_and_the_builtin_plugins(tmp_path):
    """Only an editable install used to work: the wheel listed packages by hand and missed optitool.search."""
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
                   check=True, capture_output=True)
    wheel = next(tmp_path.glob("optitool-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {name.rsplit("/", 1)[0].replace("/", ".") for name in names if name.endswith("/__init__.py")}
    expected = {p for p in _packages_in(ROOT) if p.split(".")[0] == "optitool"} | _packages_in(ROOT / "plugins")
    assert "optitool.search" in expected and "optitool_quantize" in expected
    assert expected <= in_wheel, f"missing from the wheel: {sorted(expected - in_wheel)}"
    modules = {name for name in names if name.endswith(".py")}
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "optitool").rglob("*.py") if "__pycache__" not in p.parts}
    on_disk |= {str(p.relative_to(ROOT / "plugins")) for p in (ROOT / "plugins").rglob("*.py")
                if "__pycache__" not in p.parts}
    assert on_disk <= modules, f"modules missing from the wheel: {sorted(on_disk - modules)}"
    data = {str(p.relative_to(ROOT)) for p in (ROOT / "optitool" / "lm_tasks" / "bbc").iterdir()}
    assert data and data <= set(names), f"task files missing from the wheel: {sorted(data - set(names))}"
