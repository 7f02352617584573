"""GPTQ for routed experts in ``[moe]`` recipes: per-expert Hessians of the routed rows, per-expert
GPTQ in the streaming converter (quantized layers advance the calibration state), fallback for experts
that calibration never reaches, and the shipped ``moe-gptq2`` recipe."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_dupq.input_stats import SwitchStats, layer_input_hessians
from mlx_dupq.config import QuantizerSpec, QuantSpec, load_recipe
from mlx_dupq.errors import DupqError
from mlx_dupq.moe import routing as R
from tests.tiny import build_model, make_hf_dir, rel_err


def _random_text(seed: int, words: int) -> str:
    """Random lowercase words: covers the tiny tokenizer's vocabulary (and so every expert)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz .,"))
    return " ".join("".join(rng.choice(letters, rng.integers(1, 8))) for _ in range(words))


@pytest.fixture(scope="module")
def random_text(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib_moe_gptq") / "calib.txt"
    p.write_text(_random_text(0, 3000))
    return str(p)


def _recipe(text, name="moe-gptq2", method=None, samples=16, seq_len=64, **moe_kw):
    """The shipped recipe with a small local calibration file and a budget for the tiny models."""
    rec = load_recipe(name)
    moe = dataclasses.replace(rec.moe, calib_data=text, calib_samples=4, calib_seq_len=64,
                              **{"budget": 4.0, "max_high_fraction": 0.5, **moe_kw})
    q = dataclasses.replace(rec.quantizer, method=method or rec.quantizer.method, calib_data=text,
                            calib_samples=samples, calib_seq_len=seq_len)
    return dataclasses.replace(rec, moe=moe, quantizer=q)


def _eval_tokens(src):
    from mlx_lm.utils import load_tokenizer

    return mx.array([load_tokenizer(src).encode(_random_text(99, 80))[:96]])


def _logit_err(pack, src) -> float:
    import mlx_dupq

    tokens = _eval_tokens(src)
    ref, _ = mlx_dupq.load(src)
    q, _ = mlx_dupq.load(pack)
    return rel_err(q(tokens), ref(tokens))


# --------------------------------------------------------------------------- per-expert Hessians


@pytest.mark.parametrize("family", ["deepseek", "qwen2_moe"])
@pytest.mark.parametrize("n,L", [(6, 16), (1, 8)])  # sorted (>= 64 assignments) and unsorted SwitchGLU paths
def test_expert_hessians_equal_the_routed_rows(family, n, L):
    model, _ = build_model(family)
    block = R.find_blocks(model)[0]
    layer = R.layers_of(model)[block.layer]
    h = mx.random.normal((n, L, 64), key=mx.random.key(7))
    stats = layer_input_hessians(layer, h, switch=True)
    sw = f"{block.path.split('.', 3)[-1]}.switch_mlp"  # mlp.switch_mlp, relative to the layer
    assert {f"{sw}.{p}" for p in ("gate_proj", "up_proj", "down_proj")} <= set(stats)
    assert stats[f"{sw}.gate_proj"] is stats[f"{sw}.up_proj"]  # same x and indices: accumulated once
    assert stats[f"{sw}.down_proj"] is not stats[f"{sw}.up_proj"]
    # the routed rows, recorded by the generic routing forward (same picks as mlx-lm's)
    record: list = []
    R.install(model, R.Routing(record=record, record_inputs=True))
    try:
        from mlx_dupq.input_stats import run_layer

        run_layer(layer, h)
    finally:
        R.uninstall(model)
    X = mx.concatenate([r["x"].reshape(-1, 64) for r in record])
    inds = np.concatenate([np.array(r["inds"].reshape(-1, block.k)) for r in record])
    switch = block.switch
    E = block.num_experts
    for proj in ("gate_proj", "up_proj", "down_proj"):
        s = stats[f"{sw}.{proj}"]
        assert isinstance(s, SwitchStats)
        assert s.tokens == [int((inds == e).any(-1).sum()) for e in range(E)]
    seen = 0
    for e in range(E):
        rows = np.flatnonzero((inds == e).any(-1))
        if len(rows) == 0:
            assert all(stats[f"{sw}.{p}"].expert(e) is None for p in ("gate_proj", "up_proj", "down_proj"))
            continue
        seen += 1
        xe = X[mx.array(rows)]
        want = xe.T @ xe / len(rows)
        for proj in ("gate_proj", "up_proj"):
            got = stats[f"{sw}.{proj}"].expert(e)
            assert got.tokens == len(rows)
            np.testing.assert_allclose(np.array(got.hessian), np.array(want), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(np.array(got.mean_abs), np.array(mx.abs(xe).mean(0)), rtol=1e-4, atol=1e-6)
        z = nn.silu(xe @ switch.gate_proj.weight[e].T) * (xe @ switch.up_proj.weight[e].T)
        want_down = z.T @ z / len(rows)
        got = stats[f"{sw}.down_proj"].expert(e).hessian
        np.testing.assert_allclose(np.array(got), np.array(want_down), rtol=1e-4, atol=1e-6)
    assert seen >= 2


def test_dense_capture_is_unchanged_without_switch():
    model, _ = build_model("deepseek")
    layer = R.layers_of(model)[1]
    stats = layer_input_hessians(layer, mx.random.normal((2, 8, 64), key=mx.random.key(0)))
    assert stats and not any(".switch_mlp." in p for p in stats)


# --------------------------------------------------------------------------- convert


@pytest.mark.parametrize("family", ["deepseek", "qwen2_moe"])
def test_moe_gptq_convert_beats_rtn(family, tmp_path, random_text):
    """The shipped moe-gptq2 recipe (local calibration, raised budget): converts, loads, the plan's
    bpw is the pack's, every expert is calibrated, and the logits are closer than with rtn."""
    import json

    from mlx_dupq import load
    from mlx_dupq.io import pack as packio
    from mlx_dupq.io.source import open_source
    from mlx_dupq.layers.moe_linear import MixedSwitchLinear
    from mlx_dupq.moe.precision import plan_for_convert
    from mlx_dupq.pipeline import build_skeleton, convert

    rec = load_recipe("moe-gptq2")
    assert rec.quantizer.method == "gptq" and rec.quantizer.damp == 0.01 and rec.quantizer.act_order
    assert (rec.quantizer.calib_data, rec.quantizer.calib_samples, rec.quantizer.calib_seq_len) == ("brown:calib", 16, 512)
    assert rec.moe.budget == 3.0
    src = make_hf_dir(tmp_path / family, family)
    rec = _recipe(random_text)
    res = convert(src, tmp_path / "gptq", rec)
    meta = packio.pack_summary(tmp_path / "gptq")
    mixed = {p: e for p, e in meta["modules"].items() if e["format"] == "moe_mixed"}
    assert mixed and all(e["calib_fallback_experts"] == [] for e in mixed.values())
    plan = plan_for_convert(rec, src, build_skeleton(open_source(src).config))
    assert plan.predicted_bpw == pytest.approx(res.bits_per_weight, rel=1e-9)
    assert res.bits_per_weight <= rec.moe.budget + 1e-6
    model, _ = load(tmp_path / "gptq")
    assert any(isinstance(m, MixedSwitchLinear) for _, m in model.named_modules())
    saved = json.loads((tmp_path / "gptq" / "config.json").read_text())["mlx_dupq"]["recipe"]
    assert saved["quantizer"]["method"] == "gptq"
    rtn = convert(src, tmp_path / "rtn", _recipe(random_text, method="rtn"))
    assert rtn.bits_per_weight == pytest.approx(res.bits_per_weight, rel=1e-12)
    e_gptq, e_rtn = _logit_err(tmp_path / "gptq", src), _logit_err(tmp_path / "rtn", src)
    assert e_gptq < e_rtn, (e_gptq, e_rtn)


def test_moe_gptq_with_rotation_and_copies(tmp_path, random_text):
    """Rotated experts get the rotated Hessian R^T H R; residual copies >= 2 stay mse. Still better than rtn."""
    from mlx_dupq.io import pack as packio
    from mlx_dupq.pipeline import convert

    src = make_hf_dir(tmp_path / "ds", "deepseek")
    kw = dict(rotation="hadamard", dup_budget=0.5, shared_copies=2, budget=4.5)
    convert(src, tmp_path / "gptq", _recipe(random_text, **kw))
    convert(src, tmp_path / "rtn", _recipe(random_text, method="rtn", **kw))
    meta = packio.pack_summary(tmp_path / "gptq")
    mixed = [e for e in meta["modules"].values() if e["format"] == "moe_mixed"]
    assert mixed and all(e["rotation"]["kind"] == "hadamard" and max(e["expert_copies"]) >= 2 for e in mixed)
    assert _logit_err(tmp_path / "gptq", src) < _logit_err(tmp_path / "rtn", src)


def test_expert_without_calibration_tokens_falls_back(tmp_path, random_text):
    """One short calibration window cannot reach every expert: those experts get mse, are listed in
    the entry, and the pack still loads and runs."""
    from mlx_dupq import load
    from mlx_dupq.io import pack as packio
    from mlx_dupq.pipeline import convert
    from tests.tiny import logits

    src = make_hf_dir(tmp_path / "ds", "deepseek")
    convert(src, tmp_path / "q", _recipe(random_text, samples=1, seq_len=2))
    meta = packio.pack_summary(tmp_path / "q")
    mixed = [e for e in meta["modules"].values() if e["format"] == "moe_mixed"]
    assert mixed and any(e["calib_fallback_experts"] for e in mixed)
    model, _ = load(tmp_path / "q")
    assert bool(mx.all(mx.isfinite(logits(model))).item())


def test_expert_quantizer_uses_each_experts_hessian_and_falls_back_to_mse():
    from mlx_dupq.input_stats import LinearStats
    from mlx_dupq.moe.feature import _expert_quantizer
    from mlx_dupq.quant.gptq import gptq_quantize
    from mlx_dupq.quant.bitpack import unpack
    from mlx_dupq.quant.scales import mse_scale_search

    w = mx.random.normal((3, 16, 64), key=mx.random.key(0)) * 0.05
    x = mx.random.normal((200, 64), key=mx.random.key(1)) * mx.linspace(0.1, 3.0, 64)
    H = x.T @ x / 200
    stats = SwitchStats({0: LinearStats(H, mx.abs(x).mean(0), 200), 2: LinearStats(2 * H, mx.abs(x).mean(0), 5)},
                        [200, 0, 5])
    q = QuantizerSpec(method="gptq")
    spec = QuantSpec(2, 32)
    fallback: list[int] = []
    arrays, entry = _expert_quantizer(stats, q, mx.float16, None, fallback)(w, spec, [0, 1, 2])
    qt = unpack(arrays, dict(entry, shape=[3, 16, 64]))
    assert fallback == [1]
    want = [gptq_quantize(w[0], H, spec, mx.float16), mse_scale_search(w[1], spec, dtype=mx.float16),
            gptq_quantize(w[2], 2 * H, spec, mx.float16)]
    for e in range(3):
        assert mx.array_equal(qt.codes[e], want[e].codes).item(), e
        assert mx.array_equal(qt.scales[e], want[e].scales).item(), e


def test_moe_accepts_every_quantizer_and_refuses_duplication_in_one_line():
    from mlx_dupq.moe.precision import check_moe_recipe

    model, _ = build_model("deepseek")
    rec = load_recipe("moe-gptq2")
    for method in ("rtn", "mse", "awq", "gptq"):
        check_moe_recipe(dataclasses.replace(rec, quantizer=QuantizerSpec(method=method)), model)
    with pytest.raises(DupqError, match="cannot combine with \\[duplication\\]") as e:
        check_moe_recipe(dataclasses.replace(rec, duplication=load_recipe("dup-residual2").duplication), model)
    assert "\n" not in str(e.value)


def test_expert_awq_uses_each_experts_activations():
    """awq: each expert's scale search is weighted by E[x^2] of the rows routed to it."""
    from mlx_dupq.input_stats import LinearStats
    from mlx_dupq.moe.feature import _expert_quantizer
    from mlx_dupq.quant.bitpack import unpack
    from mlx_dupq.quant.scales import activation_weighted_search, mse_scale_search

    w = mx.random.normal((3, 16, 64), key=mx.random.key(0)) * 0.05
    x = mx.random.normal((200, 64), key=mx.random.key(1)) * mx.linspace(0.1, 3.0, 64)
    H = x.T @ x / 200
    H2 = mx.diag(mx.linspace(3.0, 0.1, 64))  # another expert sees other channels as important
    stats = SwitchStats({0: LinearStats(H, mx.abs(x).mean(0), 200), 2: LinearStats(H2, mx.ones((64,)), 5)},
                        [200, 0, 5])
    spec = QuantSpec(2, 32)
    fallback: list[int] = []
    arrays, entry = _expert_quantizer(stats, QuantizerSpec(method="awq"), mx.float16, None, fallback)(w, spec, [0, 1, 2])
    qt = unpack(arrays, dict(entry, shape=[3, 16, 64]))
    assert fallback == [1]
    want = [activation_weighted_search(w[0], mx.diagonal(H), spec, dtype=mx.float16),
            mse_scale_search(w[1], spec, dtype=mx.float16),
            activation_weighted_search(w[2], mx.diagonal(H2), spec, dtype=mx.float16)]
    for e in range(3):
        assert mx.array_equal(qt.scales[e], want[e].scales).item(), e


def test_moe_awq_convert_beats_rtn(tmp_path, random_text):
    from mlx_dupq.pipeline import convert

    src = make_hf_dir(tmp_path / "ds", "deepseek")
    convert(src, tmp_path / "awq", _recipe(random_text, method="awq"))
    convert(src, tmp_path / "rtn", _recipe(random_text, method="rtn"))
    assert _logit_err(tmp_path / "awq", src) < _logit_err(tmp_path / "rtn", src)


def test_calibration_advances_through_the_quantized_experts(tmp_path, random_text, monkeypatch):
    """The hidden states move on through the *quantized* switch layers: the weights put into the layer
    are the pack's dequantized (E, out, in) experts."""
    from mlx_dupq import load
    from mlx_dupq.calibration import Calibration
    from mlx_dupq.layers.moe_linear import MixedSwitchLinear
    from mlx_dupq.pipeline import convert

    seen: dict[str, mx.array] = {}
    real = Calibration.advance

    def spy(self, layer, prefix, dequantized, *a, **k):
        seen.update({key: v for key, v in dequantized.items() if ".switch_mlp." in key})
        return real(self, layer, prefix, dequantized, *a, **k)

    monkeypatch.setattr(Calibration, "advance", spy)
    src = make_hf_dir(tmp_path / "ds", "deepseek")
    convert(src, tmp_path / "q", _recipe(random_text, samples=4, rotation="hadamard"))
    model, _ = load(tmp_path / "q")
    mixed = {p: m for p, m in model.named_modules() if isinstance(m, MixedSwitchLinear)}
    assert mixed and sorted(seen) == sorted(f"{p}.weight" for p in mixed)
    for p, m in mixed.items():
        assert seen[f"{p}.weight"].shape == tuple(m.entry["shape"])
        assert mx.allclose(seen[f"{p}.weight"], m.dequantized(), atol=1e-5).item(), p


@pytest.mark.parametrize("family", ["deepseek", "qwen2_moe"])
def test_moe_recipe_with_a_residual_rotation(tmp_path, random_text, family):
    """[rotation] (QuaRot residual stream, folded into router, experts and shared experts) + [moe]
    expert plan + expert GPTQ: the 8-bit pack tracks the float model, the 2-bit pack converts,
    loads and beats the same recipe without the rotation or at least stays in its range."""
    from mlx_dupq.config import RotationSpec
    from mlx_dupq.io import pack as packio
    from mlx_dupq.pipeline import convert

    src = make_hf_dir(tmp_path / "m", family)
    rot = RotationSpec(kind="randomized_hadamard", seed=0)
    hi = _recipe(random_text, low_bits=8, high_bits=8, shared_bits=8, budget=12.0)
    hi = dataclasses.replace(hi, rotation=rot, default=QuantSpec(8, 64), embed=QuantSpec(8, 64),
                             lm_head=QuantSpec(8, 64), rules=())
    convert(src, tmp_path / "r8", hi)
    convert(src, tmp_path / "n8", dataclasses.replace(hi, rotation=None))
    e_rot, e_plain = _logit_err(tmp_path / "r8", src), _logit_err(tmp_path / "n8", src)
    assert e_rot < 0.02 and e_plain < 0.02, (e_rot, e_plain)
    cfg = packio.read_config(tmp_path / "r8")["mlx_dupq"]
    assert cfg["recipe"]["rotation"]["kind"] == "randomized_hadamard"
    convert(src, tmp_path / "r2", dataclasses.replace(_recipe(random_text), rotation=rot))
    assert _logit_err(tmp_path / "r2", src) < 1.0


def test_plain_gptq_recipe_quantizes_each_expert_with_its_own_hessian(tmp_path, random_text, monkeypatch):
    """A recipe without [moe] (what ``convert --bpw`` plans) on a DeepSeek-MoE model: every routed
    expert goes through GPTQ alone, (out, in), against its own rows' Hessian, instead of the whole
    stack falling back to mse; the stored experts equal GPTQ of each expert with that Hessian."""
    from mlx_dupq.config import Recipe
    from mlx_dupq.pipeline import convert
    from mlx_dupq.quant import methods

    src = make_hf_dir(tmp_path / "deepseek", "deepseek")
    calls = []
    real = methods.gptq_quantize

    def spy(w, h, spec, dtype, **kw):
        calls.append(tuple(w.shape))
        return real(w, h, spec, dtype, **kw)

    monkeypatch.setattr(methods, "gptq_quantize", spy)
    rec = Recipe(name="g", default=QuantSpec(bits=2, group_size=32),
                 quantizer=QuantizerSpec(method="gptq", calib_data=random_text, calib_samples=16, calib_seq_len=64))
    convert(src, tmp_path / "p", rec)
    # 2 MoE layers x (8 routed experts + 1 shared expert): gate/up (32, 64) and down (64, 32) each once
    assert calls.count((32, 64)) == 2 * 9 * 2 and calls.count((64, 32)) == 2 * 9
    # and the unit: a stack with per-expert statistics = each expert quantized with its own statistics
    w = mx.random.normal((3, 8, 64), key=mx.random.key(1))
    xs = [mx.random.normal((40, 64), key=mx.random.key(2 + e)) * (1 + 3 * e) for e in range(3)]
    from mlx_dupq.input_stats import LinearStats

    st = {e: LinearStats(hessian=x.T @ x / x.shape[0], mean_abs=mx.abs(x).mean(0), tokens=x.shape[0])
          for e, x in enumerate(xs) if e != 2}
    sw = SwitchStats(experts=st, tokens=[40, 40, 0])
    q = QuantizerSpec(method="gptq")
    qt = methods.quantize_weight(w, QuantSpec(2, 32), mx.float16, q, sw)
    for e in range(3):
        one = methods.quantize_weight(w[e], QuantSpec(2, 32), mx.float16, q, st.get(e))  # e = 2: mse
        assert mx.array_equal(qt.codes[e], one.codes).item() and mx.array_equal(qt.scales[e], one.scales).item()
