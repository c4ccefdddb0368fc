"""The package's layers: no import cycle between subpackages, the app below the CLI, every module importable.

A node of the graph is a subpackage (``diffpref.world``) or a top-level module (``diffpref.cli``).
Every import counts, at module level and inside functions alike: a function-level import is how a
cycle hides (it runs later, but the two layers still depend on each other). ``python
tests/test_imports.py`` prints the graph, with the modules behind each edge.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "diffpref"
ROOT = "diffpref"  # the package's own __init__.py
# The layers, bottom first: a node may import only from layers below its own. The world (the
# oracle) sits at the bottom with the data readers; the CLI at the top composes everything.
LAYERS = (
    {ROOT, "paths", "config"},
    {"data", "world", "losses", "inversion"},
    {"models"},
    {"generate", "training"},
    {"personalize"},
    {"rewards", "app"},
    {"experiments"},
    {"launch"},
    {"cli"},
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _node(module: str) -> str | None:
    """``diffpref.world.users`` -> ``world``; ``diffpref.cli`` -> ``cli``; outside the package -> None."""
    parts = module.split(".")
    if parts[0] != "diffpref":
        return None
    return parts[1] if len(parts) > 1 else ROOT


def _is_submodule(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()


def _imported(path: Path, module: str):
    """Every diffpref module that ``module`` (at ``path``) imports, anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb level - 1 packages above this one
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base == "diffpref":  # `from diffpref import world` names a subpackage; `__version__` the root
                yield from (f"diffpref.{a.name}" if _is_submodule(a.name) else "diffpref" for a in node.names)
            else:
                yield base


def modules() -> list[str]:
    return sorted(_module_name(p) for p in PACKAGE.rglob("*.py"))


def import_graph() -> dict[str, dict[str, set[str]]]:
    """{importing node: {imported node: {modules of the importing node that import it}}}."""
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        source = _node(module)
        for target in filter(None, map(_node, _imported(path, module))):
            if target != source:
                graph[source][target].add(module)
    return graph


def cycles(graph) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(graph) -> str:
    return "\n".join(f"{a} -> {b}: {', '.join(sorted(graph[a][b]))}" for a in sorted(graph) for b in sorted(graph[a]))


def test_cycle_finder_sees_a_cycle():
    # The checker itself: a two-node loop and a three-node loop are found, a chain is not.
    assert cycles({"a": {"b": {"m"}}, "b": {"a": {"n"}}}) == [["a", "b"]]
    assert cycles({"a": {"b": {"m"}}, "b": {"c": {"n"}}, "c": {"a": {"o"}}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": {"m"}}, "b": {"c": {"n"}}}) == []


def test_graph_reads_function_level_and_relative_imports(tmp_path, monkeypatch):
    package = tmp_path / "diffpref"
    (package / "app").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "cli.py").write_text("from diffpref import __version__\n")
    (package / "app" / "__init__.py").write_text("from .store import X\n")
    (package / "app" / "server.py").write_text("def run():\n    from diffpref.cli import main\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    graph = import_graph()
    assert dict(graph["app"]) == {"cli": {"diffpref.app.server"}}  # the relative import stays inside app
    assert dict(graph["cli"]) == {ROOT: {"diffpref.cli"}}


def test_no_cycle_between_subpackages():
    graph = import_graph()
    found = cycles(graph)
    assert not found, f"import cycles between subpackages: {found}\n{describe(graph)}"


def test_every_import_points_down_the_layers():
    level = {node: i for i, layer in enumerate(LAYERS) for node in layer}
    graph = import_graph()
    unknown = sorted({n for a in graph for n in (a, *graph[a])} - set(level))
    assert not unknown, f"{unknown}: add each to a layer in LAYERS"
    upward = [f"{a} -> {b} ({', '.join(sorted(graph[a][b]))})" for a in graph for b in graph[a] if level[b] >= level[a]]
    assert not upward, "imports that do not point to a lower layer:\n" + "\n".join(sorted(upward))


def test_app_does_not_import_the_cli():
    assert "cli" not in import_graph().get("app", {}), "diffpref.app must not import diffpref.cli"


def test_world_is_the_bottom_layer():
    # The oracle (render, captions, detector, users, ceiling, metrics) judges models; it must not depend on them.
    imported = dict(import_graph().get("world", {}))
    assert not imported, f"diffpref.world imports {imported}"


def test_every_module_imports():
    names = modules()
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


if __name__ == "__main__":
    print(describe(import_graph()))
    print("cycles:", cycles(import_graph()) or "none")
    print("layers, bottom first:", " | ".join(", ".join(sorted(layer)) for layer in LAYERS))
