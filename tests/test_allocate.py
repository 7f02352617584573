"""Bit allocation: exact on toys (brute force), within budget after a real convert, better than uniform."""

from __future__ import annotations

import itertools
import math

import mlx.core as mx
from mlx.utils import tree_flatten
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


def test_candidates_with_group_sizes():
    from mlx_dupq.search.sensitivity import candidate_specs, parse_candidates

    assert parse_candidates("2,3") == (2, 3)
    assert parse_candidates("2:64, 3:128,ternary") == ((2, 64), (3, 128), 1.58)
    base = QuantSpec(bits=3, group_size=128, symmetric=True)
    labels = [s.label() for s in candidate_specs(base, parse_candidates("2:64,3:128,4"))]
    assert labels == ["w2g64s", "w3g128s", "w4g128s"]
    with pytest.raises(DupqError, match="group size"):
        parse_candidates("2:48")
    with pytest.raises(DupqError, match="no candidate"):
        parse_candidates(" , ")


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_rotated_only_decoder_planned_equals_stored(tiny_dirs, tmp_path, model_type):
    """w2-t3a's setting: rotation, 3-bit g128 or 2-bit g64 per decoder linear, ternary embedding and
    head fixed. The rotated model computes the same logits, wrapped down_projs are named as the recipe
    names them, and the converted pack stores exactly the planned bits."""
    import json

    from mlx_dupq.config import RotationSpec
    from mlx_dupq.io.loader import load_model
    from mlx_dupq.search.sensitivity import rotate_float_model

    src = tiny_dirs[model_type]
    model, config, _ = load_model(src)
    x = mx.array(np.random.default_rng(0).integers(0, VOCAB, (2, 16)).astype(np.int32))
    base = Recipe(name="t", default=QuantSpec(bits=3, group_size=128),
                  embed=QuantSpec(bits="ternary", group_size=128, symmetric=True),
                  lm_head=QuantSpec(bits="ternary", group_size=128, symmetric=True),
                  rotation=RotationSpec(kind="block_hadamard", online_down=True))
    rot = rotate_float_model(model, config, base.rotation)
    assert float(mx.max(mx.abs(rot(x) - model(x))).item()) < 1e-3 * float(mx.max(mx.abs(model(x))).item())
    given, _, _ = load_model(src)  # consume=True: the same rotated model, the source's weights freed
    same = rotate_float_model(given, config, base.rotation, consume=True)
    assert [k for k, _ in tree_flatten(same.parameters())] == [k for k, _ in tree_flatten(rot.parameters())]
    assert all(mx.array_equal(a, b) for (_, a), (_, b) in zip(tree_flatten(same.parameters()), tree_flatten(rot.parameters())))
    assert all(v.size == 0 for _, v in tree_flatten(given.parameters()))
    t = measure_sensitivity(rot, x, base, bits=((2, 64), (3, 128)), only=r"\.layers\.")
    assert all(".layers." in p and not p.endswith(".linear") for p in t.bits)
    assert {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"} <= set(t.bits)
    assert all(set(t.bits[p]) == {"w2g64", "w3g128"} for p in t.bits)
    assert not any("embed" in p or "lm_head" in p for p in t.bits) and t.extra["kept"]
    budget = (t.bpw({p: "w2g64" for p in t.bits}) + t.bpw({p: "w3g128" for p in t.bits})) / 2
    rec = allocate(t, budget, base)
    choice = recipe_choice(t, rec)
    assert set(choice.values()) == {"w2g64", "w3g128"}
    assert rec.spec_for("model.embed_tokens").ternary
    res = mlx_dupq.convert(src, tmp_path / "pack", rec)
    assert res.bits_per_weight == pytest.approx(t.bpw(choice), abs=1e-12)  # planned == stored
    modules = json.loads((tmp_path / "pack" / "config.json").read_text())["mlx_dupq"]["modules"]
    requested = {p: modules[p].get("requested_group_size", modules[p]["group_size"]) for p in t.bits}
    assert requested == {p: rec.spec_for(p).group_size for p in t.bits}


def test_cli_only_groups_and_table(tiny_dirs, tmp_path, monkeypatch, capsys):
    import json

    from tests.test_cli import run

    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. hello world, this is a tiny test corpus. " * 40)
    out, table = tmp_path / "mix.toml", tmp_path / "table.json"
    code, o, e = run(monkeypatch, capsys, "allocate", tiny_dirs["llama"], "--budget", "5.0", "--data", text,
                     "-n", "2", "--seq-len", "16", "--bits", "2:32,3:64", "--only", r"\.mlp\.", "--measure", "proxy",
                     "-o", out, "--table", table)
    assert code == 0, e
    rec = load_recipe(out)
    assert rec.rules and all(r"\.mlp\." in r.pattern for r in rec.rules)
    assert {(r.spec.bits, r.spec.group_size) for r in rec.rules} == {(2, 32), (3, 64)}  # (8-bit embeddings fixed)
    t = json.loads(table.read_text())
    assert t["command"].startswith("mlx-dupq allocate") and set(t["proxy"]) == {r.pattern[1:-1].replace("\\", "")
                                                                                  for r in rec.rules}
