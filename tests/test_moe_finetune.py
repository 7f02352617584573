"""The fine-tune stage of a MoE cut from a dense model (mlx_dupq/moe/finetune.py), on tiny models."""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dupq.errors import DupqError
from mlx_dupq.moe import finetune as FT
from mlx_dupq.moe import from_dense as F
from tests.tiny import build_model, logits, rel_err

CFG = replace(F.SMOLLM2_135M_MOE, unit=16, n_shared=2, top_k=2, calib_samples=4, seq_len=32, router_steps=40,
              kmeans_iters=5)


def _cut():
    dense, config = build_model("llama", seed=3, num_hidden_layers=2)
    batches = mx.array(np.random.default_rng(4).integers(0, 300, (4, 32)))
    moe, _, _ = F.split_model(dense, config, batches, CFG)
    return dense, moe


def _windows(n=8, seed=5):
    return mx.array(np.random.default_rng(seed).integers(0, 300, (n, 24)))


def _weights(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_masked_forward_is_mlx_lm_deepseek():
    moe, _ = build_model("deepseek", seed=1)
    ref = logits(moe)
    with FT.masked_moe(moe):
        got = logits(moe)
    assert rel_err(got, ref) < 1e-5
    assert rel_err(logits(moe), ref) == 0.0  # the class is given back


@pytest.mark.parametrize("loss, lr", [("kl", 3e-4), ("ce", 3e-3)])
def test_finetune_lowers_the_loss_and_trains_only_the_mlps(loss, lr):
    dense, moe = _cut()
    w = _windows()
    before = _weights(moe)
    with FT.masked_moe(moe):
        l0 = float(FT.loss_fn(moe, dense, w, loss))
    res = FT.finetune(moe, w, FT.FinetuneConfig(steps=12, lr=lr, batch=4, loss=loss), teacher=dense)
    with FT.masked_moe(moe):
        l1 = float(FT.loss_fn(moe, dense, w, loss))
    assert l1 < 0.8 * l0 and res["steps"] == 12
    after = _weights(moe)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(".mlp." in k for k in changed)
    assert any(".mlp.gate.weight" in k for k in changed) and any("switch_mlp" in k for k in changed)


def test_finetune_is_deterministic_with_a_seed_and_the_seed_matters():
    runs = []
    for seed in (0, 0, 1):
        dense, moe = _cut()
        FT.finetune(moe, _windows(), FT.FinetuneConfig(steps=4, lr=1e-3, batch=2, seed=seed), teacher=dense)
        runs.append(_weights(moe))
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not np.array_equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_batch_order_covers_every_window_before_repeating():
    order = FT.batch_order(6, FT.FinetuneConfig(steps=3, batch=4, seed=2))
    assert order.shape == (3, 4)
    assert sorted(order.ravel()[:6].tolist()) == list(range(6))


@pytest.mark.parametrize("kw, match", [({"steps": -1}, "steps"), ({"lr": 0.0}, "learning rate"),
                                       ({"batch": 0}, "batch"), ({"loss": "mse"}, "unknown fine-tune loss"),
                                       ({"part": "attn"}, "unknown fine-tune part")])
def test_bad_options_are_one_line_errors(kw, match):
    with pytest.raises(DupqError, match=match) as e:
        FT.FinetuneConfig(**kw).check()
    assert "\n" not in str(e.value)


def test_bad_split_finetune_options_fail_before_any_work():
    with pytest.raises(DupqError, match="loss"):
        F.build("/nonexistent/never-written", replace(CFG, finetune_loss="l2", finetune_steps=1))
    with pytest.raises(DupqError, match="finetune_samples"):
        replace(CFG, finetune_steps=1, finetune_samples=0).finetune_config()


def test_kl_needs_a_teacher_and_the_model_must_be_a_moe():
    dense, moe = _cut()
    with pytest.raises(DupqError, match="teacher"):
        FT.finetune(moe, _windows(), FT.FinetuneConfig(steps=1))
    with pytest.raises(DupqError, match="DeepSeek MoE"):
        FT.finetune(dense, _windows(), FT.FinetuneConfig(steps=1, loss="ce"))
    with pytest.raises(DupqError, match="windows"):
        FT.finetune(moe, mx.zeros((4,), dtype=mx.int32), FT.FinetuneConfig(steps=1), teacher=dense)


def test_build_runs_the_finetune_and_records_it(tmp_path, tiny_dirs, calib_text):
    cfg = replace(CFG, dense=str(tiny_dirs["llama"]), calib=str(calib_text), save_dtype="float32",
                  finetune_steps=3, finetune_batch=2, finetune_samples=4, finetune_lr=1e-3)
    res = F.build(tmp_path / "moe", cfg)
    assert res["finetune"]["steps"] == 3 and len(res["finetune"]["last"]) == 1
    assert res["cpu_seconds"] > 0 and res["split_seconds"] <= res["seconds"]
    plain = F.build(tmp_path / "plain", replace(cfg, finetune_steps=0))
    assert plain["finetune"] is None and plain["sha256"] != res["sha256"]
