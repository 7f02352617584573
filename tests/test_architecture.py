"""The package's layers (docs/architecture.md), enforced: no import cycle, no import from a higher
layer, at most 10 deferred (function-level) imports of the package, each with a ``# deferred:`` reason.

Every import of ``mlx_dupq`` counts, at module level and inside functions (``if TYPE_CHECKING:``
blocks excepted). A module's layer is the one of the longest prefix in :data:`LAYERS` that names
it, so a new module inside a listed package is checked without being listed; a new top-level
module or package must be added here (and to docs/architecture.md). The graph is
:mod:`mlx_dupq.import_graph`'s (bench/architecture_stats.py counts with the same walk).
"""

from __future__ import annotations

from pathlib import Path

from mlx_dupq.import_graph import cycles, import_graph

PKG = Path(__file__).resolve().parent.parent / "mlx_dupq"
MAX_DEFERRED = 10

#: bottom-up; a module may import from its own layer or any layer below it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("mlx_dupq.errors", "mlx_dupq._env", "mlx_dupq.cache", "mlx_dupq.extras", "mlx_dupq._version",
              "mlx_dupq.import_graph")),
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


def test_every_module_has_a_layer():
    edges, _ = import_graph(PKG)
    for m in edges:
        layer_of(m)


def test_no_import_cycle():
    edges, _ = import_graph(PKG)
    assert cycles(edges) == []


def test_no_import_from_a_higher_layer():
    edges, _ = import_graph(PKG)
    names = [n for n, _ in LAYERS]
    bad = [f"{m} ({names[layer_of(m)]}) imports {t} ({names[layer_of(t)]})"
           for m, ts in sorted(edges.items()) for t in sorted(ts) if layer_of(t) > layer_of(m)]
    assert bad == []


def test_few_deferred_imports_each_with_a_reason():
    _, deferred = import_graph(PKG)
    assert len(deferred) <= MAX_DEFERRED, [f"{m}:{line} {imp}" for m, line, imp, _ in deferred]
    unexplained = [f"{m}:{line} {imp}" for m, line, imp, src in deferred if "# deferred:" not in src]
    assert unexplained == []


def test_the_checker_sees_cycles_layers_and_deferred_imports(tmp_path):
    """The graph code itself: a made-up package with a cycle and a deferred import."""
    pkg = tmp_path / "fake"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fake import c\n")
    (pkg / "sub" / "b.py").write_text("import os\n\ndef f():\n    from .. import a  # deferred: why\n    return a\n")
    (pkg / "c.py").write_text("import fake.a\n")
    edges, deferred = import_graph(pkg)
    assert edges == {"fake": set(), "fake.a": {"fake.sub", "fake.sub.b"}, "fake.sub": set(), "fake.sub.b": {"fake.a"},
                     "fake.c": {"fake.a"}}
    assert cycles(edges) == [["fake.a", "fake.sub.b"]]
    assert [(d.module, d.line, d.statement, d.source.strip()) for d in deferred] == [
        ("fake.sub.b", 4, "from .. import a", "from .. import a  # deferred: why")]
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert layer_of("mlx_dupq.dup.specs") < layer_of("mlx_dupq.config") < layer_of("mlx_dupq.dup.plans")
    assert layer_of("mlx_dupq.refine.block") == layer_of("mlx_dupq.dup")  # new modules of a listed package
    assert layer_of("mlx_dupq.io.manifest") == layer_of("mlx_dupq.io")
    assert layer_of("mlx_dupq.eval.data") < layer_of("mlx_dupq.input_stats") < layer_of("mlx_dupq.eval.ppl")
    assert layer_of("mlx_dupq.cli_measure") == layer_of("mlx_dupq.cli") > layer_of("mlx_dupq.eval.ppl")
