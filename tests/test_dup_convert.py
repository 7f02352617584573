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
    with pytest.raises(DupqError, match="serial layer duplication is not supported by the converter"):
        _recipe({"mode": "serial", "copies": {"0": 2}})
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
