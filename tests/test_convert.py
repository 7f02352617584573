"""Streaming conversion and the pack format on tiny random models."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

import mlx_dupq
from mlx_dupq.config import QuantSpec, Recipe, Rule
from mlx_dupq.errors import DupqError
from mlx_dupq.io import pack as packio
from tests.tiny import interrupt_after, logits, rel_err



@pytest.mark.parametrize("model_type", ["qwen2", "llama", "deepseek"])
def test_convert_8bit_matches_float_and_opens_in_mlx_lm(tiny_dirs, tmp_path, model_type):
    import mlx_lm

    out = tmp_path / "pack"
    res = mlx_dupq.convert(tiny_dirs[model_type], out, bits=8, group_size=32)
    assert out.is_dir() and not (tmp_path / "pack.partial").exists()
    ref, _ = mlx_dupq.load(tiny_dirs[model_type])
    q, tok = mlx_dupq.load(out)
    assert rel_err(logits(q), logits(ref)) < 0.02
    # every quantized module used mlx's format, so mlx-lm opens the pack unchanged
    m2, _ = mlx_lm.load(str(out))
    packio.cast_floats(m2, mx.float32)
    assert rel_err(logits(m2), logits(q)) < 1e-3
    assert tok.encode("hello world")
    # all-in bpw: stored bits of every tensor file over the float parameter count
    meta = json.loads((out / "config.json").read_text())["mlx_dupq"]
    stored = sum(a.nbytes for f in out.glob("model*.safetensors") for a in mx.load(str(f)).values())
    assert meta["stored_bytes"] == stored
    assert meta["bits_per_weight"] == pytest.approx(res.bits_per_weight)
    assert 8.0 < res.bits_per_weight < 10.5


def test_bits_order_error(tiny_dirs, tmp_path):
    ref, _ = mlx_dupq.load(tiny_dirs["qwen2"])
    errs = []
    for b in (8, 4, 2):
        out = tmp_path / f"p{b}"
        mlx_dupq.convert(tiny_dirs["qwen2"], out, bits=b, group_size=32)
        q, _ = mlx_dupq.load(out)
        errs.append(rel_err(logits(q), logits(ref)))
    assert errs[0] < errs[1] < errs[2]


def test_pack_records_every_choice_and_rebuilds(tiny_dirs, tmp_path):
    recipe = Recipe(
        name="mixed",
        default=QuantSpec(bits=2, group_size=64),
        rules=(Rule(r"down_proj$", QuantSpec(bits=4, group_size=32)), Rule(r"layers\.0\.self_attn\.o_proj$", None)),
        embed=QuantSpec(bits=6, group_size=32),
    )
    out = tmp_path / "mixed"
    mlx_dupq.convert(tiny_dirs["llama"], out, recipe)
    cfg = json.loads((out / "config.json").read_text())
    mods = cfg["mlx_dupq"]["modules"]
    assert mods["model.layers.1.mlp.down_proj"]["bits"] == 4
    assert mods["model.layers.1.mlp.up_proj"]["bits"] == 2
    assert mods["model.embed_tokens"]["bits"] == 6
    assert "model.layers.0.self_attn.o_proj" not in mods
    assert cfg["mlx_dupq"]["recipe"]["name"] == "mixed"
    assert Recipe.from_dict(cfg["mlx_dupq"]["recipe"]) == recipe
    m, _ = mlx_dupq.load(out)
    assert m.model.layers[1].mlp.down_proj.bits == 4
    assert type(m.model.layers[0].self_attn.o_proj).__name__ == "Linear"


@pytest.mark.parametrize("bits,group", [(1.58, 0), (2, 256), (3, -1), (1, 64)])
def test_custom_formats_round_trip(tiny_dirs, tmp_path, bits, group):
    out = tmp_path / "custom"
    res = mlx_dupq.convert(tiny_dirs["qwen2"], out, bits=bits, group_size=group)
    q, _ = mlx_dupq.load(out)
    ref, _ = mlx_dupq.load(tiny_dirs["qwen2"])
    y = logits(q)
    assert mx.all(mx.isfinite(y)).item()
    assert rel_err(y, logits(ref)) < 1.5
    mods = json.loads((out / "config.json").read_text())["mlx_dupq"]["modules"]
    for e in mods.values():
        fitted = QuantSpec(bits=e["bits"], group_size=e["group_size"], symmetric=e.get("symmetric", False))
        assert e["format"] == ("mlx" if fitted.mlx_native else "dupq")
    assert {e["format"] for e in mods.values()} == ({"mlx"} if (bits, group) in ((1, 64), (2, 256)) else {"mlx", "dupq"})
    assert res.bits_per_weight < 9


def test_group_fallback_is_recorded(tmp_path):
    from tests.tiny import make_hf_dir

    src = make_hf_dir(tmp_path / "w96", "qwen2", hidden_size=96, intermediate_size=192)
    out = tmp_path / "pack"
    mlx_dupq.convert(src, out, bits=4, group_size=128)
    mods = json.loads((out / "config.json").read_text())["mlx_dupq"]["modules"]
    e = mods["model.layers.0.self_attn.q_proj"]  # 96-wide rows: 128 does not divide, 32 does
    assert e["group_size"] == 32 and e["requested_group_size"] == 128
    assert mods["model.layers.0.mlp.down_proj"]["group_size"] == 64  # 192 = 3 * 64


def test_resume_after_interruption(tiny_dirs, tmp_path, monkeypatch):
    out = tmp_path / "pack"
    real = interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        mlx_dupq.convert(tiny_dirs["qwen2"], out, bits=4, group_size=32)
    assert not out.exists() and (tmp_path / "pack.partial").exists()
    with pytest.raises(DupqError, match="--resume"):
        mlx_dupq.convert(tiny_dirs["qwen2"], out, bits=4, group_size=32)
    with pytest.raises(DupqError, match="another model or recipe"):
        mlx_dupq.convert(tiny_dirs["qwen2"], out, bits=2, group_size=32, resume=True)
    monkeypatch.setattr(packio.PartialState, "write_group", real)
    res = mlx_dupq.convert(tiny_dirs["qwen2"], out, bits=4, group_size=32, resume=True)
    assert res.groups_resumed == 3
    fresh = tmp_path / "fresh"
    mlx_dupq.convert(tiny_dirs["qwen2"], fresh, bits=4, group_size=32)
    a, _ = mlx_dupq.load(out)
    b, _ = mlx_dupq.load(fresh)
    assert mx.array_equal(logits(a), logits(b)).item()


def test_output_exists_needs_force(tiny_dirs, tmp_path):
    out = tmp_path / "pack"
    mlx_dupq.convert(tiny_dirs["qwen2"], out, bits=4, group_size=32)
    with pytest.raises(DupqError, match="--force"):
        mlx_dupq.convert(tiny_dirs["qwen2"], out, bits=4, group_size=32)
    mlx_dupq.convert(tiny_dirs["qwen2"], out, bits=8, group_size=32, force=True)
    assert json.loads((out / "config.json").read_text())["mlx_dupq"]["modules"]["model.layers.0.mlp.up_proj"]["bits"] == 8
