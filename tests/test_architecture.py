"""The package's layering, checked from the source: no import cycles between fastdiff's modules.

The graph is built from every ``import`` / ``from ... import`` in ``fastdiff/`` and in ``kernels/`` (reached through
the ``fastdiff/kernels`` symlink, so its modules are ``fastdiff.kernels.*``), top-level and inside functions alike,
relative imports resolved, module by module; a package's ``__init__`` counts as the package. A cycle means two
modules each need the other — a lower layer reaching into a higher one — and fails the test, naming the cycle.

Packages are modules like any other, with two rules for how Python imports them:

* importing ``fastdiff.x.y`` runs ``fastdiff/x/__init__.py`` first, so it is also an edge to ``fastdiff.x`` (and
  to every package above it), and a package ``__init__`` that re-exports from its submodules has edges to them;
  a cycle through such a re-export is a cycle;
* an edge from a module to a package it sits in (``fastdiff.x.y`` → ``fastdiff.x``, or → ``fastdiff``) is no
  layering: that package is already being imported whenever the module is, so it is left out.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fastdiff"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = ["fastdiff", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files(root: Path = PACKAGE) -> list[Path]:
    """Every ``.py`` file under ``root``, following symlinked folders (``fastdiff/kernels`` → ``../kernels``) and
    named by where they appear under ``root``."""
    found, seen = [], set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop, or one folder reached twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        found += [Path(folder) / n for n in names if n.endswith(".py")]
    return sorted(found)


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
    """Module → the modules its import statements name (as written; see :func:`layering_graph`)."""
    paths = source_files(root)
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


def _packages_above(module: str) -> list[str]:
    """``fastdiff.a.b.c`` → ``["fastdiff.a.b", "fastdiff.a", "fastdiff"]``: what importing it runs first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def layering_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph as Python runs it: an import of ``fastdiff.x.y`` is also one of the package ``fastdiff.x``
    (its ``__init__`` runs first), and edges from a module to a package it sits in are dropped (that package is
    being imported already). Edges from a package ``__init__`` to its own submodules (re-exports) stay."""
    out = {}
    for a, bs in graph.items():
        own = set(_packages_above(a))
        targets = {p for b in bs for p in [b, *_packages_above(b)] if p in graph}
        out[a] = {b for b in targets if b != a and b not in own}
    return out


def test_no_import_cycles():
    graph = import_graph()
    assert "fastdiff.kernels.attention" in graph, "kernels/ (fastdiff/kernels) was not scanned"
    cycles = find_cycles(layering_graph(graph))
    assert not cycles, "import cycles in fastdiff/ and kernels/: " + "; ".join(" <-> ".join(c) for c in cycles)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_a_planted_cycle_is_found(tmp_path):
    pkg = tmp_path / "fastdiff"
    _write(pkg, {
        "__init__.py": "",
        "a.py": "from fastdiff import b\n",
        "b.py": "def f():\n    from .sub import c\n",
        "sub/__init__.py": "from . import c\n",
        "sub/c.py": "import fastdiff.a\n",
        "d.py": "from fastdiff.sub.c import x\n",
    })
    graph = import_graph(pkg)
    assert graph["fastdiff.b"] == {"fastdiff.sub.c"} and graph["fastdiff.d"] == {"fastdiff.sub.c"}
    # b's import of fastdiff.sub.c runs fastdiff/sub/__init__.py first, which imports c: the package is in the cycle
    assert find_cycles(layering_graph(graph)) == [["fastdiff.a", "fastdiff.b", "fastdiff.sub", "fastdiff.sub.c"]]


def test_a_cycle_through_a_package_reexport_is_found(tmp_path):
    """``low`` takes ``helper`` from the package ``pkg``, whose ``__init__`` re-exports it from ``pkg.impl``, which
    imports ``low``: a cycle only through the re-export (dropping the package → submodule edges missed it)."""
    pkg = tmp_path / "fastdiff"
    _write(pkg, {
        "__init__.py": "",
        "low.py": "from fastdiff.pkg import helper\n",
        "pkg/__init__.py": "from fastdiff.pkg.impl import helper\n",
        "pkg/impl.py": "from fastdiff import low\n\ndef helper():\n    pass\n",
    })
    graph = import_graph(pkg)
    assert graph["fastdiff.low"] == {"fastdiff.pkg"} and graph["fastdiff.pkg"] == {"fastdiff.pkg.impl"}
    assert find_cycles(layering_graph(graph)) == [["fastdiff.low", "fastdiff.pkg", "fastdiff.pkg.impl"]]


def test_importing_a_submodule_runs_its_package_init(tmp_path):
    """``low`` imports only the sibling ``pkg.other``, but that runs ``pkg/__init__.py``, which re-exports from
    ``pkg.impl``, which imports ``low``: a cycle. A submodule taking a name from its own package is not one."""
    pkg = tmp_path / "fastdiff"
    _write(pkg, {
        "__init__.py": "from fastdiff import low\n",
        "low.py": "import fastdiff.pkg.other\n",
        "pkg/__init__.py": "from .impl import helper\n",
        "pkg/impl.py": "from fastdiff.low import x\nfrom fastdiff.pkg import other, helper2\n",
        "pkg/other.py": "from fastdiff.pkg import helper\n",
    })
    graph = layering_graph(import_graph(pkg))
    assert graph["fastdiff.low"] == {"fastdiff.pkg", "fastdiff.pkg.other"}
    assert graph["fastdiff.pkg.other"] == set() and graph["fastdiff"] == {"fastdiff.low"}
    assert find_cycles(graph) == [["fastdiff.low", "fastdiff.pkg", "fastdiff.pkg.impl"]]
    (pkg / "pkg" / "impl.py").write_text("from fastdiff.pkg import other, helper2\n")
    assert find_cycles(layering_graph(import_graph(pkg))) == []


def test_a_symlinked_subpackage_is_scanned(tmp_path):
    """As fastdiff/kernels → ../kernels: its modules are fastdiff.kernels.*, and a cycle through them is found."""
    pkg = tmp_path / "fastdiff"
    _write(tmp_path, {
        "fastdiff/__init__.py": "",
        "fastdiff/files.py": "from fastdiff.kernels import k\n",
        "kernels/__init__.py": "",
        "kernels/k.py": "def f():\n    from fastdiff.files import write_atomic\n",
    })
    (pkg / "kernels").symlink_to("../kernels", target_is_directory=True)
    graph = import_graph(pkg)
    assert set(graph) == {"fastdiff", "fastdiff.files", "fastdiff.kernels", "fastdiff.kernels.k"}
    assert find_cycles(layering_graph(graph)) == [["fastdiff.files", "fastdiff.kernels.k"]]
