"""``convert --bpw B``: the automatic pipeline (mlx_dupq.auto) on tiny random models."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_dupq.auto import CD_SWEEPS, TERNARY_SPEC, plan_auto
from mlx_dupq.errors import DupqError
from tests.test_cli import assert_one_line_error, run


def test_bpw_convert_stays_within_budget(monkeypatch, capsys, tiny_dirs, tmp_path):
    out = tmp_path / "pack"
    code, o, e = run(monkeypatch, capsys, "convert", tiny_dirs["llama"], "-o", out, "--bpw", "3.5", "--e2e-steps", "0")
    assert code == 0, e
    assert "what was chosen and why" in o and "allocation" in o and "--e2e-steps 0" in o
    cfg = json.loads((out / "config.json").read_text())["mlx_dupq"]
    assert cfg["bits_per_weight"] <= 3.5
    assert cfg["recipe"]["description"].startswith("convert --bpw 3.5")
    assert cfg["recipe"]["refine"]["block"]["epochs"] >= 1
    assert len(cfg["refine"]["block"]["layers"]) == 2
    code, o, e = run(monkeypatch, capsys, "inspect", out, "--json")
    assert code == 0 and json.loads(o)["bits_per_weight"] <= 3.5


def test_bpw_runs_the_e2e_stage(monkeypatch, capsys, tiny_dirs, tmp_path):
    out = tmp_path / "pack"
    code, o, e = run(monkeypatch, capsys, "convert", tiny_dirs["llama"], "-o", out, "--bpw", "3.5", "--e2e-steps", "3")
    assert code == 0, e
    assert "3 steps x 1 x 256 tokens (2" in o and "text, 1 chat windows)" in o
    cfg = json.loads((out / "config.json").read_text())["mlx_dupq"]
    assert cfg["bits_per_weight"] <= 3.5 and cfg["recipe"]["refine"]["e2e"]["steps"] == 3
    rec = cfg["refine"]["e2e"]
    assert rec["steps_run"] == 3 and rec["valid_kl_after"] <= rec["valid_kl_before"]
    assert rec["options"]["chat_samples"] == 1 and "+chat:self[" in rec["data"]  # the teacher's own answers
    assert "e2e distillation" in e and sorted(p.name for p in tmp_path.iterdir()) == ["pack"]


@pytest.mark.parametrize("args, words", [
    (["--bpw", "3.5", "--e2e-steps", "-1"], "--e2e-steps"),
    (["--e2e-steps", "3", "--bits", "2"], "--e2e-steps needs --bpw"),
])
def test_bad_e2e_steps_fail_in_one_line(monkeypatch, capsys, tiny_dirs, tmp_path, args, words):
    code, o, e = run(monkeypatch, capsys, "convert", tiny_dirs["llama"], "-o", tmp_path / "p", *args)
    assert_one_line_error(code, e, words, exit_code=2)
    assert list(tmp_path.iterdir()) == []


def test_bpw_below_reachable_fails_in_one_line(monkeypatch, capsys, tiny_dirs, tmp_path):
    out = tmp_path / "pack"
    code, o, e = run(monkeypatch, capsys, "convert", tiny_dirs["llama"], "-o", out, "--bpw", "1.0")
    assert_one_line_error(code, e, "below the smallest", exit_code=2)  # a bad --bpw value
    assert not out.exists() and not (tmp_path / "pack.partial").exists()


def test_bpw_above_the_widest_plan_says_what_it_gives(tiny_dirs):
    """A budget above every module at its widest candidate gets that plan, and the allocation says so
    (the pack is smaller than asked for, not silently)."""
    rec, choices = plan_auto(str(tiny_dirs["llama"]), 40.0, e2e_steps=0)
    why = next(c for c in choices if c.step == "allocation").why
    assert "--bpw 40 is above the widest plan" in why
    widest = float(why.split("widest plan (")[1].split(" ")[0])
    assert 8 <= widest < 40 and float(why.split("; ")[-1].split(" planned")[0]) <= widest + 1e-4
    _, choices = plan_auto(str(tiny_dirs["llama"]), 3.0, e2e_steps=0)
    assert "widest plan" not in next(c for c in choices if c.step == "allocation").why


def test_bpw_with_recipe_is_refused(monkeypatch, capsys, tiny_dirs, tmp_path):
    code, o, e = run(monkeypatch, capsys, "convert", tiny_dirs["llama"], "-o", tmp_path / "p", "--bpw", "3",
                     "--recipe", "gptq2")
    assert_one_line_error(code, e, "--bpw chooses", exit_code=2)


def test_a_budget_below_2_bit_layers_is_reached_with_a_ternary_embedding_and_head(tiny_dirs):
    """2.3 bits/weight is below 2-bit layers with a 2-bit embedding and head (the old candidates'
    floor, 2.54) and below 2-bit g64 layers with a ternary embedding and head on the tiny llama:
    only ternary embedding/head and some 2-bit g128 layers reach it."""
    rec, choices = plan_auto(str(tiny_dirs["llama"]), 2.3, e2e_steps=0)
    alloc = next(c for c in choices if c.step == "allocation")
    assert float(alloc.why.split("; ")[-1].split(" planned")[0]) <= 2.3
    assert rec.spec_for("model.embed_tokens") == TERNARY_SPEC and rec.spec_for("lm_head") == TERNARY_SPEC
    # the tiny llama's rows are 64 wide: labels say what the pack holds (groups of 64), the recipe what was asked
    assert "down to ternary" in alloc.why and "embed_tokens wtg64s" in alloc.choice
    assert "w2g128" in alloc.choice  # only down_proj's 128-wide rows hold groups of 128


def test_2_bit_g128_layers_only_when_the_budget_needs_them(tiny_dirs):
    """The proxy rates 2-bit g128 close to g64 and would spend the saving elsewhere; measured whole it
    lost (SmolLM2-135M --bpw 3.0), so a budget reachable without it gets no 2-bit g128 layer."""
    for bpw in (3.0, 2.4):
        rec, _ = plan_auto(str(tiny_dirs["llama"]), bpw, e2e_steps=0)
        layers = [r.spec for r in rec.rules if "layers" in r.pattern]
        assert any(s.bits == 2 for s in layers)  # budgets tight enough for 2-bit layers
        assert not any(s.bits == 2 and s.group_size == 128 for s in layers)


def test_ternary_is_a_head_candidate_only(tiny_dirs):
    """At a roomy budget the embedding and head stay >= 4 bits and no layer is ever ternary."""
    rec, _ = plan_auto(str(tiny_dirs["llama"]), 2.4, e2e_steps=0)
    layers = [r.spec for r in rec.rules if "layers" in r.pattern]
    assert layers and all(s.bits >= 2 for s in layers)
    rec, _ = plan_auto(str(tiny_dirs["llama"]), 4.0, e2e_steps=0)
    assert rec.spec_for("model.embed_tokens").bits >= 4 and rec.spec_for("lm_head").bits >= 4


def test_cd_sweeps_reach_the_plans_quantizer(tiny_dirs):
    """plan_auto(cd_sweeps=N) puts GPTQ's coordinate-descent sweeps into the recipe and says so; the
    default is :data:`CD_SWEEPS`."""
    rec, choices = plan_auto(str(tiny_dirs["llama"]), 3.0, e2e_steps=0, cd_sweeps=2)
    assert rec.quantizer.cd_sweeps == 2
    assert "2 coordinate-descent sweeps" in next(c for c in choices if c.step == "quantizer").choice
    rec, _ = plan_auto(str(tiny_dirs["llama"]), 3.0, e2e_steps=0)
    assert rec.quantizer.cd_sweeps == CD_SWEEPS


def test_rotation_that_unties_the_head_is_decided_by_the_planned_kl(tiny_dirs):
    """The tiny qwen2 ties its embedding and its final norm is random, so the fold would untie the
    head: both plans are made and the one with the lower whole-plan KL is kept, the KLs printed."""
    rec, choices = plan_auto(str(tiny_dirs["qwen2"]), 4.0, e2e_steps=0)
    why = choices[0].why
    assert "both were planned" in why
    kl_rot, kl_plain = (float(why.split("RTN KL ")[1].split(" ")[0]), float(why.split(" vs ")[1].split(" ")[0]))
    assert (rec.rotation is not None) == (kl_rot < kl_plain)
    assert (choices[0].choice == "none") == (rec.rotation is None)
    with pytest.raises(DupqError):
        plan_auto(str(tiny_dirs["qwen2"]), 0.0)


def test_rotation_that_unties_the_head_is_dropped_when_only_the_tied_plan_fits(tiny_dirs):
    """At 2.6 bits/weight the untied head does not fit: the tied plan is kept and says why; its embedding,
    which is the head too and keeps mse, is never ternary."""
    rec, choices = plan_auto(str(tiny_dirs["qwen2"]), 2.6, e2e_steps=0)
    assert rec.rotation is None and choices[0].choice == "none" and "only this plan fits" in choices[0].why
    assert rec.spec_for("model.embed_tokens").bits == 2
    assert "tied embedding down to 2 bits" in next(c for c in choices if c.step == "allocation").why


def test_planned_kl_is_zero_for_float_and_grows_as_bits_drop(tiny_dirs):
    from mlx_dupq.config import QuantSpec, Recipe
    from mlx_dupq.io.loader import load_model
    from mlx_dupq.search.sensitivity import planned_kl

    m, _, _ = load_model(str(tiny_dirs["llama"]))
    tokens = mx.array(np.random.default_rng(0).integers(0, 300, size=(2, 16)))
    before = m(tokens)
    kl8, kl2 = (planned_kl(m, tokens, Recipe(default=QuantSpec(b, 64), embed=QuantSpec(b, 64), lm_head=QuantSpec(b, 64)))
                for b in (8, 2))
    assert 0 <= kl8 < kl2
    assert mx.allclose(m(tokens), before).item()  # the float weights are back


def test_block_refine_says_it_trains_the_experts_of_a_moe(tiny_dirs):
    """The block stage's choice names the MoE experts on a MoE model and not on a dense one."""
    for name, says in (("deepseek", True), ("llama", False)):
        _, choices = plan_auto(str(tiny_dirs[name]), 4.0, e2e_steps=0)
        block = next(c for c in choices if c.step == "block refine").choice
        assert ("MoE experts too" in block) is says, (name, block)
