"""The package's layering, checked from the source: no import cycles between fastdiff's modules.

The graph is built from every ``import`` / ``from ... import`` in ``fastdiff/`` (top-level and inside functions
alike, relative imports resolved), module by module; a package's ``__init__`` counts as the package. A cycle means
two modules each need the other — a lower layer reaching into a higher one — and fails the test, naming the cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fastdiff"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = ["fastdiff", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], root: Path = PACKAGE) -> set[str]:
    """The fastdiff modules ``path`` imports (an ``from pkg import name`` of a submodule counts as that submodule)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # "fastdiff.ops.attention" -> "fastdiff.ops"
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(p, root) for p in paths}
    return {module_name(p, root): imports_of(p, modules, root) for p in paths}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def _is_package_init_edge(a: str, b: str) -> bool:
    """``fastdiff/x/__init__.py`` importing its own submodules (and a submodule importing its package's init for
    a sibling) is how a package re-exports; those edges are not layering."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def layering_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {a: {b for b in bs if not _is_package_init_edge(a, b)} for a, bs in graph.items()}


def test_no_import_cycles():
    cycles = find_cycles(layering_graph(import_graph()))
    assert not cycles, "import cycles in fastdiff/: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_a_planted_cycle_is_found(tmp_path):
    pkg = tmp_path / "fastdiff"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from fastdiff import b\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("import fastdiff.a\n")
    (pkg / "d.py").write_text("from fastdiff.sub.c import x\n")
    graph = import_graph(pkg)
    assert graph["fastdiff.b"] == {"fastdiff.sub.c"} and graph["fastdiff.d"] == {"fastdiff.sub.c"}
    assert find_cycles(layering_graph(graph)) == [["fastdiff.a", "fastdiff.b", "fastdiff.sub.c"]]
