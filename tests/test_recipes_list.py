"""`mlx-dupq recipes list`: the product recipes, and their measured quality copied from bench/results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mlx_dupq.config import list_recipes, load_recipe
from mlx_dupq.report.recipes import MEASURED, catalog, measured_index
from tests.test_cli import run

ROOT = Path(__file__).resolve().parents[1]


def test_measured_json_is_rendered_from_the_results():
    assert json.loads(MEASURED.read_text()) == measured_index(ROOT / "bench" / "results")
    res = subprocess.run([sys.executable, "bench/render_tables.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr + res.stdout


def test_every_measured_number_is_a_row_of_its_file():
    for name, entries in json.loads(MEASURED.read_text()).items():
        for e in entries:
            rows = json.loads((ROOT / "bench" / "results" / e["file"]).read_text())["rows"]
            assert any(r.get("ppl") == e["ppl"] and r.get("bits_per_weight") == e["bits_per_weight"] for r in rows), name


def test_product_recipes_are_few_plain_and_described():
    product = list_recipes("product")
    assert 4 <= len(product) <= 8 and {"rtn4", "gptq4", "w2"} <= set(product)
    for name in product:
        d = load_recipe(name).description
        assert d and len(d) + len(name) + 2 <= 80, name
    # studies and generated recipes live apart but still load by name
    assert "gptq2" in list_recipes("studies") and "smollm2-gptq-mixed-3.0" in list_recipes("generated")
    assert "mixed precision" in load_recipe("smollm2-gptq-mixed-3.0").description


def test_recipes_list_shows_measurements(monkeypatch, capsys):
    code, o, e = run(monkeypatch, capsys, "recipes", "list", "--json")
    assert code == 0, e
    rows = {r["name"]: r for r in json.loads(o)}
    assert set(rows) == set(list_recipes("product"))
    rtn4 = rows["rtn4"]["measured"]
    assert rtn4 and all(m["file"].endswith(".json") and m["command"] for m in rtn4)
    code, o, e = run(monkeypatch, capsys, "recipes", "list")
    first = rtn4[0]
    assert f"PPL {first['ppl']:.2f}" in o and f"{first['bits_per_weight']:.3f} bpw" in o
    assert {r["kind"] for r in catalog(("product", "studies", "generated"))} == {"product", "studies", "generated"}
