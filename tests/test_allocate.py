"""Bit allocation: exact on toys (brute force), within budget after a real convert, better than uniform."""

from __future__ import annotations

import itertools
import math

import mlx.core as mx
import numpy as np
import pytest

import mlx_dupq
from mlx_dupq.config import QuantSpec, Recipe, load_recipe
from mlx_dupq.errors import DupqError
from mlx_dupq.search.allocate import allocate, recipe_choice, solve_dp, solve_greedy, total_delta
from mlx_dupq.search.sensitivity import Sensitivity, measure_sensitivity
from tests.tiny import VOCAB


def toy(seed: int, modules: int = 3) -> Sensitivity:
    """A random table with convex-or-not deltas and sizes like packed weights."""
    rng = np.random.default_rng(seed)
    specs = {QuantSpec(bits=b).label(): QuantSpec(bits=b) for b in (2, 3, 4, 8)}
    kl, bits, params = {}, {}, {}
    for i in range(modules):
        n = int(rng.integers(1, 20)) * 64
        params[f"m{i}"] = n
        bits[f"m{i}"] = {lab: n * s.bits + (n // 64) * 32 for lab, s in specs.items()}
        d = np.sort(rng.exponential(1.0, 4))[::-1] * rng.exponential(1.0)
        kl[f"m{i}"] = dict(zip(specs, d.tolist()))
    return Sensitivity(kl=kl, proxy={}, bits=bits, specs=specs, params=params, fixed_bits=int(rng.integers(0, 500)),
                       n_params=sum(params.values()) + 100)


def brute_force(t: Sensitivity, budget: float):
    paths = sorted(t.bits)
    best = None
    for combo in itertools.product(*[list(t.bits[p]) for p in paths]):
        choice = dict(zip(paths, combo))
        if t.fixed_bits + sum(t.bits[p][c] for p, c in choice.items()) <= math.floor(budget * t.n_params):
            d = total_delta(t, choice)
            best = d if best is None else min(best, d)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_dp_matches_brute_force(seed):
    t = toy(seed)
    lo, hi = t.bpw({p: "w2g64" for p in t.bits}), t.bpw({p: "w8g64" for p in t.bits})
    for budget in np.linspace(lo, hi + 0.5, 9):
        rec = allocate(t, float(budget))
        choice = recipe_choice(t, rec)
        assert t.bpw(choice) <= budget
        assert total_delta(t, choice) == pytest.approx(brute_force(t, budget), rel=1e-12)
        g = recipe_choice(t, allocate(t, float(budget), solver="greedy"))
        assert t.bpw(g) <= budget and total_delta(t, g) >= total_delta(t, choice) - 1e-12


def test_dp_coarse_grid_stays_within_budget():
    t = toy(3, modules=6)
    from mlx_dupq.search.allocate import _options

    opts = _options(t, t.kl, {})
    cap = math.floor(3.1 * t.n_params) - t.fixed_bits
    picked = solve_dp(opts, cap, max_states=7)  # forces rounding
    assert sum(o[j][1] for (_, o), j in zip(opts, picked)) <= cap
    assert sum(o[j][1] for (_, o), j in zip(opts, solve_greedy(opts, cap))) <= cap


def test_min_bits_and_infeasible():
    t = toy(0)
    rec = allocate(t, 9.0, min_bits={"^m0$": 8})
    assert rec.spec_for("m0").bits == 8
    with pytest.raises(DupqError, match="below the smallest reachable"):
        allocate(t, 1.0)
    with pytest.raises(DupqError, match="no candidate spec"):
        allocate(t, 9.0, min_bits={"^m1$": 16})


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_convert_respects_budget_and_beats_uniform(tiny_dirs, tmp_path, model_type):
    src = tiny_dirs[model_type]
    model, _ = mlx_dupq.load(src)
    x = mx.array(np.random.default_rng(0).integers(0, VOCAB, (2, 16)).astype(np.int32))
    t = measure_sensitivity(model, x, bits=(2, 3, 4, 8))
    uniform = {p: "w3g64" for p in t.bits}
    budget = t.bpw(uniform)  # uniform 3-bit, embeddings too: the same all-in bits
    rec = allocate(t, budget, embed_min_bits=3)
    choice = recipe_choice(t, rec)
    assert total_delta(t, choice) < total_delta(t, uniform)
    assert all(rec.spec_for(p).bits >= 3 for p in t.bits if "embed" in p or "lm_head" in p)
    assert f"<= {budget:g} bits/weight" in rec.description
    res = mlx_dupq.convert(src, tmp_path / "pack", rec)
    assert res.bits_per_weight <= budget + 1e-9
    assert res.bits_per_weight == pytest.approx(t.bpw(choice), abs=1e-12)  # planned == stored
    # the pinned rules are what the pack recorded
    import json

    modules = json.loads((tmp_path / "pack" / "config.json").read_text())["mlx_dupq"]["modules"]
    assert {p: modules[p]["bits"] for p in t.bits} == {p: rec.spec_for(p).bits for p in t.bits}


def test_cli_writes_recipe(tiny_dirs, tmp_path, monkeypatch, capsys):
    from tests.test_cli import run

    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. hello world, this is a tiny test corpus. " * 40)
    out = tmp_path / "mix.toml"
    code, o, e = run(monkeypatch, capsys, "allocate", tiny_dirs["llama"], "--budget", "3.5", "--data", text,
                     "-n", "2", "--seq-len", "16", "-o", out)
    assert code == 0, e
    assert "wrote" in o
    rec = load_recipe(out)
    assert rec.rules and all(r.pattern.startswith("^") for r in rec.rules)
    from mlx_dupq.search.allocate import recipe_toml

    assert load_recipe(out) == rec
    again = tmp_path / "again.toml"
    again.write_text(recipe_toml(rec))
    assert load_recipe(again) == rec
    # round trip of a recipe with every optional field set
    from mlx_dupq.config import RotationSpec, Rule

    full = Recipe(name="x", description='a "quoted" \\ one', embed=None, rules=(Rule(r"^a\.b$", None),
                  Rule("c", QuantSpec(bits=1.58, group_size=0, symmetric=True))), rotation=RotationSpec(layers=(0, 2)))
    again.write_text(recipe_toml(full))
    assert load_recipe(again) == full
