"""The public API is what docs/plugins.md says it is, every hook is tested, and the core has no import cycle."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import optitool
from optitool import hookspecs

ROOT = Path(__file__).parents[1]
DOC = (ROOT / "docs" / "plugins.md").read_text()


def hook_names() -> list[str]:
    return [n for n, _ in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("optitool_")]


def test_public_names_are_exactly_the_documented_ones():
    documented = set(re.findall(r"`optitool\.([A-Za-z]\w*)", DOC)) - {"testing", "hookimpl"}
    public = {n for n in optitool.__all__ if not n.startswith("__")} - {"hookimpl"}
    assert documented - public == set(), "docs/plugins.md names optitool.X that is not public"
    assert public - documented == set(), "public names missing from docs/plugins.md"


def test_every_hook_has_a_test_named_after_it():
    """As datasette does: a hook nobody tests is a hook that silently breaks."""
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    missing = [n for n in hook_names() if not re.search(rf"def test_hook_{n}\b", tests)]
    assert not missing, f"no test_hook_<name> test for {missing}"


def test_hookspecs_are_typed_without_any_where_a_type_exists():
    for name in hook_names():
        fn = getattr(hookspecs, name)
        for param, annotation in inspect.get_annotations(fn).items():
            assert annotation != "Any", f"{name}({param}) is typed Any"


def _module_imports(path: Path, module: str) -> set[str]:
    """optitool modules `path` imports anywhere (functions included), except under TYPE_CHECKING."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(a.name for a in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.module == "optitool":  # `from optitool import x`: module x when it is one
                found.update(f"optitool.{a.name}" if (ROOT / "optitool" / f"{a.name}.py").exists() else "optitool"
                             for a in node.names)
            elif node.module:
                found.add(node.module)

    Visitor().visit(ast.parse(path.read_text()))
    return {m for m in found if (m == "optitool" or m.startswith("optitool.")) and m != module}


def test_the_core_has_no_import_cycle():
    modules = {}
    for path in (ROOT / "optitool").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {name: _module_imports(path, name) & set(modules) for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_built_in_plugins_use_only_the_public_api():
    private = []
    for path in (ROOT / "plugins").rglob("*.py"):
        for module in _module_imports(path, ""):
            if module != "optitool":
                private.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not private, private


def test_the_core_names_no_built_in_pass_or_plugin():
    import tomllib

    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["optitool"]
    from optitool.plugins import get_plugin_manager

    names = set(entry.values()) | set(get_plugin_manager(autoload=False, builtins=True).registry.passes)
    hits = []
    for path in (ROOT / "optitool").rglob("*.py"):
        if path.name == "testing.py":
            continue
        text = path.read_text()
        hits += [f"{path.relative_to(ROOT)}: {n}" for n in names if re.search(rf"\b{re.escape(n)}\b", text)]
    assert not hits, hits
