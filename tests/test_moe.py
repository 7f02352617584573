"""Expert-aware quantization (SPEC F6): per-expert-bit switch layer, statistics, router and top-k
studies, and the moe recipe's convert + load round trip on every MoE family mlx-lm knows."""

from __future__ import annotations

import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_dupq.config import QuantSpec, Recipe, load_recipe
from mlx_dupq.errors import DupqError
from mlx_dupq.layers.moe_linear import MixedSwitchLinear, quantize_experts
from mlx_dupq.layers.quant_linear import build_module
from mlx_dupq.moe import routing as R
from mlx_dupq.moe.precision import allocate, plan_experts, stored_bits
from mlx_dupq.moe.router import agreement, router_quant_layer, selection_change
from mlx_dupq.moe.expert_sensitivity import ablation_importance, combine, spearman
from mlx_dupq.moe.stats import expert_types, frequency, hot_cold, record_routing
from mlx_dupq.moe.topk import active_weights
from mlx_dupq.quant.qtensor import dequantize
from mlx_dupq.quant.rtn import rtn_quantize
from tests.tiny import TOKENS, build_model, logits, make_hf_dir, rel_err

FAMILIES = ("deepseek", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe")


def _recipe(calib_text, budget=4.0, **kw) -> Recipe:
    rec = load_recipe("moe-w2")
    moe = dataclasses.replace(rec.moe, calib_data=str(calib_text), calib_samples=2, calib_seq_len=64,
                              budget=budget, **kw)
    return dataclasses.replace(rec, moe=moe)


# --------------------------------------------------------------------------- the layer


def test_mixed_switch_equals_per_expert_dequantized_reference():
    E, out, n = 6, 64, 64
    w = mx.random.normal((E, out, n), key=mx.random.key(0)) * 0.05
    specs = [QuantSpec(b, 32) for b in (2, 4, 2, 8, 3, 1.58)]
    arrays, entry = quantize_experts(w, specs)
    m = build_module("switch_linear", (E, out, n), entry)
    assert isinstance(m, MixedSwitchLinear)
    m.load_weights(list(arrays.items()))
    # reference: each expert quantized on its own at its own width, dequantized
    ref_w = mx.stack([dequantize(rtn_quantize(w[e], specs[e])) for e in range(E)])
    assert mx.allclose(m.dequantized(), ref_w, atol=1e-6).item()
    x = mx.random.normal((3, 5, 1, 1, n), key=mx.random.key(1))
    idx = mx.random.randint(0, E, (3, 5, 2), key=mx.random.key(2))
    y = m(x, idx)
    ref = mx.gather_mm(x, ref_w.swapaxes(-1, -2), rhs_indices=idx)
    assert y.shape == ref.shape
    assert rel_err(y, ref) < 2e-3
    # sorted path (what SwitchGLU uses for many tokens)
    from mlx_lm.models.switch_layers import _gather_sort, _scatter_unsort

    xs, ids, inv = _gather_sort(x, idx)
    ys = _scatter_unsort(m(xs, ids, sorted_indices=True), inv, idx.shape)
    assert rel_err(ys, ref) < 2e-3
    # CPU prefill path (>= 16 pairs per expert: dequantize once, BLAS) agrees with the reference
    xb = mx.random.normal((64, 1, 1, n), key=mx.random.key(3))
    ib = mx.random.randint(0, E, (64, 2), key=mx.random.key(4))
    assert rel_err(m(xb, ib), mx.gather_mm(xb, ref_w.swapaxes(-1, -2), rhs_indices=ib)) < 1e-5
    # widths really differ per expert: the 2-bit experts are worse than the 8-bit one
    errs = [rel_err(ref_w[e], w[e]) for e in range(E)]
    assert errs[3] < errs[1] < errs[0]
    assert entry["expert_bits"] == [2.0, 4.0, 2.0, 8.0, 3.0, 1.58]


def test_mixed_switch_rejects_damaged_entry():
    w = mx.zeros((4, 32, 32))
    _, entry = quantize_experts(w, [QuantSpec(2, 32)] * 4)
    bad = dict(entry, groups=[dict(entry["groups"][0], experts=[0, 1, 2])])
    with pytest.raises(DupqError, match="no group"):
        build_module("switch_linear", (4, 32, 32), bad)


# --------------------------------------------------------------------------- routing and statistics


@pytest.mark.parametrize("family", ("deepseek", "qwen2_moe"))
def test_dropping_routed_or_shared_experts(family):
    """drop_routed + drop_shared = the block outputs zero; each alone keeps exactly the other part."""
    model, _ = build_model(family)
    blocks = R.install(model)
    b = blocks[0]
    x = mx.random.normal((1, 5, model.args.hidden_size), key=mx.random.key(0))
    full = b.block(x)
    with R.routing(model, drop_routed=True, drop_shared=True):
        assert float(mx.abs(b.block(x)).max().item()) == 0.0
    with R.routing(model, drop_routed=True):
        shared = b.block(x)
    with R.routing(model, drop_shared=True):
        routed = b.block(x)
    assert rel_err(shared + routed, full) < 1e-5 and float(mx.abs(shared).max().item()) > 0
    with R.routing(model, random_experts=0):
        a = b.block(x)
    with R.routing(model, random_experts=0):
        assert rel_err(b.block(x), a) < 1e-7  # seeded
    assert rel_err(a, full) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_generic_routing_equals_mlx_lm_and_full_k(family):
    model, _ = build_model(family)
    ref = logits(model)
    blocks = R.install(model)
    assert rel_err(logits(model), ref) < 1e-5
    with R.routing(model, k=blocks[0].k):
        assert rel_err(logits(model), ref) < 1e-5
    with R.routing(model, k=1):
        assert rel_err(logits(model), ref) > 1e-3  # fewer experts change the output
    R.uninstall(model)
    assert rel_err(logits(model), ref) < 1e-6


def test_statistics_on_hand_made_routing():
    inds = np.array([[0, 1], [0, 2], [0, 1], [0, 3]])
    f = frequency(inds, 5)
    assert f.tolist() == [0.5, 0.25, 0.125, 0.125, 0.0]
    hc = hot_cold(f)
    assert hc["top10_share"] == 0.5 and hc["hot"] == [0] and hc["cold"] == [4]
    assert hc["bottom50_share"] == pytest.approx(0.125)  # experts 3 and 4 (2 of 5)
    by_genre = {"news": np.array([0.5, 0.5, 0.0, 0.0, 0.0]), "fiction": np.array([0.5, 0.0, 0.45, 0.05, 0.0])}
    t = expert_types(by_genre)
    assert t["types"] == ["general", "domain", "domain", "rare", "rare"]
    assert t["top_genre"][1] == "news" and t["top_genre"][2] == "fiction"


def test_record_routing_and_agreement():
    model, _ = build_model("deepseek")
    batches = mx.concatenate([TOKENS, TOKENS[:, ::-1]])
    ref = record_routing(model, batches)
    assert sorted(ref) == [1, 2]
    assert ref[1]["inds"].shape == (24, 2) and ref[1]["probs"].shape == (24, 8)
    same = agreement(ref, ref)
    assert same["mean"]["top1"] == 1.0 and same["mean"]["confidence_change"] == 0.0
    hot = record_routing(model, batches, temperature=0.5)
    a = agreement(ref, hot)
    assert a["mean"]["top1"] == 1.0  # a temperature keeps the order
    assert a["mean"]["confidence_change"] > 0  # ... and sharpens the top probability


def test_router_study_output_sane():
    model, _ = build_model("deepseek")
    blocks = R.install(model)
    recs = record_routing(model, mx.concatenate([TOKENS, TOKENS[:, ::-1]]), inputs=True)
    rows = router_quant_layer(model, blocks[0], recs[1]["x"], bits_list=(8, 4, 2), group_size=64)
    assert [r["bits"] for r in rows] == [8, 4, 2]
    for r in rows:
        assert 0.0 <= r["selection_change"] <= 1.0 and 0.0 <= r["top1_change"] <= 1.0
        assert r["output_rel_err"] >= 0.0
    # fewer bits never route more faithfully here, and 8 bits is near exact
    assert rows[0]["output_rel_err"] <= rows[2]["output_rel_err"]
    assert rows[0]["selection_change"] <= 0.1
    # the model is restored after the study
    recs2 = record_routing(model, mx.concatenate([TOKENS, TOKENS[:, ::-1]]))
    assert selection_change(recs[1]["inds"], recs2[1]["inds"]) == 0.0


def test_sensitivity_score_and_ablation():
    assert combine(np.array([1.0, 0.5]), np.array([2.0, 2.0]), np.array([0.1, 0.3])).tolist() == pytest.approx(
        [0.5 + 0.3 + 0.2 / 3, 0.25 + 0.3 + 0.2])
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    model, _ = build_model("deepseek")
    imp = ablation_importance(model, mx.concatenate([TOKENS, TOKENS[:, ::-1]]), layers=[1])
    assert list(imp) == [1] and len(imp[1]) == 8
    assert any(abs(v) > 0 for v in imp[1])


def test_active_weights_scale_with_k():
    model, _ = build_model("deepseek")
    full, half = active_weights(model), active_weights(model, k=1)
    assert full["routed_experts"] > 0
    assert full["active"] - half["active"] == pytest.approx(full["routed_experts"] * (2 - 1) / 8)


# --------------------------------------------------------------------------- the budgeted plan


def test_allocate_respects_budget_and_order():
    scores = {1: np.array([0.1, 0.9, 0.5]), 2: np.array([0.8, 0.2, 0.3])}
    cost = {1: (10, 20), 2: (10, 20)}
    raised = allocate(scores, cost, fixed_bits=40, n_params=100, budget=1.2)  # 40 + 60 = 100; room for 2 raises
    assert raised[1].tolist() == [False, True, False] and raised[2].tolist() == [True, False, False]
    with pytest.raises(DupqError, match="below the floor"):
        allocate(scores, cost, fixed_bits=40, n_params=100, budget=0.9)


def test_stored_bits_matches_packer():
    from mlx_dupq.layers.quant_linear import quantize_tensor
    from mlx_dupq.quant.bpw import tensor_bits

    for spec in (QuantSpec(2, 64), QuantSpec(4, 32, True), QuantSpec(1.58, 64), QuantSpec(3, 128)):
        w = mx.random.normal((4, 64, 128))
        arrays, _ = quantize_tensor(w, spec)
        assert stored_bits(tuple(w.shape), spec) == tensor_bits(arrays), spec


# --------------------------------------------------------------------------- convert + load


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_recipe_convert_load_round_trip(family, tmp_path, calib_text):
    from mlx_dupq import load
    from mlx_dupq.io import pack as packio
    from mlx_dupq.pipeline import build_skeleton, convert

    src = make_hf_dir(tmp_path / family, family)
    rec = _recipe(calib_text, max_high_fraction=0.5)
    res = convert(src, tmp_path / "q", rec)
    meta = packio.pack_summary(tmp_path / "q")
    mixed = {p: e for p, e in meta["modules"].items() if e["format"] == "moe_mixed"}
    assert mixed, "the switch layers must be stored with per-expert widths"
    bits = {b for e in mixed.values() for b in e["expert_bits"]}
    assert bits == {2.0, 4.0}  # some experts raised, at most half of each layer's
    assert all(sum(b == 4.0 for b in e["expert_bits"]) <= len(e["expert_bits"]) // 2 for e in mixed.values())
    assert res.bits_per_weight <= 4.0 + 1e-6
    # the plan's prediction is the packer's all-in count
    from mlx_dupq.io.loader import tokenizer_of, load_model

    fmodel, config, tok_dir = load_model(src)
    plan = plan_experts(rec, build_skeleton(config), fmodel, tokenizer_of(tok_dir, config))
    assert plan.predicted_bpw == pytest.approx(res.bits_per_weight, rel=1e-9)
    model, tok = load(tmp_path / "q")
    assert any(isinstance(m, MixedSwitchLinear) for _, m in model.named_modules())
    ref = logits(fmodel)
    err = rel_err(logits(model), ref)
    assert 0 < err < 0.6
    # the rtn2 baseline (every expert 2-bit) is further from the float model than the moe plan
    if family == "deepseek":
        res2 = convert(src, tmp_path / "q2", dataclasses.replace(rec, moe=None, rules=()))
        m2, _ = load(tmp_path / "q2")
        assert rel_err(logits(m2), ref) > err
        assert res2.bits_per_weight < res.bits_per_weight
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["mlx_dupq"]["recipe"]["moe"]["budget"] == 4.0


def test_moe_recipe_refuses_unreachable_budget_and_dense_models(tmp_path, calib_text, tiny_dirs):
    from mlx_dupq.pipeline import convert

    src = make_hf_dir(tmp_path / "ds", "deepseek")
    with pytest.raises(DupqError, match="below the floor"):
        convert(src, tmp_path / "q", _recipe(calib_text, budget=2.0))
    with pytest.raises(DupqError, match="no MoE layers"):
        convert(tiny_dirs["qwen2"], tmp_path / "q2", _recipe(calib_text))
    with pytest.raises(DupqError, match="moe score"):
        _recipe(calib_text, score="magic")


# --------------------------------------------------------------------------- simulated treatments, duplication plan


def test_fake_quantized_experts_copies_rotation_and_restore():
    from mlx_dupq.moe.experts import fake_quantize_experts, restore, snapshot

    model, _ = build_model("deepseek")
    block = R.find_blocks(model)[0]
    w0 = block.switch.up_proj.weight
    snap = snapshot(model)

    def err(specs, **kw):
        fake_quantize_experts(block, specs, **kw)
        e = [rel_err(block.switch.up_proj.weight[i], w0[i]) for i in range(block.num_experts)]
        restore(model, snap)
        return e

    specs = [QuantSpec(2, 32)] * 4 + [None] * 4
    plain = err(specs)
    assert all(x > 0.05 for x in plain[:4]) and all(x == 0 for x in plain[4:])  # float experts untouched
    dup = err(specs, copies={0: 2, 1: 3})
    assert dup[0] < plain[0] and dup[1] < dup[0]  # residual copies shrink the error
    rot = err(specs, rotation="hadamard")
    assert all(0.01 < x < 1.0 for x in rot[:4]) and all(x == 0 for x in rot[4:])
    assert mx.array_equal(block.switch.up_proj.weight, w0).item()  # restored


def test_duplication_group_policy_within_budget():
    from mlx_dupq.moe.duplication import copies_bits, expert_group, plan_copies

    assert expert_group(0.2, 4, "hot", "general") == "always"  # picked by 80 % of tokens
    assert expert_group(0.05, 4, "hot", "domain") == "hot"
    assert expert_group(0.05, 4, "mid", "domain") == "domain"
    assert expert_group(0.01, 4, "cold", "rare") == "rare"
    freqs = {1: np.array([0.4, 0.3, 0.2, 0.1]), 2: np.array([0.25, 0.25, 0.25, 0.25])}
    groups = {1: ["always", "hot", "domain", "rare"], 2: ["general", "domain", "general", "general"]}
    plan = plan_copies(freqs, groups, budget=0.5)  # room for 4 extra copies of 8 experts
    # always x3 (2 extra), hot x2, then the most frequent domain expert x2 (layer 2's, share 0.25 > 0.2)
    assert plan[1] == {0: 3, 1: 2} and plan[2] == {1: 2}
    assert copies_bits(plan, {1: 4, 2: 4}, 1.0)["extra_share"] == pytest.approx(0.5)
    assert plan_copies(freqs, groups, budget=0.0) == {1: {}, 2: {}}


@pytest.mark.parametrize("family", FAMILIES)
def test_studies_run_on_every_family(family):
    from mlx_dupq.moe.experts import fake_quantize_experts, fake_quantize_shared, restore, snapshot
    from mlx_dupq.moe.expert_sensitivity import expert_sensitivity
    from mlx_dupq.moe.stats import massive_ratios

    model, _ = build_model(family)
    batches = mx.concatenate([TOKENS, TOKENS[:, ::-1]])
    blocks = R.install(model)
    rec = record_routing(model, batches, inputs=True)
    b = blocks[0]
    m = massive_ratios(b, rec[b.layer]["x"], rec[b.layer]["inds"])
    assert len(m["per_expert"]) == b.num_experts and (m["shared"] is None) == (b.shared is None)
    rows = router_quant_layer(model, b, rec[b.layer]["x"], bits_list=(8, 2))
    assert rows[0]["output_rel_err"] <= rows[1]["output_rel_err"]
    sens = expert_sensitivity(model, batches, QuantSpec(2, 32))
    assert all(len(v["score"]) == b.num_experts and max(v["score"]) <= 1.0 + 1e-6 for v in sens.values())
    ref = logits(model)
    snap = snapshot(model)
    fake_quantize_experts(b, [QuantSpec(2, 32)] * b.num_experts, rotation="hadamard", copies={0: 2})
    fake_quantize_shared(b, QuantSpec(2, 32))
    assert rel_err(logits(model), ref) > 0
    restore(model, snap)
    assert rel_err(logits(model), ref) < 1e-6
    dyn = record_routing(model, batches, dynamic=(0.99, 1.0), fallback=(1.0, {b.layer: 0}))
    assert dyn[b.layer]["inds"].shape[-1] == b.k
    assert (dyn[b.layer]["inds"] == 0).any(-1).all()  # alpha 1.0: the fallback expert is always among the picks


def test_moe_recipe_with_mse_quantizer(tmp_path, calib_text):
    from mlx_dupq import load
    from mlx_dupq.config import QuantizerSpec
    from mlx_dupq.pipeline import convert

    src = make_hf_dir(tmp_path / "ds", "deepseek")
    rec = dataclasses.replace(_recipe(calib_text, max_high_fraction=0.5), quantizer=QuantizerSpec(method="mse"))
    convert(src, tmp_path / "q", rec)
    rtn = convert(src, tmp_path / "r", _recipe(calib_text, max_high_fraction=0.5))
    model, _ = load(tmp_path / "q")
    ref_model, _ = load(src)
    assert rel_err(logits(model), logits(ref_model)) < 0.6
    assert rtn.bits_per_weight > 0
