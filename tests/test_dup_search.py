"""Duplication search (SPEC F8) and the in-memory plan builder, on tiny random models."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

import mlx_dupq
from mlx_dupq.config import QuantSpec, load_recipe
from mlx_dupq.dup.build import quantize_with_plan
from mlx_dupq.dup.specs import CopySpec, DupPlan
from mlx_dupq.errors import DupqError
from mlx_dupq.search.dup_search import (Evaluator, Objective, SearchSpace, copy_specs, evolutionary_search,
                                        grid_search, search_dup, tpe_search, two_stage_search, write_dup_recipe)
from tests.tiny import rel_err

S2 = QuantSpec(bits=2, group_size=32)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    rng = np.random.default_rng(1)
    letters = np.array(list("abcdefghij klmnop."))
    p = tmp_path_factory.mktemp("dsearch") / "calib.txt"
    p.write_text(" ".join("".join(rng.choice(letters, rng.integers(1, 7))) for _ in range(2000)))
    return str(p)


def test_in_memory_build_matches_the_pack(tiny_dirs, tmp_path):
    from mlx_dupq.config import Recipe

    src = tiny_dirs["qwen2"]
    plan = DupPlan(mode="residual", copies={1: 2})
    emb = QuantSpec(bits=8, group_size=32)
    rec = Recipe(name="t", default=S2, embed=emb, lm_head=emb, duplication=plan)
    res = mlx_dupq.convert(src, tmp_path / "p", rec)
    packed, _ = mlx_dupq.load(tmp_path / "p")
    model, _ = mlx_dupq.load(src)
    n = sum(v.size for _, v in __import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(model.parameters()))
    bits = quantize_with_plan(model, plan, S2, embed=emb)
    assert bits / n == pytest.approx(res.bits_per_weight, rel=1e-6)
    from mlx_dupq.io.pack import cast_floats

    cast_floats(model, mx.float32)
    x = mx.array([[1, 5, 9, 13, 2, 7]])
    assert rel_err(model(x), packed(x)) < 2e-2  # the pack stores norms in fp16; the 2-bit error is ~0.3


def test_copy_specs_differ():
    assert [c.scale_mult for c in copy_specs(3, "scale", 0.05)] == [1.0, 1.05, 0.95]
    assert [c.grid_offset for c in copy_specs(2, "offset", 0.0)] == [0.0, 0.5]
    assert copy_specs(2, "rotation", 0.1)[1].rotation["eps"] == 0.1
    assert copy_specs(2, "scale", 0.05, "residual") == [CopySpec(), CopySpec()]
    with pytest.raises(DupqError):
        copy_specs(2, "bogus", 0.1)


def _evaluator(tiny_dirs, objective=Objective()):
    from mlx.utils import tree_flatten

    model, _ = mlx_dupq.load(tiny_dirs["llama"])
    weights = list(tree_flatten(model.parameters()))
    n = sum(v.size for _, v in weights)

    def make():
        m, _ = mlx_dupq.load(tiny_dirs["llama"], lazy=True)
        m.load_weights(weights)
        return m

    tokens = mx.array(np.random.default_rng(0).integers(0, 300, (2, 24)))
    space = SearchSpace.contiguous(2, 1, counts=(1, 2), modes=("parallel", "residual"), diversity=("scale",), steps=(0.05,))
    return Evaluator(make, tokens, S2, space, objective, n, 2)


def test_searchers_find_the_grid_optimum(tiny_dirs):
    ev = _evaluator(tiny_dirs)
    grid = grid_search(ev, 100)
    assert len(grid) == 8  # 2 modes x 2 x 2 counts
    best = grid[0]["objective"]
    assert all(t["objective"] >= best for t in grid)
    # every copy's bytes count; the compute term counts copies
    none = next(t for t in grid if t["plan"] is None)
    both = next(t for t in grid if t["params"] == {"mode": "residual", "by": "scale", "step": 0.05, "g0": 2, "g1": 2})
    assert both["bits_per_weight"] > none["bits_per_weight"] and both["latency"] == 2.0 and none["latency"] == 1.0
    assert tpe_search(ev, 30, seed=0)[0]["objective"] == best  # 8 candidates: TPE (10 random starts) finds it
    assert evolutionary_search(ev, 12, population=4, seed=0)[0]["objective"] >= best
    assert two_stage_search(ev, 16)[0]["objective"] == best


def test_memory_cap_and_size_term(tiny_dirs):
    none_bpw = _evaluator(tiny_dirs)(dict(mode="parallel", by="scale", step=0.05, g0=1, g1=1))["bits_per_weight"]
    ev = _evaluator(tiny_dirs, Objective(alpha=1.0, max_bpw=none_bpw + 1e-6))
    trials = grid_search(ev, 100)
    assert trials[0]["plan"] is None  # only the plan without copies fits the cap
    assert all(not math.isfinite(t["objective"]) for t in trials if t["plan"] is not None)


def test_search_cli_writes_a_recipe_that_converts(tiny_dirs, tmp_path, calib_file):
    from typer.testing import CliRunner

    from mlx_dupq.cli import app

    out = tmp_path / "best.toml"
    r = CliRunner().invoke(app, ["search-dup", str(tiny_dirs["qwen2"]), "--method", "two-stage", "--trials", "6",
                                 "--layer-group", "1", "--calib-data", calib_file, "--samples", "2", "--seq-len", "32",
                                 "--json", str(tmp_path / "trials.json"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    rec = load_recipe(str(out))
    mlx_dupq.convert(tiny_dirs["qwen2"], tmp_path / "p", rec)
    mlx_dupq.load(tmp_path / "p")
    r = CliRunner().invoke(app, ["search-dup", str(tiny_dirs["qwen2"]), "--method", "nope", "-o", str(out)])
    assert isinstance(r.exception, DupqError) and "unknown search method" in str(r.exception)


def test_written_recipe_round_trips(tmp_path):
    from mlx_dupq.search.dup_search import dup_recipe

    plan = DupPlan(mode="parallel", copies={3: [CopySpec(), CopySpec(rotation={"kind": "perturbed", "seed": 1, "eps": 0.05},
                                                                     quant=QuantSpec(bits=3, group_size=32))]})
    rec = dup_recipe(plan.to_dict(), S2, "t")
    p = write_dup_recipe(rec, tmp_path / "r.toml")
    back = load_recipe(str(p))
    assert back.duplication == rec.duplication and back.default == rec.default


def test_in_memory_build_fits_mixtures_on_float_hessians(tiny_dirs):
    from mlx_dupq.dup.build import float_hessians
    from mlx_dupq.layers.dup_linear import DupLinear

    model, _ = mlx_dupq.load(tiny_dirs["qwen2"])
    plan = DupPlan(mode="parallel", aggregation="learned",
                   copies={1: [CopySpec(), CopySpec(scale_mult=1.05), CopySpec(scale_mult=0.95)]})
    with pytest.raises(DupqError, match="hessians"):
        quantize_with_plan(model, plan, S2)
    tokens = mx.array(np.random.default_rng(0).integers(1, 300, size=(2, 16)))
    hs = float_hessians(model, tokens, [1])
    assert set(hs) == {1} and "mlp.down_proj" in hs[1]
    h = hs[1]["self_attn.q_proj"]
    assert h.shape[0] == h.shape[1] and float(mx.abs(h - h.T).max().item()) < 1e-3 * float(mx.abs(h).max().item())
    quantize_with_plan(model, plan, S2, hessians=hs)
    dups = [m for p, m in model.named_modules() if isinstance(m, DupLinear) and ".layers.1." in f".{p}."]
    assert dups and any("mix" in m for m in dups)  # fitted weights kept where they beat the mean
