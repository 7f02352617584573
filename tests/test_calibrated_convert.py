"""Calibrated quantizers (GPTQ, AWQ-style search) inside the streaming converter."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import mlx_dupq
from mlx_dupq.config import QuantizerSpec, QuantSpec, Recipe, RotationSpec
from mlx_dupq.io import pack as packio
from tests.tiny import interrupt_after

def _random_text(seed: int, words: int) -> str:
    """Random lowercase words: covers the tiny tokenizer's vocabulary like real text covers a real one."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz .,"))
    return " ".join("".join(rng.choice(letters, rng.integers(1, 8))) for _ in range(words))


def _eval_tokens(tiny_dir):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    return mx.array([tok.encode(_random_text(99, 60))[:64]])


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(_random_text(0, 4000))
    return str(p)


def _recipe(method, calib_text, bits=3, rotation=None):
    return Recipe(
        name=f"{method}{bits}", default=QuantSpec(bits=bits, group_size=32), rotation=rotation,
        quantizer=QuantizerSpec(method=method, calib_data=calib_text, calib_samples=32, calib_seq_len=64),
    )


def _err(pack, ref_dir):
    """Relative logit error of the pack against the float model on held-out text."""
    tokens = _eval_tokens(ref_dir)
    ref, _ = mlx_dupq.load(ref_dir)
    q, _ = mlx_dupq.load(pack)
    a, b = q(tokens), ref(tokens)
    return (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item()


@pytest.mark.parametrize("model_type", ["qwen2", "llama", "deepseek"])
def test_gptq_beats_rtn_end_to_end(tiny_dirs, tmp_path, calib_text, model_type):
    errs = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / method
        mlx_dupq.convert(tiny_dirs[model_type], out, _recipe(method, calib_text, bits=2))
        errs[method] = _err(out, tiny_dirs[model_type])
    assert errs["gptq"] < errs["rtn"], errs
    rec = json.loads((tmp_path / "gptq" / "config.json").read_text())["mlx_dupq"]["recipe"]
    assert rec["quantizer"]["method"] == "gptq"
    assert not list((tmp_path / "gptq").glob("calib-hidden-*"))


def test_awq_and_mse_run(tiny_dirs, tmp_path, calib_text):
    for method in ("awq", "mse"):
        out = tmp_path / method
        res = mlx_dupq.convert(tiny_dirs["qwen2"], out, _recipe(method, calib_text))
        assert res.bits_per_weight > 3 and _err(out, tiny_dirs["qwen2"]) < 1.0


def test_gptq_with_rotation_and_online_hadamard(tiny_dirs, tmp_path, calib_text):
    rot = RotationSpec(kind="block_hadamard", online_down=True)
    out = tmp_path / "rot-gptq"
    mlx_dupq.convert(tiny_dirs["llama"], out, _recipe("gptq", calib_text, bits=4, rotation=rot))
    plain = tmp_path / "plain-rtn"
    mlx_dupq.convert(tiny_dirs["llama"], plain, _recipe("rtn", calib_text, bits=4))
    assert _err(out, tiny_dirs["llama"]) < _err(plain, tiny_dirs["llama"])


def _assert_resume_exact(model_dir, recipe, tmp_path, monkeypatch, done: int = 3) -> None:
    """Interrupt after ``done`` groups, resume, and compare with an uninterrupted conversion."""
    out = tmp_path / "pack"
    real = interrupt_after(monkeypatch, done)
    with pytest.raises(KeyboardInterrupt):
        mlx_dupq.convert(model_dir, out, recipe)
    monkeypatch.setattr(packio.PartialState, "write_group", real)
    res = mlx_dupq.convert(model_dir, out, recipe, resume=True)
    assert res.groups_resumed == done
    fresh = tmp_path / "fresh"
    mlx_dupq.convert(model_dir, fresh, recipe)
    a, _ = mlx_dupq.load(out)
    b, _ = mlx_dupq.load(fresh)
    tokens = _eval_tokens(model_dir)
    assert mx.allclose(a(tokens), b(tokens), atol=1e-5).item()


def test_gptq_resume_is_exact(tiny_dirs, tmp_path, calib_text, monkeypatch):
    # embedding, final norm, layer 0 done; layer 1 interrupted
    _assert_resume_exact(tiny_dirs["qwen2"], _recipe("gptq", calib_text), tmp_path, monkeypatch)


def _head_recipe(calib_text, calib_head, rotation=None):
    low = QuantSpec(bits=2, group_size=32)
    return Recipe(
        name="gptq-head", default=QuantSpec(bits=4, group_size=32), embed=low, lm_head=low, rotation=rotation,
        quantizer=QuantizerSpec(method="gptq", calib_data=calib_text, calib_samples=32, calib_seq_len=64,
                                calib_head=calib_head),
    )


@pytest.mark.parametrize("model_type,rotated", [("qwen2", False), ("llama", False), ("llama", True)])
def test_calibrated_head_lowers_error(tiny_dirs, tmp_path, calib_text, model_type, rotated):
    """GPTQ on lm_head against the final states; qwen2's tied embedding is left to mse (same pack)."""
    rot = RotationSpec(kind="block_hadamard") if rotated else None
    errs = {}
    for flag in (False, True):
        out = tmp_path / f"head-{flag}"
        mlx_dupq.convert(tiny_dirs[model_type], out, _head_recipe(calib_text, flag, rot))
        errs[flag] = _err(out, tiny_dirs[model_type])
    if model_type == "qwen2":
        assert errs[True] == errs[False], errs
    else:
        assert errs[True] < errs[False], errs


def test_calibrated_head_resume_is_exact(tiny_dirs, tmp_path, calib_text, monkeypatch):
    # embedding, final norm, layer 0 done; the head comes last
    _assert_resume_exact(tiny_dirs["llama"], _head_recipe(calib_text, True), tmp_path, monkeypatch)


def test_calib_head_must_be_bool():
    from mlx_dupq.errors import DupqError

    with pytest.raises(DupqError, match="calib_head"):
        QuantizerSpec(method="gptq", calib_head="yes")


def test_cd_sweeps_reach_gptq(tiny_dirs, tmp_path, calib_text, monkeypatch):
    """``[quantizer] cd_sweeps`` is recorded in the pack and runs that many sweeps after each linear's GPTQ."""
    from mlx_dupq.quant import gptq

    calls = []
    real = gptq.coordinate_descent
    monkeypatch.setattr(gptq, "coordinate_descent", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    codes = {}
    for sweeps in (0, 2):
        rec = _recipe("gptq", calib_text, bits=2)
        rec = Recipe(name=rec.name, default=rec.default, quantizer=QuantizerSpec(**{**rec.quantizer.to_dict(), "cd_sweeps": sweeps}))
        out = tmp_path / f"cd{sweeps}"
        mlx_dupq.convert(tiny_dirs["llama"], out, rec)
        assert json.loads((out / "config.json").read_text())["mlx_dupq"]["recipe"]["quantizer"]["cd_sweeps"] == sweeps
        codes[sweeps] = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in mx.load(str(f)).items()
                         if k.endswith(".weight") and v.dtype == mx.uint32}
    assert calls and set(calls) == {2}
    assert codes[0].keys() == codes[2].keys()
    assert any(not mx.array_equal(codes[0][k], codes[2][k]).item() for k in codes[0])
