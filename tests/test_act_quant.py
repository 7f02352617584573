"""Simulated activation quantization (SPEC F3): functions vs numpy references, wrappers, packs."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import mlx_dupq
from mlx_dupq.config import ActSpec, QuantizerSpec, QuantSpec, Recipe, RotationSpec, load_recipe
from mlx_dupq.errors import DupqError
from mlx_dupq.layers.act_quant import (
    ActQuantInput,
    act_quant_modules,
    apply_act_quant,
    calibrate_static_ranges,
    massive_share,
    remove_act_quant,
)
from mlx_dupq.layers.online_rotation import RotatedInput
from mlx_dupq.quant import act

TOKENS = mx.array([[1, 5, 9, 20, 33, 47, 60, 71, 2, 8, 15, 40, 3, 11, 29, 50]])


def np_per_token(x: np.ndarray, bits: int) -> np.ndarray:
    q = 2 ** (bits - 1) - 1
    s = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / q, 1e-12)
    return np.clip(np.round(x / s), -q, q) * s


def rel_err(a, b) -> float:
    return (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item()


def logits(model, tokens=TOKENS):
    out = model(tokens)
    mx.eval(out)
    return out


# ------------------------------------------------------------------------------ functions


@pytest.mark.parametrize("bits", [4, 6, 8, 10])
def test_per_token_matches_numpy_and_error_bound(bits):
    x = np.random.default_rng(0).standard_normal((3, 7, 64)).astype(np.float32) * np.array([0.1, 1, 30])[:, None, None]
    y = np.array(act.per_token_fake_quant(mx.array(x), bits))
    ref = np_per_token(x, bits)
    np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
    half_step = np.abs(x).max(axis=-1, keepdims=True) / (2 ** (bits - 1) - 1) / 2
    assert np.all(np.abs(y - x) <= half_step * (1 + 1e-5))


def test_16_bits_is_exact_passthrough():
    x = mx.random.normal((4, 33)) * 100
    for spec in (ActSpec(), ActSpec(bits=16, keep_massive=True)):
        y, kept = act.fake_quant(x, spec)
        assert y is x and kept.item() == 0.0
    assert act.per_token_fake_quant(x, 16) is x


def test_static_matches_numpy():
    x = np.random.default_rng(1).standard_normal((5, 32)).astype(np.float32) * 3
    clip = 2.0
    y = np.array(act.static_fake_quant(mx.array(x), 8, clip))
    s = clip / 127
    np.testing.assert_allclose(y, np.clip(np.round(x / s), -127, 127) * s, atol=1e-5)
    assert np.abs(y).max() <= clip + 1e-6
    with pytest.raises(DupqError, match="calibrated range"):
        act.fake_quant(mx.array(x), ActSpec(bits=8, mode="static"))


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_matches_numpy(p):
    x = np.random.default_rng(2).standard_t(3, (6, 2000)).astype(np.float32)
    np.testing.assert_allclose(act.percentile_abs(mx.array(x), p).item(), np.percentile(np.abs(x), p), rtol=1e-5)
    rows = np.array(act.percentile_abs(mx.array(x), p, axis=-1))
    np.testing.assert_allclose(rows, np.percentile(np.abs(x), p, axis=-1, keepdims=True), rtol=1e-5)
    spec = ActSpec(bits=8, mode="static", clip="percentile", percentile=p, clip_ratio=0.9)
    np.testing.assert_allclose(act.static_range(x, spec), 0.9 * np.percentile(np.abs(x), p), rtol=1e-5)
    # dynamic percentile clipping: the per-row range is that row's percentile
    y = np.array(act.fake_quant(mx.array(x), ActSpec(bits=8, clip="percentile", percentile=p))[0])
    np.testing.assert_allclose(np.abs(y).max(axis=-1, keepdims=True), rows, rtol=1e-4)


def np_kl_reference(a: np.ndarray, bits: int, num_bins: int) -> float:
    """Plain-loop TensorRT entropy calibration."""
    a = np.abs(a).reshape(-1)
    hist, edges = np.histogram(a, bins=num_bins, range=(0.0, a.max()))
    n_q = 2 ** (bits - 1)
    best = (np.inf, num_bins)
    for i in range(n_q, num_bins + 1):
        p = hist[:i].astype(float)
        p[-1] += hist[i:].sum()
        q = np.zeros(i)
        for c in range(n_q):
            idx = [j for j in range(i) if (j * n_q) // i == c]
            nz = [j for j in idx if p[j] > 0]
            for j in nz:
                q[j] = p[idx].sum() / len(nz)
        m = p > 0
        pn, qn = p[m] / p.sum(), q[m] / q.sum()
        kl = np.sum(pn * np.log(pn / qn))
        if kl < best[0]:
            best = (kl, i)
    return float(edges[best[1]])


def test_kl_clip_below_max_on_heavy_tail_and_matches_reference():
    x = np.random.default_rng(3).standard_t(2, 20000).astype(np.float32)
    t = act.kl_clip(mx.array(x), bits=8)
    assert np.percentile(np.abs(x), 90) < t < 0.5 * np.abs(x).max()
    assert act.kl_clip(x, bits=4, num_bins=128) == pytest.approx(np_kl_reference(x, 4, 128), rel=1e-6)
    assert act.static_range(x, ActSpec(bits=8, mode="static", clip="kl", clip_ratio=0.5)) == pytest.approx(0.5 * t)


def test_massive_detection_keeps_planted_outlier():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 512)).astype(np.float32)
    x[0, 17] = 400.0
    for rule in ("sigma3", "mean100"):
        mask = np.array(act.massive_mask(mx.array(x), rule))
        assert mask[0, 17]
        if rule == "mean100":
            assert mask.sum() == 1
        else:  # sigma3 also flags the Gaussian tail of row 1 (~0.3% of entries), nothing of the bulk
            assert mask.sum() < 10
    spec = ActSpec(bits=8, keep_massive=True, massive_rule="mean100")
    y, kept = act.fake_quant(mx.array(x), spec)
    y = np.array(y)
    assert y[0, 17] == 400.0 and kept.item() == pytest.approx(1 / 1024)
    body = x.copy()
    body[0, 17] = 0.0
    ref = np_per_token(body, 8)
    ref[0, 17] = 400.0
    np.testing.assert_allclose(y, ref, atol=1e-5)
    # keeping the outlier in float makes the rest of its row far more accurate
    plain = np.array(act.fake_quant(mx.array(x), ActSpec(bits=8))[0])
    assert np.abs(y - x)[0].max() < 0.2 * np.abs(plain - x)[0].max()


def test_actspec_round_trip_and_errors(tmp_path):
    s = ActSpec(bits=6, mode="static", clip="kl", percentile=99.99, clip_ratio=0.8, keep_massive=True,
                massive_rule="mean100")
    assert ActSpec.from_dict(s.to_dict()) == s
    r = Recipe(name="x", activations=s)
    assert Recipe.from_dict(r.to_dict()) == r
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))).activations == s
    assert "activations" not in Recipe().to_dict() and Recipe.from_dict(Recipe().to_dict()).activations is None
    assert load_recipe("rtn4").activations is None
    w = load_recipe("w4a8-rtn")
    assert w.activations == ActSpec(bits=8) and w.default == QuantSpec(bits=4, group_size=64)
    p = tmp_path / "r.toml"
    p.write_text('[default]\nbits = 2\n[activations]\nbits = 4\nclip = "percentile"\npercentile = 99.0\n')
    assert load_recipe(p).activations == ActSpec(bits=4, clip="percentile", percentile=99.0)
    for bad, msg in [
        (dict(bits=7), "activation bits"),
        (dict(mode="x"), "activation mode"),
        (dict(clip="kl"), "static"),
        (dict(percentile=98), "percentile"),
        (dict(clip_ratio=0), "clip_ratio"),
        (dict(massive_rule="max9"), "massive_rule"),
    ]:
        with pytest.raises(DupqError, match=msg):
            ActSpec(**bad)
    with pytest.raises(DupqError, match="unknown activation option"):
        ActSpec.from_dict({"bitz": 8})


# ------------------------------------------------------------------------------ wrappers


def test_a16_wrapper_is_exact_and_skips_lm_head(tiny_dirs):
    model, _ = mlx_dupq.load(tiny_dirs["llama"])
    ref = logits(model)
    paths = apply_act_quant(model, ActSpec())
    assert paths and not any("lm_head" in p for p in paths)
    assert len(paths) == 2 * 7  # q k v o gate up down per layer
    assert isinstance(model.model.layers[0].mlp.down_proj, ActQuantInput)
    assert mx.array_equal(logits(model), ref)
    with pytest.raises(DupqError, match="already has"):
        apply_act_quant(model, ActSpec())
    assert sorted(remove_act_quant(model)) == sorted(paths)
    assert not act_quant_modules(model)


def test_wrapper_goes_inside_online_rotation(tiny_dirs, tmp_path):
    out = tmp_path / "rot"
    rec = Recipe(name="rot", default=QuantSpec(bits=8, group_size=32), rotation=RotationSpec(online_down=True))
    mlx_dupq.convert(tiny_dirs["qwen2"], out, recipe=rec)
    model, _ = mlx_dupq.load(out)
    ref = logits(model)
    apply_act_quant(model, ActSpec(bits=8))
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, RotatedInput) and isinstance(down.linear, ActQuantInput)
    assert "model.layers.0.mlp.down_proj" in act_quant_modules(model)
    y = logits(model)
    assert 0 < rel_err(y, ref) < 0.05


def test_massive_share_tracking(tiny_dirs):
    model, _ = mlx_dupq.load(tiny_dirs["qwen2"])
    apply_act_quant(model, ActSpec(bits=8, keep_massive=True))
    for q in act_quant_modules(model).values():
        q.track = True
    logits(model)
    share = massive_share(model)
    assert share and all(0.0 <= v < 0.05 for v in share.values())


def test_static_calibration_on_tiny_model(tiny_dirs):
    model, _ = mlx_dupq.load(tiny_dirs["qwen2"])
    ref = logits(model)
    calib = mx.array(np.random.default_rng(5).integers(0, 96, (4, 32)))
    spec = ActSpec(bits=8, mode="static", clip="percentile", percentile=99.99)
    ranges = calibrate_static_ranges(model, calib, spec)
    assert len(ranges) == 2 * 7 and all(v > 0 for v in ranges.values())
    assert not act_quant_modules(model) and mx.array_equal(logits(model), ref)  # left as it was
    with pytest.raises(DupqError, match="no static activation range"):
        apply_act_quant(model, spec, {})
    apply_act_quant(model, spec, ranges)
    assert 0 < rel_err(logits(model), ref) < 0.1  # one range per tensor: coarser than per token
    kl = calibrate_static_ranges(model, calib, ActSpec(bits=8, mode="static", clip="kl"))
    mx_ = calibrate_static_ranges(model, calib, ActSpec(bits=8, mode="static"))
    assert all(kl[p] <= mx_[p] + 1e-6 for p in kl)


# ------------------------------------------------------------------------------ packs


@pytest.fixture(scope="module")
def packs(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("actpacks")
    w4a8 = load_recipe("w4a8-rtn")
    out = {}
    for name, rec in [("w4a16", Recipe.from_dict({**w4a8.to_dict(), "activations": None})), ("w4a8", w4a8)]:
        out[name] = root / name
        mlx_dupq.convert(tiny_dirs["qwen2"], out[name], recipe=rec)
    return out


def test_w4a8_pack_close_to_w4a16_and_a4_worse(packs):
    cfg = json.loads((packs["w4a8"] / "config.json").read_text())
    assert cfg["mlx_dupq"]["recipe"]["activations"]["bits"] == 8
    m16, _ = mlx_dupq.load(packs["w4a16"])
    m8, _ = mlx_dupq.load(packs["w4a8"])
    assert act_quant_modules(m8) and not act_quant_modules(m16)
    ref, y8 = logits(m16), logits(m8)
    e8 = rel_err(y8, ref)
    assert 0 < e8 < 0.05
    apply_act_quant(m16, ActSpec(bits=4))
    e4 = rel_err(logits(m16), ref)
    assert e4 > e8
    from mlx_dupq.io.pack import load_pack

    plain, _ = load_pack(packs["w4a8"], activations=False)
    assert mx.allclose(logits(plain), ref, atol=1e-4)  # same weights (load adds CPU dense prefill)


def test_static_pack_calibrated_at_convert(tiny_dirs, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 200))
    rec = Recipe(name="w4a8s", default=QuantSpec(bits=4, group_size=64),
                 quantizer=QuantizerSpec(calib_data=str(text), calib_samples=4, calib_seq_len=32),
                 activations=ActSpec(bits=8, mode="static", clip="percentile", percentile=99.9))
    out = tmp_path / "static"
    mlx_dupq.convert(tiny_dirs["qwen2"], out, recipe=rec)
    cfg = json.loads((out / "config.json").read_text())
    assert len(cfg["mlx_dupq"]["act_ranges"]) == 2 * 7
    model, _ = mlx_dupq.load(out)
    qs = act_quant_modules(model)
    assert qs and all(q.static_range == cfg["mlx_dupq"]["act_ranges"][p] for p, q in qs.items())
    from mlx_dupq.io.pack import load_pack

    ref = logits(load_pack(out, activations=False)[0])
    assert 0 < rel_err(logits(model), ref) < 0.1
