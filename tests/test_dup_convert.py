"""Parallel and residual copies inside ``mlx_dupq.convert`` and ``mlx_dupq.load`` (tiny models)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import mlx_dupq
from mlx_dupq.config import QuantizerSpec, QuantSpec, Recipe, load_recipe
from mlx_dupq.dup.specs import CopySpec, DupPlan
from mlx_dupq.errors import DupqError
from mlx_dupq.io import pack as packio
from mlx_dupq.layers.dup_linear import DupLinear
from tests.tiny import interrupt_after, logits, rel_err



def _recipe(dup: DupPlan | dict | None = None, **kw) -> Recipe:
    return Recipe(name="dup-test", default=QuantSpec(bits=2, group_size=32), duplication=dup, **kw)


def _meta(pack):
    return json.loads((pack / "config.json").read_text())["mlx_dupq"]


def test_residual_two_copies_beat_one_and_cost_one_copy(tiny_dirs, tmp_path):
    src = tiny_dirs["qwen2"]
    base = mlx_dupq.convert(src, tmp_path / "one", _recipe())
    dup = mlx_dupq.convert(src, tmp_path / "two", _recipe(DupPlan(mode="residual", copies={0: 2, 1: 2})))
    ref, _ = mlx_dupq.load(src)
    one, _ = mlx_dupq.load(tmp_path / "one")
    two, _ = mlx_dupq.load(tmp_path / "two")
    assert isinstance(two.model.layers[1].mlp.down_proj, DupLinear)
    e1, e2 = rel_err(logits(one), logits(ref)), rel_err(logits(two), logits(ref))
    assert e2 < 0.7 * e1, (e1, e2)
    # the extra bytes are exactly the second copies' tensors, and they are in the all-in bpw
    extra = sum(a.nbytes for f in (tmp_path / "two").glob("model*.safetensors")
                for k, a in mx.load(str(f)).items() if ".copies.1." in k)
    assert dup.stored_bytes - base.stored_bytes == extra > 0
    assert dup.bits_per_weight - base.bits_per_weight == pytest.approx(8 * extra / dup.n_params)
    meta = _meta(tmp_path / "two")
    e = meta["modules"]["model.layers.0.self_attn.q_proj"]
    assert e["format"] == "dup" and e["mode"] == "residual" and len(e["copies"]) == 2 and not e["mix"]
    assert meta["duplication"]["copies"].keys() == {"0", "1"}


def test_parallel_mean_of_identical_copies_equals_one_copy(tiny_dirs, tmp_path):
    src = tiny_dirs["llama"]
    mlx_dupq.convert(src, tmp_path / "one", _recipe())
    mlx_dupq.convert(src, tmp_path / "three", _recipe(DupPlan(mode="parallel", copies={0: 3, 1: 3})))
    one, _ = mlx_dupq.load(tmp_path / "one")
    three, _ = mlx_dupq.load(tmp_path / "three")
    assert len(three.model.layers[0].self_attn.o_proj.copies) == 3
    assert rel_err(logits(three), logits(one)) < 1e-5


def test_shared_codes_copies_store_codes_once(tiny_dirs, tmp_path):
    src = tiny_dirs["qwen2"]
    copies = [CopySpec(), CopySpec(scale_mult=1.05, shared_codes=True)]
    mlx_dupq.convert(src, tmp_path / "p", _recipe(DupPlan(mode="parallel", copies={1: copies})))
    keys = {k for f in (tmp_path / "p").glob("model*.safetensors") for k in mx.load(str(f))}
    assert "model.layers.1.mlp.up_proj.copies.0.weight" in keys
    assert "model.layers.1.mlp.up_proj.copies.1.weight" not in keys
    assert "model.layers.1.mlp.up_proj.copies.1.scales" in keys
    m, _ = mlx_dupq.load(tmp_path / "p")
    cs = m.model.layers[1].mlp.up_proj.copies
    assert cs[0].weight is cs[1].weight or mx.array_equal(cs[0].weight, cs[1].weight).item()
    ref, _ = mlx_dupq.load(src)
    assert rel_err(logits(m), logits(ref)) < 1.0


def test_recipe_round_trip_through_config_json(tiny_dirs, tmp_path):
    rec = load_recipe("dup-residual2")
    assert rec.duplication.mode == "residual" and rec.duplication.last_fraction == 0.25
    assert Recipe.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec
    explicit = _recipe(DupPlan(mode="parallel", copies={"1": [{}, {"grid_offset": 0.25}]}))
    assert Recipe.from_dict(json.loads(json.dumps(explicit.to_dict()))) == explicit
    out = tmp_path / "p"
    mlx_dupq.convert(tiny_dirs["deepseek"], out, rec.with_overrides(group_size=32))  # 3 layers: last 1
    meta = _meta(out)
    assert Recipe.from_dict(meta["recipe"]) == rec.with_overrides(group_size=32)
    assert DupPlan.from_dict(meta["duplication"]).copies.keys() == {2}
    assert [p for p, e in meta["modules"].items() if e["format"] == "dup"] == sorted(
        p for p in meta["modules"] if p.startswith("model.layers.2.") and "switch_mlp" not in p and "gate." not in p + "."
    )
    m, tok = mlx_dupq.load(out)
    assert np.isfinite(np.array(logits(m))).all()
    from mlx_dupq.generate import stream_model

    text = "".join(getattr(r, "text", str(r)) for r in stream_model(m, tok, "hello", max_tokens=4, chat=False))
    assert isinstance(text, str)


def test_mlx_lm_refuses_a_duplicated_pack(tiny_dirs, tmp_path):
    import mlx_lm

    out = tmp_path / "p"
    mlx_dupq.convert(tiny_dirs["qwen2"], out, _recipe(DupPlan(mode="residual", copies={1: 2})))
    with pytest.raises(ValueError):
        mlx_lm.load(str(out))


def test_resume_with_duplication(tiny_dirs, tmp_path, monkeypatch):
    rec = _recipe(DupPlan(mode="residual", copies={0: 2, 1: 3}))
    out = tmp_path / "pack"
    real = interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        mlx_dupq.convert(tiny_dirs["qwen2"], out, rec)
    with pytest.raises(DupqError, match="another model or recipe"):
        mlx_dupq.convert(tiny_dirs["qwen2"], out, _recipe(DupPlan(mode="residual", copies={0: 2})), resume=True)
    monkeypatch.setattr(packio.PartialState, "write_group", real)
    res = mlx_dupq.convert(tiny_dirs["qwen2"], out, rec, resume=True)
    assert res.groups_resumed == 2
    mlx_dupq.convert(tiny_dirs["qwen2"], tmp_path / "fresh", rec)
    a, _ = mlx_dupq.load(out)
    b, _ = mlx_dupq.load(tmp_path / "fresh")
    assert mx.array_equal(logits(a), logits(b)).item()


def test_rejected_plans(tiny_dirs, tmp_path):
    with pytest.raises(DupqError, match="not calibrated"):
        mlx_dupq.convert(tiny_dirs["qwen2"], tmp_path / "a",
                         _recipe(DupPlan(mode="parallel", aggregation="variance_weighted", copies={0: 2})))
    with pytest.raises(DupqError, match="decoder layers"):
        mlx_dupq.convert(tiny_dirs["qwen2"], tmp_path / "b", _recipe(DupPlan(mode="residual", copies={5: 2})))
    with pytest.raises(DupqError, match="last_n"):
        mlx_dupq.convert(tiny_dirs["qwen2"], tmp_path / "c", _recipe(DupPlan(mode="residual", last_n=3)))


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz .,"))
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(" ".join("".join(rng.choice(letters, rng.integers(1, 8))) for _ in range(3000)))
    return str(p)


def test_calibrated_parallel_fits_mix_and_advances(tiny_dirs, tmp_path, calib_text):
    q = QuantizerSpec(method="gptq", calib_data=calib_text, calib_samples=16, calib_seq_len=64)
    plan = DupPlan(mode="parallel", aggregation="variance_weighted",
                   copies={0: [CopySpec(), CopySpec(scale_mult=1.05), CopySpec(grid_offset=0.0, scale_mult=0.95)]})
    out = tmp_path / "p"
    mlx_dupq.convert(tiny_dirs["qwen2"], out, _recipe(plan, quantizer=q))
    meta = _meta(out)
    fitted = [p for p, e in meta["modules"].items() if e["format"] == "dup" and e["mix"]]
    assert fitted and all(meta["modules"][p]["aggregation"] == "variance_weighted" for p in fitted)
    m, _ = mlx_dupq.load(out)
    assert m.model.layers[0].self_attn.q_proj["mix"].shape[0] == 3 or "mix" not in m.model.layers[0].self_attn.q_proj
    ref, _ = mlx_dupq.load(tiny_dirs["qwen2"])
    assert rel_err(logits(m), logits(ref)) < 1.0


def test_inspect_shows_each_copy(tiny_dirs, tmp_path):
    """``inspect`` dequantizes every stored copy of a duplicated linear (not raw codes)."""
    from mlx_dupq.inspect_model import inspect_model

    out = tmp_path / "dup"
    mlx_dupq.convert(tiny_dirs["qwen2"], out, "dup-residual2", force=True)
    rep = inspect_model(str(out))
    copies = [t for t in rep["tensors"] if ".copies." in t["name"]]
    assert copies and all(t["quant"].startswith("copy ") for t in copies)
    assert all(t["std"] > 0 for t in copies)


def test_serial_pack_generates_with_kv_cache_like_a_full_forward(tiny_dirs, tmp_path):
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_dupq.dup.runtime import layout

    src = tiny_dirs["qwen2"]
    plan = DupPlan(mode="serial", copies={0: [CopySpec(), CopySpec(scale_mult=1.05)], 1: 3})
    res = mlx_dupq.convert(src, tmp_path / "serial", _recipe(plan))
    one = mlx_dupq.convert(src, tmp_path / "one", _recipe())
    model, _ = mlx_dupq.load(tmp_path / "serial")
    assert layout(model) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert len(make_prompt_cache(model)) == 5
    meta = _meta(tmp_path / "serial")
    assert meta["duplication"]["mode"] == "serial"
    assert meta["modules"]["model.layers.1.mlp.down_proj"]["format"] == "dup"  # copy 2 of layer 0 (x1.05)
    assert meta["modules"]["model.layers.4.mlp.down_proj"]["format"] == "mlx"  # copy 3 of layer 1 (plain)
    # each copy's bytes count: 3 extra copies of a 2-layer model, embedding/lm_head once
    layer_bytes = sum(a.nbytes for f in (tmp_path / "one").glob("model*.safetensors")
                      for k, a in mx.load(str(f)).items() if ".layers.1." in k)
    assert res.stored_bytes - one.stored_bytes == pytest.approx(3 * layer_bytes, rel=0.02)
    prompt = [1, 5, 9, 13, 2]
    toks, gen = list(prompt), []
    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=5, sampler=lambda lp: mx.argmax(lp, axis=-1)):
        gen.append(int(tok))
    for t in gen:
        assert int(mx.argmax(model(mx.array([toks]))[0, -1]).item()) == t
        toks.append(t)
    cache = make_prompt_cache(model)
    seq = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    a = model(seq[:, :5], cache=cache)
    b = model(seq[:, 5:], cache=cache)
    assert mx.allclose(mx.concatenate([a, b], axis=1), model(seq), atol=1e-4)
    # serial copies change the function: not the single-copy model
    single, _ = mlx_dupq.load(tmp_path / "one")
    assert rel_err(logits(model), logits(single)) > 1e-3
    import mlx_lm

    with pytest.raises(Exception):  # the extra layers' weights do not fit the config: refused, not wrong
        mlx_lm.load(str(tmp_path / "serial"))


def test_serial_pack_runs_in_the_cli(tiny_dirs, tmp_path):
    from typer.testing import CliRunner

    from mlx_dupq.cli import app

    rec = tmp_path / "serial.toml"
    rec.write_text('name = "s"\n[default]\nbits = 2\ngroup_size = 32\n[duplication]\nmode = "serial"\n'
                   'last_n = 1\nn_copies = 2\n')
    runner = CliRunner()
    r = runner.invoke(app, ["convert", str(tiny_dirs["llama"]), "-o", str(tmp_path / "p"), "--recipe", str(rec)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["generate", str(tmp_path / "p"), "--prompt", "hello", "--max-tokens", "4"])
    assert r.exit_code == 0, r.output
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    r = runner.invoke(app, ["eval", "ppl", str(tmp_path / "p"), "--data", str(tmp_path / "t.txt"),
                            "--ctx", "32", "--windows", "2"])
    assert r.exit_code == 0, r.output


def test_serial_gptq_calibrates_each_copy_at_its_input(tiny_dirs, tmp_path, calib_text):
    q = QuantizerSpec(method="gptq", calib_data=str(calib_text), calib_samples=4, calib_seq_len=32)
    plan = DupPlan(mode="serial", copies={1: 2})
    mlx_dupq.convert(tiny_dirs["qwen2"], tmp_path / "g", _recipe(plan, quantizer=q))
    model, _ = mlx_dupq.load(tmp_path / "g")
    assert len(model.model.layers) == 3
    w1 = model.model.layers[1].mlp.down_proj.weight
    w2 = model.model.layers[2].mlp.down_proj.weight
    assert not mx.array_equal(w1, w2).item()  # copy 2 saw another input, so GPTQ chose other codes


def test_gptq_copies_lower_the_output_error():
    """Copy 1 GPTQ'd against H, residual copy 2 against what it left, a rotated copy against R^T H R."""
    from mlx_dupq.dup.feature import aggregate_weight
    from mlx_dupq.dup.copies import copy_rotation, effective_weight, make_copies

    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((512, 64)) @ rng.standard_normal((64, 64)) * 0.3, dtype=mx.float32)
    H = x.T @ x / 512
    w = mx.array(rng.standard_normal((48, 64)), dtype=mx.float32)
    q = QuantizerSpec(method="gptq", calib_data="brown:calib")

    def out_err(ws, mode):
        d = aggregate_weight(ws, mode, None) - w
        return float(mx.sum((d @ H) * d).item())

    # copy 1 RTN then residual copy 2 GPTQ beats both all-RTN and all-GPTQ residual copies
    rtn1 = make_copies(w, QuantSpec(bits=2, group_size=32), [CopySpec()], mx.float32)[0]
    from mlx_dupq.quant.gptq import gptq_quantize
    from mlx_dupq.quant.qtensor import dequantize

    g1 = dequantize(gptq_quantize(w, H, QuantSpec(bits=2, group_size=32), mx.float32))
    res = w - g1
    both_gptq = g1 + dequantize(gptq_quantize(res, H, QuantSpec(bits=2, group_size=32), mx.float32))
    ours = make_copies(w, QuantSpec(bits=2, group_size=32), [CopySpec(), CopySpec()], mx.float32, residual=True,
                       hessian=H, gptq=q)
    assert mx.array_equal(ours[0].codes, rtn1.codes).item()
    assert out_err([effective_weight(t, None) for t in ours], "residual") < out_err([both_gptq], "parallel")
    for mode, specs in (("residual", [CopySpec(), CopySpec()]),
                        ("parallel", [CopySpec(rotation={"kind": "perturbed", "seed": 0, "eps": 0.0}),
                                      CopySpec(rotation={"kind": "perturbed", "seed": 0, "eps": 0.05})])):
        errs = []
        for kw in ({}, {"hessian": H, "gptq": q}):
            qts = make_copies(w, QuantSpec(bits=2, group_size=32), specs, mx.float32, residual=mode == "residual", **kw)
            errs.append(out_err([effective_weight(t, copy_rotation(c, 64)) for t, c in zip(qts, specs)], mode))
        assert errs[1] < 0.8 * errs[0], (mode, errs)
    # variant grids (scale multiplier) stay RTN: identical with or without the Hessian
    v = [CopySpec(), CopySpec(scale_mult=1.05)]
    a = make_copies(w, QuantSpec(bits=2, group_size=32), v, mx.float32)[1]
    b = make_copies(w, QuantSpec(bits=2, group_size=32), v, mx.float32, hessian=H, gptq=q)[1]
    assert mx.array_equal(a.codes, b.codes).item()


def test_gptq_recipe_gptqs_the_copies(tiny_dirs, tmp_path, calib_text):
    q = QuantizerSpec(method="gptq", calib_data=str(calib_text), calib_samples=4, calib_seq_len=32)
    plan = DupPlan(mode="residual", copies={0: 2})
    mlx_dupq.convert(tiny_dirs["qwen2"], tmp_path / "g", _recipe(plan, quantizer=q))
    mlx_dupq.convert(tiny_dirs["qwen2"], tmp_path / "r", _recipe(plan))
    g, _ = mlx_dupq.load(tmp_path / "g")
    r, _ = mlx_dupq.load(tmp_path / "r")
    a = g.model.layers[0].mlp.down_proj.copies[1].weight  # the last residual copy is GPTQ
    b = r.model.layers[0].mlp.down_proj.copies[1].weight
    assert not mx.array_equal(a, b).item()
