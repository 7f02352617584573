"""Architecture figures of a checkout of mlx_dupq: import cycles, deferred internal imports, lines per module.

    python bench/architecture_stats.py                       # this checkout, printed
    python bench/architecture_stats.py --root /tmp/arch-before --label before --json bench/results/architecture.json
    python bench/architecture_stats.py --label after --json bench/results/architecture.json

``--json`` adds (or replaces) the entry ``--label`` in the file, so "before" and "after" sit side by
side. Every import of the package counts, module level and inside functions (``if TYPE_CHECKING:``
blocks excepted), as in tests/test_architecture.py; a deferred import is one inside a function.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path


def _name(pkg: Path, path: Path) -> str:
    parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph(pkg: Path) -> tuple[dict[str, set[str]], int]:
    """({module: package modules it imports}, number of deferred imports of the package)."""
    files = {_name(pkg, p): p for p in pkg.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    deferred = 0
    for mod, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
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
                    base_name = ".".join(base[: len(base) - (n.level - 1)] + ([n.module] if n.module else []))
                else:
                    base_name = n.module or ""
                targets = [base_name] + [f"{base_name}.{a.name}" for a in n.names]
            hit = False
            for t in targets:
                if not (t == pkg.name or t.startswith(pkg.name + ".")):
                    continue
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod and not mod.startswith(t + "."):
                    edges[mod].add(t)
                    hit = True
            deferred += hit and id(n) in inside
    return edges, deferred


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    sys.setrecursionlimit(10000)

    def visit(v):
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


def stats(root: Path) -> dict:
    pkg = root / "mlx_dupq"
    edges, deferred = graph(pkg)
    cyc = cycles(edges)
    lines = {str(p.relative_to(root)): len(p.read_text(encoding="utf-8").splitlines()) for p in sorted(pkg.rglob("*.py"))}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "commit": commit,
        "modules": len(lines),
        "cycles": len(cyc),
        "largest_cycle": len(cyc[0]) if cyc else 0,
        "deferred_internal_imports": deferred,
        "lines_max": max(lines.values()),
        "lines_max_module": max(lines, key=lines.get),
        "lines_mean": round(sum(lines.values()) / len(lines), 1),
        "modules_over_600_lines": sum(v > 600 for v in lines.values()),
        "lines_total": sum(lines.values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent, help="checkout to measure")
    ap.add_argument("--label", default="after", help="entry name in the JSON file (before / after)")
    ap.add_argument("--json", type=Path, help="add the figures to this JSON file under --label")
    args = ap.parse_args()
    s = stats(args.root.resolve())
    s["command"] = "python " + " ".join(["bench/architecture_stats.py", *sys.argv[1:]])
    for k, v in s.items():
        print(f"{k:28s} {v}")
    if args.json:
        data = json.loads(args.json.read_text()) if args.json.exists() else {}
        data[args.label] = s
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.rename(args.json)


if __name__ == "__main__":
    main()
