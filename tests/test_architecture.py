"""The package's layers (docs/architecture.md), enforced: no import cycle, no import from a higher
layer, at most 10 deferred (function-level) imports of the package, each with a ``# deferred:`` reason.

Every import of ``mlx_dupq`` counts, at module level and inside functions (``if TYPE_CHECKING:``
blocks excepted). A module's layer is the one of the longest prefix in :data:`LAYERS` that names
it, so a new module inside a listed package is checked without being listed; a new top-level
module or package must be added here (and to docs/architecture.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "mlx_dupq"
MAX_DEFERRED = 10

#: bottom-up; a module may import from its own layer or any layer below it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("mlx_dupq.errors", "mlx_dupq._env", "mlx_dupq.cache", "mlx_dupq.extras", "mlx_dupq._version")),
    ("specs", ("mlx_dupq.specs", "mlx_dupq.dup.specs", "mlx_dupq.moe.spec", "mlx_dupq.refine.spec")),
    ("recipe", ("mlx_dupq.config",)),
    ("math", ("mlx_dupq.quant", "mlx_dupq.rotation", "mlx_dupq.metrics")),
    ("adapter", ("mlx_dupq.adapter", "mlx_dupq.testing", "mlx_dupq.weight_stats")),
    ("kernels", ("mlx_dupq.kernels",)),
    ("layers", ("mlx_dupq.layers", "mlx_dupq.dup.runtime", "mlx_dupq.dup.copies", "mlx_dupq.dup.aggregate")),
    # eval.data reads text corpora (calibration and evaluation): an input, used by calibration
    ("io", ("mlx_dupq.io", "mlx_dupq.eval.data", "mlx_dupq.eval.code_text")),
    ("calibration", ("mlx_dupq.input_stats", "mlx_dupq.calibration")),
    ("features", ("mlx_dupq.features", "mlx_dupq.dup", "mlx_dupq.moe", "mlx_dupq.refine")),
    ("convert", ("mlx_dupq.pipeline",)),
    ("runtime", ("mlx_dupq.distributed",)),
    ("application", ("mlx_dupq.auto", "mlx_dupq.eval", "mlx_dupq.search", "mlx_dupq.report", "mlx_dupq.studies",
                     "mlx_dupq.dup.study", "mlx_dupq.moe.train", "mlx_dupq.moe.from_dense", "mlx_dupq.moe.router",
                     "mlx_dupq.moe.topk", "mlx_dupq.moe.study",
                     "mlx_dupq.inspect_model", "mlx_dupq.bench_run", "mlx_dupq.generate",
                     "mlx_dupq.serve", "mlx_dupq.export")),
    ("cli", ("mlx_dupq.api", "mlx_dupq.cli", "mlx_dupq.cli_common", "mlx_dupq.cli_measure", "mlx_dupq.cli_use",
             "mlx_dupq.cli_catalog")),
]
ROOT_LAYER = "cli"  # mlx_dupq/__init__.py: the public convert / load


def layer_of(module: str) -> int:
    """Index in LAYERS of ``module`` (longest matching prefix); AssertionError when none."""
    if module == "mlx_dupq":
        return [n for n, _ in LAYERS].index(ROOT_LAYER)
    best, found = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    assert found is not None, f"{module} is in no layer; add it (or its package) to LAYERS and docs/architecture.md"
    return found


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str, str]]]:
    """({module: modules it imports}, [(module, line, target, source line) of each deferred import])."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
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
                if not (t == "mlx_dupq" or t.startswith("mlx_dupq.")):
                    continue
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod and not mod.startswith(t + "."):  # a package's own __init__ is no edge
                    edges[mod].add(t)
                    hit = True
            if hit and id(n) in inside:
                deferred.append((mod, n.lineno, ast.unparse(n), lines[n.lineno - 1]))
    return edges, deferred


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
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
    return out


def test_every_module_has_a_layer():
    edges, _ = import_graph()
    for m in edges:
        layer_of(m)


def test_no_import_cycle():
    edges, _ = import_graph()
    assert cycles(edges) == []


def test_no_import_from_a_higher_layer():
    edges, _ = import_graph()
    names = [n for n, _ in LAYERS]
    bad = [f"{m} ({names[layer_of(m)]}) imports {t} ({names[layer_of(t)]})"
           for m, ts in sorted(edges.items()) for t in sorted(ts) if layer_of(t) > layer_of(m)]
    assert bad == []


def test_few_deferred_imports_each_with_a_reason():
    _, deferred = import_graph()
    assert len(deferred) <= MAX_DEFERRED, [f"{m}:{line} {imp}" for m, line, imp, _ in deferred]
    unexplained = [f"{m}:{line} {imp}" for m, line, imp, src in deferred if "# deferred:" not in src]
    assert unexplained == []


def test_the_checker_sees_cycles_layers_and_deferred_imports(tmp_path):
    """The graph code itself: a made-up package with a cycle and a deferred import."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert layer_of("mlx_dupq.dup.specs") < layer_of("mlx_dupq.config") < layer_of("mlx_dupq.dup.plans")
    assert layer_of("mlx_dupq.refine.block") == layer_of("mlx_dupq.dup")  # new modules of a listed package
    assert layer_of("mlx_dupq.io.manifest") == layer_of("mlx_dupq.io")
    assert layer_of("mlx_dupq.eval.data") < layer_of("mlx_dupq.input_stats") < layer_of("mlx_dupq.eval.ppl")
    assert layer_of("mlx_dupq.cli_measure") == layer_of("mlx_dupq.cli") > layer_of("mlx_dupq.eval.ppl")
