"""Trainable fake quantization and block-wise reconstruction (mlx_dupq.refine)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_dupq
from mlx_dupq.config import QuantizerSpec, QuantSpec, Recipe, RotationSpec
from mlx_dupq.errors import DupqError
from mlx_dupq.io import pack as packio
from mlx_dupq.quant.bitpack import pack, unpack
from mlx_dupq.quant.qtensor import dequantize
from mlx_dupq.quant.rtn import rtn_quantize
from mlx_dupq.refine.fakequant import FakeQuantLinear, fake_quant, round_ste
from mlx_dupq.refine.spec import BlockSpec, RefineSpec
from tests.tiny import interrupt_after

SPECS = [QuantSpec(2, 32), QuantSpec(3, 32, symmetric=True), QuantSpec(4, 0), QuantSpec(2, -1),
         QuantSpec(1.58, 32, symmetric=True), QuantSpec(1, 32, symmetric=True), QuantSpec(8, 64), QuantSpec(2, 256)]


def _w(shape=(8, 256), seed=0):
    return mx.array(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
def test_round_trip_is_exact(spec):
    """Untrained FakeQuantLinear -> to_qtensor -> pack gives back the very arrays packed before."""
    qt = rtn_quantize(_w(), spec, mx.float16)
    arrays, entry = pack(qt)
    for weights in (False, True):
        m = FakeQuantLinear(unpack(arrays, entry), weights=weights)
        again, entry2 = pack(m.to_qtensor(mx.float16))
        assert entry2 == entry
        for k in arrays:
            assert mx.array_equal(again[k], arrays[k]).item(), (k, weights)
        assert mx.allclose(m.weight_hat(), dequantize(qt), atol=2e-3).item()


def test_round_ste_definition():
    x = mx.array([0.2, 0.7, -1.4, 2.5001])
    assert mx.array_equal(round_ste(x), mx.round(x)).item()
    g = mx.grad(lambda v: (round_ste(v) * mx.array([1.0, 2.0, 3.0, 4.0])).sum())(x)
    assert mx.array_equal(g, mx.array([1.0, 2.0, 3.0, 4.0])).item()


def test_latent_path_matches_its_definition():
    """w_hat = s * clip(round((w-b)/s)) + b forward; d/dw = 1 inside the grid, 0 where clipped (STE)."""
    spec = QuantSpec(2, 32)
    qt = rtn_quantize(_w((4, 64)), spec, mx.float32)
    s, b = qt.scales, qt.biases
    latent = dequantize(qt) + 0.3 * _w((4, 64), 1) * mx.repeat(s, 32, axis=-1)
    latent = latent.at[0, 0].add(100.0)  # far above the grid: clipped
    out = fake_quant(s, b, spec, latent=latent)
    sg, bg = mx.repeat(s, 32, axis=-1), mx.repeat(b, 32, axis=-1)
    q = mx.clip(mx.round((latent - bg) / sg), 0, 3)
    assert mx.allclose(out, q * sg + bg, atol=1e-6).item()
    g = mx.grad(lambda w: fake_quant(s, b, spec, latent=w).sum())(latent)
    raw = (latent - bg) / sg
    inside = (mx.round(raw) >= 0) & (mx.round(raw) <= 3)
    assert mx.array_equal(g, inside.astype(mx.float32)).item()
    assert g[0, 0].item() == 0.0


@pytest.mark.parametrize("spec", [QuantSpec(2, 32), QuantSpec(3, 32, symmetric=True), QuantSpec(2, -1)],
                         ids=lambda s: s.label())
def test_scale_bias_gradients_match_finite_differences(spec):
    """Codes fixed: the loss's gradient w.r.t. scales and biases against central differences (float64 numpy)."""
    w = _w((4, 64))
    qt = rtn_quantize(w, spec, mx.float32)
    x = _w((16, 64), 2)
    target = x @ w.T
    m = FakeQuantLinear(qt)

    def loss(params):
        m.update(params)
        return mx.mean(mx.square(m(x) - target))

    params = {k: v for k, v in m.trainable_parameters().items() if k in ("scales", "biases")}
    grads = mx.grad(loss)(params)
    eps = 1e-3
    for name, p in params.items():
        flat = np.array(p).reshape(-1)
        for i in range(min(flat.size, 6)):
            def at(delta):
                f = flat.copy()
                f[i] += delta
                return loss({**params, name: mx.array(f.reshape(p.shape))}).item()
            fd = (at(eps) - at(-eps)) / (2 * eps)
            an = np.array(grads[name]).reshape(-1)[i]
            assert abs(fd - an) <= 2e-2 * max(1.0, abs(fd)), (name, i, fd, an)
    m.update(params)


# ------------------------------------------------------------------------------- options


@pytest.mark.parametrize("bad", [{"epochs": -1}, {"steps": -3}, {"lr": 0}, {"lr_weights": -1e-5},
                                 {"trainable": ["scales", "codes"]}, {"trainable": []}, {"batch": 0},
                                 {"target": "teacher"}, {"unknown": 1}, {"min_gain": 1.0}, {"min_gain": -0.1},
                                 {"min_gain": 0.01, "holdout": 0}, {"experts": "yes"},
                                 {"check_every": 0}])
def test_bad_options_fail_in_one_line(bad):
    with pytest.raises(DupqError) as e:
        Recipe.from_dict({"name": "x", "refine": {"block": bad}})
    assert "\n" not in str(e.value) and "refine" in str(e.value)


def test_spec_round_trip():
    r = RefineSpec.from_dict({"block": {"epochs": 2, "trainable": ["weights", "scales"]}})
    assert r.block.trainable == ("scales", "weights")
    assert RefineSpec.from_dict(r.to_dict()) == r
    rec = Recipe(name="x", refine=r)
    assert Recipe.from_dict(rec.to_dict()) == rec


# ------------------------------------------------------------------------------- in convert


def _text(seed: int, words: int) -> str:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz .,"))
    return " ".join("".join(rng.choice(letters, rng.integers(1, 8))) for _ in range(words))


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(_text(0, 3000))
    return str(p)


def _recipe(calib_file, method="gptq", block=None, rotation=None, bits=2):
    refine = None if block is None else RefineSpec(block=BlockSpec(**block))
    return Recipe(name="r", default=QuantSpec(bits=bits, group_size=32), rotation=rotation, refine=refine,
                  quantizer=QuantizerSpec(method=method, calib_data=calib_file, calib_samples=8, calib_seq_len=64))


def _arrays(pack_dir):
    return dict(tree_flatten(mlx_dupq.load(pack_dir)[0].parameters()))


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_block_lowers_layer_error_never_raises_it(tiny_dirs, tmp_path, calib_file, method):
    """Each layer keeps the better of init and trained on held-out windows; the first layer improves."""
    out = tmp_path / "p"
    block = dict(epochs=8, batch=2, lr=5e-3, samples=None, trainable=["scales", "biases", "norms"], holdout=2)
    mlx_dupq.convert(tiny_dirs["llama"], out, _recipe(calib_file, method, block))
    rep = json.loads((out / "config.json").read_text())["mlx_dupq"]["refine"]["block"]
    layers = rep["layers"]
    assert len(layers) == 2 and rep["options"]["epochs"] == 8
    for r in layers.values():
        assert r["error"] == min(r["init_error"], r["trained_error"])
        assert (r["kept"] == "trained") == (r["trained_error"] < r["init_error"])
    first = layers["model.layers.0"]
    assert first["kept"] == "trained" and first["trained_error"] < 0.9 * first["init_error"], first
    assert not list(out.glob("refine-block.json"))


def test_block_keeps_init_when_training_hurts(tiny_dirs, tmp_path, calib_file):
    """A learning rate that wrecks the layer: the initialisation is kept, the pack is the plain GPTQ pack."""
    plain, bad = tmp_path / "plain", tmp_path / "bad"
    mlx_dupq.convert(tiny_dirs["llama"], plain, _recipe(calib_file))
    mlx_dupq.convert(tiny_dirs["llama"], bad, _recipe(calib_file, block=dict(epochs=4, lr=1.0, target="quantized")))
    rep = json.loads((bad / "config.json").read_text())["mlx_dupq"]["refine"]["block"]["layers"]
    assert all(r["kept"] == "init" for r in rep.values()), rep
    a, b = _arrays(plain), _arrays(bad)
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_block_min_gain_stops_after_a_weak_epoch(tiny_dirs, tmp_path, calib_file):
    """min_gain: a layer stops after the first epoch that lowers its held-out error by less than that
    fraction (0.99: every layer after epoch 1); without it every epoch runs. Same first epoch, so the
    stopped run is the first quarter of the full one."""
    block = dict(epochs=4, batch=2, lr=5e-3, samples=None, holdout=2)
    reps = {}
    for name, extra in (("all", {}), ("stop", {"min_gain": 0.99}), ("step", {"min_gain": 0.99, "check_every": 1})):
        out = tmp_path / name
        mlx_dupq.convert(tiny_dirs["llama"], out, _recipe(calib_file, block={**block, **extra}))
        reps[name] = json.loads((out / "config.json").read_text())["mlx_dupq"]["refine"]["block"]
    per_epoch = 3  # 8 calibration sequences, 2 held out, batch 2
    assert [r["steps"] for r in reps["all"]["layers"].values()] == [4 * per_epoch] * 2
    assert [r["steps"] for r in reps["stop"]["layers"].values()] == [per_epoch] * 2
    assert [r["steps"] for r in reps["step"]["layers"].values()] == [1] * 2  # check_every: checked after each step
    assert reps["stop"]["options"]["min_gain"] == 0.99
    for r in reps["stop"]["layers"].values():
        assert r["error"] == min(r["init_error"], r["trained_error"])


def test_block_with_latent_weights_and_rotation(tiny_dirs, tmp_path, calib_file):
    """Latent weights (STE) on an online-rotated model: the pack loads and the report is recorded."""
    out = tmp_path / "p"
    block = dict(epochs=3, lr=2e-3, lr_weights=1e-3, trainable=["scales", "biases", "weights"])
    rot = RotationSpec(kind="block_hadamard", online_down=True)
    mlx_dupq.convert(tiny_dirs["qwen2"], out, _recipe(calib_file, "gptq", block, rotation=rot))
    cfg = json.loads((out / "config.json").read_text())["mlx_dupq"]
    assert cfg["online_rotations"] and len(cfg["refine"]["block"]["layers"]) == 2
    model, _ = mlx_dupq.load(out)
    assert mx.isfinite(model(mx.array([[1, 2, 3, 4]]))).all().item()


def test_block_resume_mid_stage_is_identical(tiny_dirs, tmp_path, calib_file, monkeypatch):
    recipe = _recipe(calib_file, "gptq", dict(epochs=2, trainable=["scales", "biases", "weights", "norms"]))
    fresh = tmp_path / "fresh"
    mlx_dupq.convert(tiny_dirs["qwen2"], fresh, recipe)
    out = tmp_path / "pack"
    real = interrupt_after(monkeypatch, 2)  # embedding and layer 0 written, layer 1 interrupted
    with pytest.raises(KeyboardInterrupt):
        mlx_dupq.convert(tiny_dirs["qwen2"], out, recipe)
    monkeypatch.setattr(packio.PartialState, "write_group", real)
    res = mlx_dupq.convert(tiny_dirs["qwen2"], out, recipe, resume=True)
    assert res.groups_resumed == 2
    a, b = _arrays(out), _arrays(fresh)
    assert a.keys() == b.keys()
    for k in a:
        assert mx.array_equal(a[k], b[k]).item(), k
    ca = json.loads((out / "config.json").read_text())["mlx_dupq"]["refine"]
    cb = json.loads((fresh / "config.json").read_text())["mlx_dupq"]["refine"]
    assert ca["block"]["layers"].keys() == cb["block"]["layers"].keys()


def test_block_refuses_moe_in_one_line(tiny_dirs, tmp_path, calib_file):
    from mlx_dupq.moe.spec import MoESpec

    rec = Recipe(name="m", default=QuantSpec(bits=2, group_size=32), moe=MoESpec(),
                 refine=RefineSpec(block=BlockSpec(epochs=1)),
                 quantizer=QuantizerSpec(method="gptq", calib_data=calib_file, calib_samples=4, calib_seq_len=32))
    with pytest.raises(DupqError) as e:
        mlx_dupq.convert(tiny_dirs["deepseek"], tmp_path / "p", rec)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "p").exists()


def test_block_asking_for_more_calibration_fails_in_one_line(tiny_dirs, tmp_path, calib_file):
    with pytest.raises(DupqError) as e:
        mlx_dupq.convert(tiny_dirs["llama"], tmp_path / "p", _recipe(calib_file, block=dict(samples=7, holdout=2)))
    assert "calib_samples" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.partial").exists()



def test_block_on_moe_experts_trained_or_held(tiny_dirs, tmp_path, calib_file):
    """A plain (no [moe]) GPTQ recipe with a block stage on a DeepSeek-MoE model, experts trained (the
    default) or held: every layer is reported, the option is recorded, the packs load."""
    block = dict(epochs=2, batch=2, lr=1e-3, trainable=["scales", "biases", "norms"], holdout=2)
    for name, experts in (("held", False), ("trained", True)):
        out = tmp_path / name
        mlx_dupq.convert(tiny_dirs["deepseek"], out, _recipe(calib_file, "gptq", {**block, "experts": experts}))
        cfg = json.loads((out / "config.json").read_text())["mlx_dupq"]
        rep = cfg["refine"]["block"]
        assert rep["options"]["experts"] is experts
        assert sorted(rep["layers"]) == [f"model.layers.{i}" for i in range(3)]
        for r in rep["layers"].values():
            assert r["error"] == min(r["init_error"], r["trained_error"])
        assert cfg["modules"]["model.layers.1.mlp.switch_mlp.up_proj"]["kind"] == "switch_linear"
        model, _ = mlx_dupq.load(out)
        assert mx.isfinite(model(mx.array([[1, 2, 3, 4]]))).all().item()


@pytest.mark.parametrize("bits", [2, 1.58])
def test_block_trains_switch_layers(tiny_dirs, bits):
    """refine_layer on a MoE layer whose experts (and attention) are packed: with experts trained the
    experts' scales and biases move and the layer gets closer to its targets than with the experts held
    (same data, same steps); held, the experts' arrays come back unchanged. mlx's 2-bit format and
    our ternary one."""
    from mlx_dupq.io.loader import load_model
    from mlx_dupq.layers.quant_linear import quantize_tensor
    from mlx_dupq.quant.bitpack import unpack
    from mlx_dupq.quant.qtensor import dequantize
    from mlx_dupq.refine.block import refine_layer

    model, _, _ = load_model(tiny_dirs["deepseek"])
    layer, prefix = model.model.layers[1], "model.layers.1"
    x = mx.random.normal((4, 16, 64), key=mx.random.key(0))
    y = layer(x, mask="causal")
    spec_q = QuantSpec(bits=bits, group_size=32, symmetric=bits == 1.58)
    arrays, entries, fixed = {}, {}, {}
    for path, m in layer.named_modules():
        if type(m).__name__ in ("Linear", "SwitchLinear") and "gate" != path.split(".")[-1]:
            full = f"{prefix}.{path}"
            a, e = quantize_tensor(m.weight, spec_q, dtype=mx.float16)
            entries[full] = dict(e, kind="switch_linear" if m.weight.ndim == 3 else "linear")
            arrays.update({f"{full}.{k}": v for k, v in a.items()})
            if m.weight.ndim == 3:
                fixed[f"{full}.weight"] = dequantize(unpack(a, entries[full]))
    sw = f"{prefix}.mlp.switch_mlp.up_proj"
    assert sw in entries
    reps, outs = {}, {}
    for experts in (False, True):
        spec = BlockSpec(epochs=30, batch=4, lr=5e-3, holdout=0, samples=None, seq_len=None, experts=experts)
        outs[experts], _, reps[experts] = refine_layer(layer, prefix, arrays, entries, x, y, spec, mx.float16,
                                                        fixed=fixed)
    for k in ("scales", "biases") if bits == 2 else ("scales",):
        assert mx.array_equal(outs[False][f"{sw}.{k}"], arrays[f"{sw}.{k}"]).item()
        assert not mx.array_equal(outs[True][f"{sw}.{k}"], arrays[f"{sw}.{k}"]).item()
    assert reps[True].init_error == pytest.approx(reps[False].init_error, rel=1e-5)
    assert reps[True].kept == reps[False].kept == "trained"
    assert reps[True].error < 0.95 * reps[False].error, (reps[False], reps[True])


def test_block_holds_switch_layers_at_their_quantized_weights(tiny_dirs, calib_file):
    """refine_layer runs a MoE layer with the given quantized expert weights (not the float ones),
    returns them unchanged, puts the float ones back, and refuses a switch layer it was not given."""
    from mlx_dupq.io.loader import load_model
    from mlx_dupq.refine.block import refine_layer

    model, _, _ = load_model(tiny_dirs["deepseek"])
    layer, prefix = model.model.layers[1], "model.layers.1"
    sw = layer.mlp.switch_mlp.up_proj
    w_float = sw.weight
    key = f"{prefix}.mlp.switch_mlp.up_proj.weight"
    entries = {f"{prefix}.mlp.switch_mlp.up_proj": {"kind": "switch_linear", "format": "mlx"}}
    x = mx.random.normal((4, 8, 64), key=mx.random.key(0))
    y = layer(x, mask="causal")
    spec = BlockSpec(epochs=0, experts=False)
    with pytest.raises(DupqError) as e:
        refine_layer(layer, prefix, {}, entries, x, y, spec, mx.float16)
    assert "\n" not in str(e.value)
    zero = mx.zeros_like(w_float)
    _, deq, rep = refine_layer(layer, prefix, {}, entries, x, y, spec, mx.float16, fixed={key: zero})
    assert rep.init_error > 1e-6  # the layer ran with the held (zero) experts, not its float ones
    assert mx.array_equal(deq[key], zero).item()
    assert mx.array_equal(layer.mlp.switch_mlp.up_proj.weight, w_float).item()
    _, _, same = refine_layer(layer, prefix, {}, entries, x, y, spec, mx.float16, fixed={key: w_float})
    assert same.init_error < 1e-10
