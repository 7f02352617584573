"""Every shipped recipe (mlx_dupq/recipes/**.toml) loads, round-trips, and converts a tiny model that then runs."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest

import mlx_dupq
from mlx_dupq.config import Recipe, list_recipes, load_recipe
from mlx_dupq.errors import DupqError

RECIPES = list_recipes()


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz .,"))
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(" ".join("".join(rng.choice(letters, rng.integers(1, 8))) for _ in range(1500)))
    return str(p)


def test_the_issue_recipes_ship():
    for name in ("w2", "w2a8", "rtn2", "gptq2", "rot-gptq2", "w4a8-rtn"):
        assert name in RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_round_trips_and_converts(name, tiny_dirs, tmp_path, calib_text):
    rec = load_recipe(name)
    assert rec.name
    assert Recipe.from_dict(rec.to_dict()) == rec
    if rec.quantizer.calibrated:  # same recipe, small calibration on the tiny model's own text
        rec = dataclasses.replace(rec, quantizer=dataclasses.replace(
            rec.quantizer, calib_data=calib_text, calib_samples=4, calib_seq_len=32))
    if name.startswith("moe"):
        pytest.skip("MoE recipes convert MoE models: tests/test_moe.py (a tiny model cannot meet their budget)")
    out = tmp_path / "pack"
    if rec.duplication is not None and rec.duplication.copies and max(rec.duplication.copies) >= 2:
        # written for one model (e.g. by search-dup): names layers the 2-layer tiny model lacks
        with pytest.raises(DupqError, match="decoder layers"):
            mlx_dupq.convert(tiny_dirs["llama"], out, rec)
        assert not out.exists()
        return
    res = mlx_dupq.convert(tiny_dirs["llama"], out, rec)
    assert 1.0 < res.bits_per_weight < 16.5
    m, _ = mlx_dupq.load(out)
    logits = m(mx.array([[1, 2, 3, 4, 5]]))
    assert bool(mx.all(mx.isfinite(logits)).item())
