"""A DeepSeek-MoE cut from a dense model (mlx_dupq/moe/from_dense.py), on tiny random llama models."""

from __future__ import annotations

import json
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from mlx_dupq.adapter import TiedDeepseek
from mlx_dupq.errors import DupqError
from mlx_dupq.moe import from_dense as F
from tests.tiny import build_model, logits, make_hf_dir, rel_err

CFG = replace(F.SMOLLM2_135M_MOE, unit=16, n_shared=2, top_k=2, calib_samples=4, seq_len=32, router_steps=40,
              kmeans_iters=5)


def _dense(**overrides):
    model, config = build_model("llama", seed=3, **overrides)
    return model, config


@pytest.mark.parametrize("tie", [True, False])
def test_split_is_exact_with_every_expert_and_uniform_gate(tie):
    dense, config = _dense(tie_word_embeddings=tie, num_hidden_layers=3)
    E = CFG.n_routed(config["intermediate_size"])  # 128 / 16 - 2 = 6
    cfg = replace(CFG, top_k=E, first_k_dense=1)
    rng = np.random.default_rng(0)
    splits = {}
    for i in (1, 2):
        perm = rng.permutation(config["intermediate_size"])
        splits[i] = F.LayerSplit(np.sort(perm[:32]), perm[32:].reshape(E, 16), mx.zeros((E, 64)), float(E))
    moe = F.assemble(dense, F.moe_config(config, cfg), splits)
    # the head stays tied where the dense model ties it (no second vocabulary matrix)
    assert isinstance(moe, TiedDeepseek) == tie and ("lm_head" in moe) == (not tie)
    assert type(moe).__module__ == ("mlx_dupq.adapter" if tie else "mlx_lm.models.deepseek")
    assert "switch_mlp" not in moe.model.layers[0].mlp and "switch_mlp" in moe.model.layers[1].mlp
    assert rel_err(logits(moe), logits(dense)) < 1e-5


def test_balanced_clusters_are_balanced_deterministic_and_find_planted_groups():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((4, 50))
    truth = np.repeat(np.arange(4), 8)
    feats = centres[truth] + 0.1 * rng.standard_normal((32, 50))
    perm = rng.permutation(32)
    a = F.balanced_clusters(feats[perm], 4, seed=5)
    b = F.balanced_clusters(feats[perm], 4, seed=5)
    assert a.shape == (4, 8) and np.array_equal(a, b)
    assert sorted(a.ravel().tolist()) == list(range(32))
    for row in a:  # every cluster is one planted group
        assert len(set(truth[perm][row].tolist())) == 1
    with pytest.raises(DupqError, match="equal clusters"):
        F.balanced_clusters(feats[:30], 4)


def test_shared_neurons_are_the_most_often_active():
    rng = np.random.default_rng(2)
    c = rng.random((200, 40)) * 0.1
    c[:, [3, 17]] += 1.0  # always large
    c[::2, 5] += 1.0  # half the time
    assert F.shared_neurons(c, 3, 0.1).tolist() == [3, 5, 17]


def test_router_training_reduces_its_loss_and_finds_the_targets():
    rng = np.random.default_rng(3)
    x = mx.array(rng.standard_normal((256, 16)).astype(np.float32))
    true_w = mx.array(rng.standard_normal((6, 16)).astype(np.float32))
    target = F.router_targets(x @ true_w.T, 2)
    w, losses = F.train_router(x, target, steps=60, lr=0.05)
    assert losses[-1] < 0.8 * losses[0]
    pred = F.router_targets(x @ w.T, 2)
    assert float((pred * target).sum(-1).mean()) * 2 > 0.8  # recall of the top-2


def test_split_model_is_deterministic_and_routes_well():
    dense, config = _dense(num_hidden_layers=2)
    batches = mx.array(np.random.default_rng(4).integers(0, 300, (4, 32)))
    m1, conf, stats = F.split_model(dense, config, batches, CFG)
    m2, _, _ = F.split_model(dense, config, batches, CFG)
    assert np.array_equal(np.array(logits(m1)), np.array(logits(m2)))
    assert conf["n_routed_experts"] == 6 and conf["n_shared_experts"] == 2 and conf["num_experts_per_tok"] == 2
    assert set(stats) == {1}
    st = stats[1]
    assert st["router_loss"][1] < st["router_loss"][0]
    assert st["router_recall"] > 2 / 6  # better than a random choice of 2 of 6
    # top-2 of 6 stays close to the dense model
    assert rel_err(logits(m1), logits(dense)) < 0.5


def test_built_model_loads_with_mlx_lm_deepseek(tmp_path, tiny_dirs, calib_text):
    from mlx_lm.models import deepseek
    from mlx_lm.utils import load_model

    from mlx_dupq.io.loader import load

    cfg = replace(CFG, dense=str(tiny_dirs["llama"]), calib=str(calib_text), save_dtype="float32")
    res = F.build(tmp_path / "moe", cfg)
    out = tmp_path / "moe"
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_type"] == "deepseek" and conf["moe_intermediate_size"] == 16
    m, _ = load_model(out)
    assert isinstance(m, deepseek.Model)
    ours, _ = load(out)
    assert rel_err(logits(m), logits(ours)) < 1e-6
    assert res["sha256"] and set(res["layers"]) == {"1"}


def test_tied_dense_model_builds_a_tied_moe(tmp_path, calib_text):
    from mlx_lm.utils import load_model

    from mlx_dupq.io.loader import load

    dense = make_hf_dir(tmp_path / "dense", "llama", seed=3, tie_word_embeddings=True)
    cfg = replace(CFG, dense=str(dense), calib=str(calib_text), save_dtype="float32")
    F.build(tmp_path / "moe", cfg)
    out = tmp_path / "moe"
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in mx.load(str(out / "model.safetensors"))
    ours, _ = load(out)
    assert isinstance(ours, TiedDeepseek)
    with pytest.raises(ValueError, match="lm_head"):  # mlx-lm's own deepseek class has no tied head
        load_model(out)
    # top-2 of 6 stays close to the dense model, through the shared head
    dense_model, _ = load(dense)
    assert rel_err(logits(ours), logits(dense_model)) < 0.5


def test_bad_split_sizes_say_what_to_do():
    with pytest.raises(DupqError, match="does not divide"):
        replace(CFG, unit=100).n_routed(128)
    with pytest.raises(DupqError, match="top_k"):
        replace(CFG, top_k=7).n_routed(128)
    with pytest.raises(DupqError, match="llama-family"):
        F.moe_config({"model_type": "qwen2", "attention_bias": True}, CFG)


def test_named_model_dispatches_to_this_builder_and_its_recipe_survives_json():
    from mlx_dupq.io import models

    m = models.get_model("smollm2-135m-moe")
    assert models._call(m.builder) is F.build_named and m.architecture == "deepseek"
    recipe = models._call(m.recipe)()
    assert json.loads(json.dumps(recipe)) == recipe  # the cache marker compares the JSON round trip
    assert F.SplitConfig.from_dict(recipe["split"]) == F.SMOLLM2_135M_MOE
