"""The tiny DeepSeek-MoE trainer (mlx_dupq/moe/train.py) on a tiny config and tokenizer."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dupq.io import models
from mlx_dupq.moe import train as T

TINY = replace(
    T.TINY_DEEPSEEK_MOE, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
    moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, steps=30, batch_size=4, seq_len=32,
    lr=1e-2, min_lr=1e-3, warmup=5, head_tokens=64,
)
VOCAB = 320
TEXT = ("The jury said the election was conducted well. The city council met on Monday and voted on the plan. "
        "A quick brown fox jumps over the lazy dog while the farmer watches the field. ") * 20


@pytest.fixture(scope="module")
def ids(tiny_dirs):
    from mlx_dupq.eval.data import tokenize

    tok, _, vocab = T.load_tokenizer(str(tiny_dirs["deepseek"]))
    assert vocab == VOCAB
    return tokenize(tok, TEXT)


def _weights(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_training_lowers_loss_and_is_deterministic(ids):
    m1, h1 = T.train(TINY, ids, VOCAB, log_every=5)
    assert h1[-1]["loss"] < h1[0]["loss"] - 1.0, h1
    m2, h2 = T.train(TINY, ids, VOCAB, log_every=5)
    assert [r["loss"] for r in h1] == [r["loss"] for r in h2]
    w1, w2 = _weights(m1), _weights(m2)
    assert w1.keys() == w2.keys() and all(np.array_equal(w1[k], w2[k]) for k in w1)
    m3, _ = T.train(replace(TINY, seed=1), ids, VOCAB, log_every=5)
    assert not np.array_equal(_weights(m3)["model.embed_tokens.weight"], w1["model.embed_tokens.weight"])
    # the trained gate routes: not every token to the same experts
    ev = T.evaluate(m1, ids, ctx=32)
    for freq in ev["routing"].values():
        assert len(freq) == TINY.n_routed_experts and math.isclose(sum(freq), 1.0, abs_tol=1e-3)
        assert sum(f > 0 for f in freq) > TINY.num_experts_per_tok


def test_class_head_loss_is_the_full_vocabulary_loss():
    """ClassHead's K+1-way loss equals the full-vocabulary cross-entropy of the expanded head."""
    rng = np.random.default_rng(0)
    w = mx.array(rng.standard_normal((50, 8)).astype(np.float32))
    tokens = T.head_vocab(rng.integers(0, 20, 500), 50, 10)
    head = T.ClassHead(w, tokens)
    assert head.n_shared == 40 and head.weight.shape == (11, 8)
    h = mx.array(rng.standard_normal((6, 8)).astype(np.float32))
    y = np.array([tokens[0], tokens[3], 45, 47, tokens[9], 30])
    cls = head._cls[y]
    assert list(cls[2:4]) == [10, 10] and cls[0] == 0
    import mlx.nn as nn

    small = nn.losses.cross_entropy(head(h), mx.array(cls)) + (cls == 10) * math.log(40)
    full = nn.losses.cross_entropy(h @ head.expand().T, mx.array(y))
    assert np.allclose(np.array(small), np.array(full), atol=1e-4)


def test_balance_loss_hand_computed():
    # 4 tokens, 2 experts, top-1: expert 0 gets 3 assignments, expert 1 gets 1
    probs = mx.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    inds = mx.array([[0], [0], [0], [1]])
    # f = (3/4, 1/4), P = (2.6/4, 1.4/4): E * sum f_i P_i = 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
    assert math.isclose(T.balance_loss(probs, inds).item(), 1.15, rel_tol=1e-6)
    uniform = mx.full((8, 4), 0.25)
    spread = mx.array([[0, 1], [2, 3]] * 4)
    assert math.isclose(T.balance_loss(uniform, spread).item(), 1.0, rel_tol=1e-6)
    # gradient flows through P only (f is a constant)
    g = mx.grad(lambda p: T.balance_loss(p, inds))(probs)
    assert np.allclose(np.array(g), np.array([[2 * 0.75 / 4, 2 * 0.25 / 4]] * 4))


def test_recording_gate_matches_mlx_lm_gate(ids):
    model = T.build_model(replace(TINY, steps=1), VOCAB)
    x = mx.array(ids[None, :24])
    ref = model(x)
    records = T.attach_recorders(model)
    out = model(x)
    assert len(records.items) == 2 and records.items[0][0].shape == (24, TINY.n_routed_experts)
    T.detach_recorders(model)
    assert np.allclose(np.array(ref), np.array(out), atol=1e-6)
    assert sorted(k for k, _ in tree_flatten(model.parameters())) == sorted(
        k for k, _ in tree_flatten(T.build_model(replace(TINY, steps=1), VOCAB).parameters()))


def test_build_saves_a_loadable_directory(tmp_path, tiny_dirs):
    import mlx_lm

    import mlx_dupq

    text = tmp_path / "train.txt"
    text.write_text(TEXT)
    cfg = replace(TINY, steps=6, train_data=str(text))
    res = T.build(tmp_path / "m", cfg, tokenizer_model=str(tiny_dirs["deepseek"]), eval_data=str(text), eval_ctx=32)
    path = tmp_path / "m"
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "deepseek" and config["n_routed_experts"] == 8 and config["first_k_dense_replace"] == 1
    assert res["sha256"] == T.weights_sha256(path / T.WEIGHTS_FILE)
    assert res["unigram"]["tokens"] == res["eval"]["tokens"] and set(res["routing"]) == {"1", "2"}
    assert mx.load(str(path / T.WEIGHTS_FILE))["lm_head.weight"].dtype == mx.float16

    tokens = mx.array([[1, 5, 9, 20, 33, 47, 60, 71]])
    m_lm, _ = mlx_lm.load(str(path))
    m_lm.set_dtype(mx.float32)  # mlx's CPU gather_mm (the experts) runs float32 only
    m_dq, tok = mlx_dupq.load(str(path))
    a, b = m_lm(tokens), m_dq(tokens)
    assert np.allclose(np.array(a), np.array(b), atol=2e-3)
    # the in-memory model (rounded to the saved dtype) gives the same logits
    model, _ = T.train(cfg, T.token_ids(tok, str(text)), VOCAB)
    T.round_to(model, cfg.save_dtype)
    assert np.allclose(np.array(model(tokens)), np.array(b), atol=1e-4)


def test_models_list_has_the_built_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_DUPQ_CACHE", str(tmp_path))
    assert "tiny-deepseek-moe" in models.names() and models.is_named("tiny-deepseek-moe")
    row = next(r for r in models.list_models() if r["name"] == "tiny-deepseek-moe")
    assert row["built"] and row["architecture"] == "deepseek" and not row["cached"] and row["path"] is None
    assert models.model_path("tiny-deepseek-moe") == tmp_path / "models" / "tiny-deepseek-moe" / "model"


def test_fetch_builds_once_and_rebuilds_on_recipe_change(tmp_path, monkeypatch, tiny_dirs):
    """fetch() runs the builder, marks the result, reuses it, and builds again when the recipe changes."""
    monkeypatch.setenv("MLX_DUPQ_CACHE", str(tmp_path))
    text = tmp_path / "train.txt"
    text.write_text(TEXT)
    calls = []
    recipe = {"config": replace(TINY, steps=3, train_data=str(text)).to_dict()}

    def builder(out, progress=None):
        calls.append(out)
        return T.build(out, T.TrainConfig.from_dict(recipe["config"]), str(tiny_dirs["deepseek"]), eval_data=None)

    monkeypatch.setattr(T, "named_recipe", lambda: recipe)
    monkeypatch.setattr(T, "build_named", builder)
    path = models.fetch("tiny-deepseek-moe")
    assert (path / "config.json").exists() and len(calls) == 1
    assert models.fetch("tiny-deepseek-moe") == path and len(calls) == 1
    assert models.cached_path("tiny-deepseek-moe") == path
    row = next(r for r in models.list_models() if r["name"] == "tiny-deepseek-moe")
    assert row["cached"] and row["sha256"] == T.weights_sha256(path / T.WEIGHTS_FILE)
    recipe["config"] = replace(TINY, steps=4, train_data=str(text)).to_dict()
    assert models.cached_path("tiny-deepseek-moe") is None
    models.fetch("tiny-deepseek-moe")
    assert len(calls) == 2


def test_bad_recipes_raise_one_line_errors(tmp_path):
    from mlx_dupq.errors import DupqError

    with pytest.raises(DupqError, match="unknown training config field"):
        T.TrainConfig.from_dict({**TINY.to_dict(), "bogus": 1})
    assert T.TrainConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(DupqError, match="num_experts_per_tok"):
        replace(TINY, num_experts_per_tok=9).check()
    with pytest.raises(DupqError, match="fewer than one window"):
        next(T.batches(np.arange(10, dtype=np.int32), 1, 2, 32, 0))
