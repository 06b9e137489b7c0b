"""No module of the package imports, directly or through others, a module that imports it.

Every import counts: at module level, under ``TYPE_CHECKING`` and inside
functions (a lazy import only hides a circle from the interpreter, not from
the reader).  The modules are read with :mod:`ast`, not imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sparse_tconv"


def _modules(root: Path) -> dict[str, Path]:
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _targets(node, current: str, modules: dict[str, Path]) -> list[str]:
    """The package's modules an import statement of ``current`` names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    package = current if modules[current].name == "__init__.py" else current.rpartition(".")[0]
    for _ in range(max(node.level - 1, 0)):
        package = package.rpartition(".")[0]
    base = node.module if not node.level else ".".join(filter(None, [package, node.module]))
    found = [base] if base in modules else []
    return found + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a package's own parents left out)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name].update(t for t in _targets(node, name, modules)
                                   if t != name and not name.startswith(t + "."))
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_circle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 30 and "sparse_tconv._operator" in graph["sparse_tconv.solvers"]
    assert circles(graph) == []


@pytest.mark.parametrize("files, expected", [
    # the circle the package had: _validation imported ConvMatrixSize under TYPE_CHECKING
    ({"_validation.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                        "    from ._geometry import ConvMatrixSize\n",
      "_geometry.py": "from ._validation import check_int\n"},
     [["pkg._geometry", "pkg._validation"]]),
    # a lazy import inside a function closes a circle too
    ({"a.py": "def f():\n    from .b import g\n", "b.py": "from . import a\n"},
     [["pkg.a", "pkg.b"]]),
    ({"a.py": "from .b import g\n", "b.py": "import numpy\n"}, []),
])
def test_the_check_finds_circles(tmp_path, files, expected):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, text in files.items():
        (package / name).write_text(text)
    assert circles(import_graph(package)) == expected
