"""The streamed expert plan (SPEC F6.4): routing frequencies computed one decoder layer at a time
equal the loaded float model's, on every MoE family mlx-lm knows, from HF directories and GGUF files."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dupq.config import load_recipe
from mlx_dupq.errors import DupqError
from mlx_dupq.io.loader import tokenizer_of, load_model
from mlx_dupq.io.source import layer_index, open_source
from mlx_dupq.moe import precision as P
from mlx_dupq.pipeline import build_skeleton
from tests.tiny import make_hf_dir, unstack_experts

FAMILIES = ("deepseek", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe")


def _recipe(calib_text, **kw):
    rec = load_recipe("moe-w2")
    moe = dataclasses.replace(rec.moe, calib_data=str(calib_text), calib_samples=5, calib_seq_len=48,
                              budget=4.0, max_high_fraction=0.5, **kw)
    return dataclasses.replace(rec, moe=moe)


def _full(src_path, rec):
    """(frequencies, plan) of the full-model path: the whole float model loaded."""
    model, config, tok_dir = load_model(src_path, compute_dtype="float32")
    tok = tokenizer_of(tok_dir, config)
    freqs = P.expert_frequency(model, P.calibration_tokens(tok, rec.moe))
    plan = P.plan_experts(rec, build_skeleton(config), model, tok)
    return freqs, plan


def _streamed(src_path, rec):
    src = open_source(src_path)
    tok = tokenizer_of(src.tokenizer_dir(), src.config)
    freqs = P.stream_frequency(open_source(src_path), build_skeleton(src.config), P.calibration_tokens(tok, rec.moe))
    plan = P.plan_for_convert(rec, src_path, build_skeleton(src.config))
    return freqs, plan


def _assert_same(full, streamed):
    (f_freqs, f_plan), (s_freqs, s_plan) = full, streamed
    assert sorted(f_freqs) == sorted(s_freqs) and f_freqs
    for layer in f_freqs:
        np.testing.assert_allclose(s_freqs[layer], f_freqs[layer])
    assert s_plan.expert_bits == f_plan.expert_bits
    assert s_plan.expert_copies == f_plan.expert_copies
    assert s_plan.linear_specs == f_plan.linear_specs
    assert s_plan.predicted_bpw == pytest.approx(f_plan.predicted_bpw, rel=1e-12)
    assert s_plan.floor_bpw == pytest.approx(f_plan.floor_bpw, rel=1e-12)
    for layer, s in f_plan.scores.items():
        np.testing.assert_allclose(s_plan.scores[layer], s)


def _unstack(path, model_type):
    """Rewrite an HF dir's stacked switch_mlp tensors as one tensor per expert (HF checkpoint names)."""
    f = path / "model.safetensors"
    w = dict(mx.load(str(f)))
    mx.eval(w)  # read before the file is overwritten
    mx.save_safetensors(str(f), unstack_experts(w), metadata={"format": "pt"})


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_frequency_and_plan_equal_the_full_model(family, tmp_path, calib_text):
    src = make_hf_dir(tmp_path / family, family, seed=3)
    rec = _recipe(calib_text)
    full, streamed = _full(src, rec), _streamed(src, rec)
    _assert_same(full, streamed)
    assert any(max(b) > min(b) for b in streamed[1].expert_bits.values())  # some experts raised


@pytest.mark.parametrize("family", ("qwen2_moe", "olmoe"))
def test_streamed_plan_with_per_expert_checkpoint_names_and_copies(family, tmp_path, calib_text):
    """HF names (``mlp.experts.E.up_proj``) of layers >= 1 are stacked too (mlx-lm's sanitize alone
    only stacks when layer 0 is present); expert copies come from the same streamed frequencies."""
    src = make_hf_dir(tmp_path / family, family, seed=1)
    _unstack(src, family)
    assert any(".experts.7." in k for k in open_source(src).keys())
    rec = _recipe(calib_text, dup_budget=0.3)
    full, streamed = _full(src, rec), _streamed(src, rec)
    _assert_same(full, streamed)
    assert any(max(c) > 1 for c in streamed[1].expert_copies.values())


@pytest.mark.parametrize("model_type", ("qwen3_moe", "qwen2_moe"))
def test_streamed_plan_from_gguf(model_type, tmp_path, calib_text):
    from tests.test_gguf import make_float_gguf

    path, _, _ = make_float_gguf(tmp_path, model_type)
    rec = _recipe(calib_text)
    _assert_same(_full(path, rec), _streamed(path, rec))


class _Counting:
    """Wraps a Source: records which decoder layers of the skeleton hold float weights at each ``get``."""

    def __init__(self, src, skeleton):
        self.src, self.name, self.config = src, src.name, src.config
        self.layers = list(skeleton.model.layers)
        self.original = [{k: id(v) for k, v in tree_flatten(l.parameters())} for l in self.layers]
        self.gets: list[tuple[str, int]] = []  # (key, layers holding loaded weights at that moment)

    def groups(self):
        return self.src.groups()

    def loaded(self) -> int:
        return sum(any(id(v) != o[k] for k, v in tree_flatten(l.parameters()))
                   for l, o in zip(self.layers, self.original))

    def get(self, key):
        self.gets.append((key, self.loaded()))
        return self.src.get(key)


def test_streaming_holds_one_layer_at_a_time_and_restores_the_skeleton(tmp_path, calib_text):
    src_path = make_hf_dir(tmp_path / "ds", "deepseek", num_hidden_layers=4)
    src = open_source(src_path)
    skeleton = build_skeleton(src.config)
    counting = _Counting(src, skeleton)
    batches = P.calibration_tokens(tokenizer_of(src.tokenizer_dir(), src.config), _recipe(calib_text).moe)
    seen = []
    freqs = P.stream_frequency(counting, skeleton, batches, progress=lambda m, d, t: seen.append((d, t)))
    assert sorted(freqs) == [1, 2, 3]  # layer 0 is dense
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4)]
    # every get happens while no other layer holds loaded weights; each tensor is read once, layer by layer
    assert all(n == 0 for _, n in counting.gets)
    keys = [k for k, _ in counting.gets]
    assert len(keys) == len(set(keys))
    order = [layer_index(k) for k in keys if layer_index(k) is not None]
    assert order == sorted(order)
    assert not any(k.startswith("lm_head") or k == "model.norm.weight" for k in keys)  # only what routing needs
    assert counting.loaded() == 0  # the skeleton's layers got their lazy parameters back
    assert "Routed" not in type(skeleton.model.layers[1].mlp).__name__


def test_sensitivity_keeps_the_full_load(tmp_path, calib_text, monkeypatch):
    import mlx_dupq.io.loader as loader

    src = make_hf_dir(tmp_path / "ds", "deepseek")
    calls = []
    real = loader.load_model
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    rec = _recipe(calib_text, score="sensitivity")
    plan = P.plan_for_convert(rec, src, build_skeleton(open_source(src).config))
    assert calls and plan.score == "sensitivity"
    assert "whole float model" in P.scoring_message(rec)
    assert "one layer at a time" in P.scoring_message(_recipe(calib_text))
    calls.clear()
    P.plan_for_convert(_recipe(calib_text), src, build_skeleton(open_source(src).config))
    assert not calls  # the frequency score streams


def test_streaming_bad_source_fails_in_one_line(tmp_path, calib_text):
    src = make_hf_dir(tmp_path / "ds", "deepseek")
    f = src / "model.safetensors"
    w = dict(mx.load(str(f)))
    mx.eval(w)  # read before the file is overwritten
    mx.save_safetensors(str(f), {k: v for k, v in w.items() if not k.startswith("model.layers.1.")})
    skeleton = build_skeleton(open_source(src).config)
    with pytest.raises(DupqError, match="no weights for decoder layer 1") as e:
        P.plan_for_convert(_recipe(calib_text), src, skeleton)
    assert "\n" not in str(e.value)
    w["model.layers.2.mlp.gate.weight"] = w["model.layers.2.mlp.gate.weight"][:, :32]
    mx.save_safetensors(str(f), w)
    with pytest.raises(DupqError, match="do not match its config") as e:
        P.plan_for_convert(_recipe(calib_text), src, skeleton)
    assert "\n" not in str(e.value)
    with pytest.raises(DupqError, match="does not exist"):
        P.plan_for_convert(_recipe(calib_text), tmp_path / "missing", skeleton)


@pytest.mark.parametrize("family", ("qwen2_moe", "olmoe"))
def test_convert_stacks_per_expert_checkpoint_names_in_every_layer(family, tmp_path):
    """A checkpoint with one tensor per expert (HF names) converts to the same pack as a stacked one:
    mlx-lm's ``sanitize`` stacks only with layer 0 present; the streaming converter renames each layer."""
    import mlx_dupq
    from mlx_dupq.config import QuantSpec, Recipe

    stacked = make_hf_dir(tmp_path / "stacked", family, seed=2)
    per_expert = make_hf_dir(tmp_path / "per_expert", family, seed=2)
    _unstack(per_expert, family)
    rec = Recipe(name="t", default=QuantSpec(4, 32))
    mlx_dupq.convert(stacked, tmp_path / "a", rec)
    mlx_dupq.convert(per_expert, tmp_path / "b", rec)
    def tensors(d):
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in mx.load(str(f)).items()}

    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert sorted(a) == sorted(b) and any(".switch_mlp." in k for k in a)
    for k in a:
        assert mx.array_equal(a[k], b[k]).item(), k
