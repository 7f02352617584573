"""The package's import graph, read from source with :mod:`ast` (nothing is imported): the one walk
behind tests/test_architecture.py (layers, cycles, deferred imports) and bench/architecture_stats.py.

Every import of the package counts, at module level and inside functions (``if TYPE_CHECKING:``
blocks excepted); a *deferred* import is one inside a function. Standard library only.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple


class Deferred(NamedTuple):
    """An import of the package inside a function."""

    module: str
    line: int
    statement: str  #: the import, unparsed
    source: str  #: its source line (a ``# deferred:`` reason sits there)


def module_name(pkg: Path, path: Path) -> str:
    """Dotted name of ``path`` (a ``.py`` file under the package folder ``pkg``)."""
    parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(pkg: Path) -> tuple[dict[str, set[str]], list[Deferred]]:
    """({module: modules of the package it imports}, the deferred imports) of the package folder ``pkg``."""
    files = {module_name(pkg, p): p for p in pkg.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    deferred = []
    for mod, path in files.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        tree = ast.parse(text)
        skip, inside = set(), set()
        for n in ast.walk(tree):
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                skip.update(id(x) for b in n.body for x in ast.walk(b))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside.update(id(x) for x in ast.walk(n) if x is not n)
        for n in ast.walk(tree):
            if id(n) in skip or not isinstance(n, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            else:
                base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                if n.level:
                    base = base[: len(base) - (n.level - 1)]
                    base_name = ".".join(base + ([n.module] if n.module else []))
                else:
                    base_name = n.module or ""
                targets = [base_name] + [f"{base_name}.{a.name}" for a in n.names]
            hit = False
            for t in targets:
                if not (t == pkg.name or t.startswith(pkg.name + ".")):
                    continue
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod and not mod.startswith(t + "."):  # a package's own __init__ is no edge
                    edges[mod].add(t)
                    hit = True
            if hit and id(n) in inside:
                deferred.append(Deferred(mod, n.lineno, ast.unparse(n), lines[n.lineno - 1]))
    return edges, deferred


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out, key=len, reverse=True)
