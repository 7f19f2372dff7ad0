"""Each install path the README and the CI example name must be installable as written."""

from __future__ import annotations

import re
from pathlib import Path

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
                or "pip install -e" in line]
    assert installs and all('-e "' in line or "-e ." in line for line in installs), installs
