"""A DeepSeek-MoE whose head is its embedding (mlx_dupq.adapter.TiedDeepseek): load, convert, auto plan."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import mlx_dupq
from mlx_dupq.adapter import TiedDeepseek, model_classes
from tests.test_cli import run
from tests.tiny import logits, make_hf_dir, rel_err


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("tied") / "ds", "deepseek", tie_word_embeddings=True)


def _keys(path):
    return {k for f in path.glob("model*.safetensors") for k in mx.load(str(f))}


def test_tied_deepseek_uses_its_embedding_as_head(tied_dir):
    from mlx_lm.models import deepseek

    assert "lm_head.weight" not in _keys(tied_dir)
    m, _ = mlx_dupq.load(tied_dir)
    assert isinstance(m, TiedDeepseek) and "lm_head" not in m
    # the same weights in mlx-lm's untied class, its lm_head set to the embedding: the same logits
    config = json.loads((tied_dir / "config.json").read_text())
    plain = deepseek.Model(deepseek.ModelArgs.from_dict(config))
    w = dict(tree_flatten(m.parameters()))
    plain.load_weights([*w.items(), ("lm_head.weight", w["model.embed_tokens.weight"])], strict=True)
    assert rel_err(logits(m), logits(plain)) < 1e-6
    # an untied config keeps mlx-lm's class
    assert model_classes({**config, "tie_word_embeddings": False})[0] is deepseek.Model


def test_mlx_lm_refuses_a_tied_deepseek_and_loads_it_with_our_classes(tied_dir):
    from mlx_lm.utils import load_model

    with pytest.raises(ValueError, match="lm_head"):
        load_model(tied_dir)
    m, _ = load_model(tied_dir, get_model_classes=model_classes)
    assert isinstance(m, TiedDeepseek)
    # a checkpoint that also wrote the head loads tied (sanitize drops it)
    w = m.sanitize({"lm_head.weight": mx.zeros((3, 3)), "model.norm.weight": mx.ones(3)})
    assert list(w) == ["model.norm.weight"]


def test_converted_tied_pack_stores_one_vocab_matrix(tied_dir, tmp_path):
    untied = make_hf_dir(tmp_path / "untied", "deepseek", tie_word_embeddings=False)
    ref, _ = mlx_dupq.load(tied_dir)
    res = {}
    for name, src in (("tied", tied_dir), ("untied", untied)):
        out = tmp_path / f"pack-{name}"
        res[name] = mlx_dupq.convert(src, out, bits=8, group_size=32)
        assert ("lm_head.weight" in _keys(out)) == (name == "untied")
    q, _ = mlx_dupq.load(tmp_path / "pack-tied")
    assert isinstance(q, TiedDeepseek)
    assert rel_err(logits(q), logits(ref)) < 0.02
    meta = json.loads((tmp_path / "pack-tied" / "config.json").read_text())
    assert meta["tie_word_embeddings"] is True
    # the tied model has fewer parameters (no head) and stores fewer bytes
    assert res["tied"].stored_bytes < res["untied"].stored_bytes


def test_auto_convert_of_a_tied_moe_stays_within_budget(monkeypatch, capsys, tied_dir, tmp_path):
    out = tmp_path / "pack"
    code, o, e = run(monkeypatch, capsys, "convert", tied_dir, "-o", out, "--bpw", "4.5", "--e2e-steps", "0")
    assert code == 0, e
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mlx_dupq"]["bits_per_weight"] <= 4.5
    q, _ = mlx_dupq.load(out)
    ref, _ = mlx_dupq.load(tied_dir)
    # tied unless the rotation fold untied the head (then the pack stores it and says so)
    assert ("lm_head" in q) == (cfg.get("tie_word_embeddings") is False) == ("lm_head.weight" in _keys(out)
                                                                           or "lm_head.scales" in _keys(out))
    assert rel_err(logits(q), logits(ref)) < 0.5


def test_pipeline_stages_of_a_tied_moe_pack_chain_to_the_one_process_model(tied_dir, tmp_path):
    from mlx_dupq.distributed.stage import load_stage
    from tests.tiny import TOKENS

    path = mlx_dupq.convert(tied_dir, tmp_path / "pack", "rtn4").path
    ref, _ = mlx_dupq.load(path)
    expected = ref(TOKENS)
    stages = [load_stage(path, r, 2)[0] for r in range(2)]
    assert stages[-1].plan.tied and "lm_head" not in stages[-1]  # the last rank's head is the embedding
    h = stages[0].embed(TOKENS)
    for st in stages:
        h = st(h)
    assert mx.array_equal(stages[-1].head(h), expected).item()
