"""The package's import graph has no circle, and its rooms import only downward (docs/architecture.md).

Every ``import`` / ``from ... import`` of a ``vold_pl`` module counts, at module level or inside a function: a
lazy import inside a function hides a circle from Python's loader, not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vold_pl"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module ``name`` denotes (the longest known prefix: ``a.b.C`` is module ``a.b``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from pkg import mod`` counts as an import of ``pkg.mod``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        edges: set[str] = set()
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] or [base]
            for t in targets:
                if t == "vold_pl" or t.startswith("vold_pl."):
                    hit = _resolve(t, modules)
                    if hit is not None and hit != mod:
                        edges.add(hit)
        graph[mod] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_a_lazy_import_circle():
    """The finder itself: a circle closed by an import inside a function is found; a chain is not."""
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_package_has_no_import_circle():
    graph = import_graph()
    assert "vold_pl.rl.cached_sampler" in graph and "vold_pl.sharding" in graph["vold_pl.rl.cached_sampler"]
    assert import_cycles(graph) == []


def _imports_of(prefix: str, graph: dict[str, set[str]]) -> set[str]:
    return {t for m, ts in graph.items() if m == prefix or m.startswith(prefix + ".") for t in ts}


def test_rooms_import_downward():
    """The layers of docs/architecture.md: models/ and sharding/optimizers/memory know nothing of rl/, modules/
    or callbacks/; rl/ knows nothing of modules/ or callbacks/; callbacks/ talk to the module through its
    interface, never its class; no production module imports the tests."""
    graph = import_graph()
    upper = ("vold_pl.rl", "vold_pl.modules", "vold_pl.callbacks", "vold_pl.cli")
    for low in ("vold_pl.models", "vold_pl.sharding", "vold_pl.optimizers", "vold_pl.memory"):
        assert not {t for t in _imports_of(low, graph) if t.startswith(upper)}, low
    assert not {t for t in _imports_of("vold_pl.rl", graph)
                if t.startswith(("vold_pl.modules", "vold_pl.callbacks", "vold_pl.cli"))}
    assert not {t for t in _imports_of("vold_pl.callbacks", graph) if t.startswith(("vold_pl.modules", "vold_pl.cli"))}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n == "tests" or n.startswith("tests.")], path
