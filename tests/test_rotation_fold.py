"""Offline folding on tiny random mlx-lm models: the rotated float model computes the same logits."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

from mlx_dupq.errors import DupqError
from mlx_dupq.layers.online_rotation import RotatedInput, apply_online_rotations, online_rotations
from mlx_dupq.rotation import (
    fold_rotation,
    fuse_norms_layer,
    make_rotation,
    rotate_embeddings,
    rotate_layer,
    rotate_linear_input,
)

BASE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    rms_norm_eps=1e-6, vocab_size=80, rope_theta=10000.0, max_position_embeddings=256,
)
CONFIGS = {
    "llama_bias": dict(BASE, model_type="llama", tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
    "llama_tied": dict(BASE, model_type="llama", tie_word_embeddings=True),
    "mistral": dict(BASE, model_type="mistral", tie_word_embeddings=False),
    "qwen2_tied": dict(BASE, model_type="qwen2", tie_word_embeddings=True),
    "qwen3_tied": dict(BASE, model_type="qwen3", head_dim=16, tie_word_embeddings=True),
    "qwen3": dict(BASE, model_type="qwen3", head_dim=16, tie_word_embeddings=False),
    # hidden 96 = 3 * 32, heads of 16, intermediate 160 = 20 * 8
    "qwen2_96": dict(BASE, model_type="qwen2", hidden_size=96, num_attention_heads=6, intermediate_size=160,
                     tie_word_embeddings=False),
}
TOKENS = mx.array([[1, 5, 9, 33, 2, 17, 60, 4, 71, 12, 0, 44]])


def build(config: dict, weights: dict | None = None, seed: int = 0):
    """(model, hf_weights): a tiny mlx-lm model with random weights, outliers and non-trivial norms."""
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if weights is None:
        rng = np.random.default_rng(seed)
        weights = {}
        for k, v in tree_flatten(model.parameters()):
            if "norm" in k:
                a = rng.uniform(0.5, 1.5, v.shape)
                a[rng.integers(0, a.size, 2)] = 6.0  # a few large norm weights, as in real checkpoints
            else:
                a = rng.standard_normal(v.shape) * (0.5 if "embed" in k else 0.08)
                if v.ndim == 2:
                    a[:, rng.integers(0, v.shape[1], 2)] *= 6.0  # outlier input channels
            weights[k] = mx.array(a.astype(np.float32))
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model, weights


def logits(model) -> mx.array:
    out = model(TOKENS)
    mx.eval(out)
    return out.astype(mx.float32)


def rel(a: mx.array, b: mx.array) -> float:
    return float(mx.max(mx.abs(a - b)) / mx.max(mx.abs(b)))


def fold_and_rebuild(name, r_spec, head, down):
    config = CONFIGS[name]
    model, w = build(config)
    ref = logits(model)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    r = make_rotation(r_spec, hidden)
    h = make_rotation({"kind": "randomized_hadamard", "seed": 5}, 16) if head else None
    d = make_rotation({"kind": "block_hadamard", "seed": 6}, inter) if down else None
    folded, update, online = fold_rotation(w, config, r, head_rotation=h, down_rotation=d)
    new_config = {**config, **update}
    rotated, _ = build(new_config, folded)  # strict load: the folded dict is a plain model's weights
    if down:
        assert set(online) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
        assert apply_online_rotations(rotated, online) == list(online)
    else:
        assert online == {}
    return config, new_config, ref, rotated, folded


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("head,down", [(False, False), (True, False), (True, True)])
def test_folded_rotation_keeps_logits(name, head, down):
    r_spec = {"kind": "block_hadamard", "seed": 1, "block": 32} if name == "qwen2_96" else {"kind": "randomized_hadamard", "seed": 1}
    config, new_config, ref, rotated, folded = fold_and_rebuild(name, r_spec, head, down)
    assert rel(logits(rotated), ref) < 1e-4
    # every norm is folded away; tied heads with a non-trivial final norm are untied
    norms = [v for k, v in folded.items() if k.endswith("layernorm.weight") or k == "model.norm.weight"]
    assert norms and all(bool(mx.all(v == 1)) for v in norms)
    if config["tie_word_embeddings"]:
        assert new_config["tie_word_embeddings"] is False and "lm_head.weight" in folded
    if config["model_type"] == "qwen3":  # per-head q/k norms act on unrotated q, k: left as they were
        _, w = build(config)
        assert bool(mx.all(folded["model.layers.0.self_attn.q_norm.weight"] == w["model.layers.0.self_attn.q_norm.weight"]))


@pytest.mark.parametrize("kind", ["random_orthogonal", "perturbed", "hadamard", "identity"])
def test_other_residual_kinds_keep_logits(kind):
    _, _, ref, rotated, _ = fold_and_rebuild("qwen2_tied", {"kind": kind, "seed": 2}, True, True)
    assert rel(logits(rotated), ref) < 1e-4


def test_rotation_actually_changes_the_weights():
    config = CONFIGS["llama_bias"]
    _, w = build(config)
    folded, _, _ = fold_rotation(w, config, make_rotation({"kind": "randomized_hadamard", "seed": 1}, 64))
    for k in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
              "model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.bias", "lm_head.weight"):
        assert folded[k].shape == w[k].shape
        assert not np.allclose(np.array(folded[k]), np.array(w[k]), atol=1e-3), k


def test_streaming_layer_by_layer_equals_whole_model_fold():
    config = CONFIGS["qwen2_tied"]
    _, w = build(config)
    r = make_rotation({"kind": "randomized_hadamard", "seed": 1}, 64)
    whole, _, _ = fold_rotation(w, config, r)
    other = {k: v for k, v in w.items() if not k.startswith("model.layers.")}
    parts, _ = rotate_embeddings(other, r, config)
    for i in range(2):
        layer = {k: v for k, v in w.items() if k.startswith(f"model.layers.{i}.")}
        parts.update(rotate_layer(fuse_norms_layer(layer, i), i, r, config))
    assert set(parts) == set(whole)
    assert all(bool(mx.array_equal(parts[k], whole[k])) for k in whole)


def test_tied_model_with_unit_final_norm_stays_tied():
    config = CONFIGS["qwen2_tied"]
    _, w = build(config)
    w = dict(w, **{"model.norm.weight": mx.ones((64,))})
    out, update = rotate_embeddings(w, make_rotation("hadamard", 64), config)
    assert update == {} and "lm_head.weight" not in out


def test_partial_rotation_of_chosen_linears_via_online_wrapper():
    """Only layer 1's q/k/v and gate/up read a rotated input (no residual rotation): exact."""
    config = CONFIGS["llama_bias"]
    model, w = build(config)
    ref = logits(model)
    r = make_rotation({"kind": "random_orthogonal", "seed": 3}, 64)
    names = [f"model.layers.1.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "mlp.gate_proj", "mlp.up_proj")]
    for n in names:
        w = rotate_linear_input(w, n, r)
    model2, _ = build(config, w)
    apply_online_rotations(model2, {n: r for n in names})
    assert rel(logits(model2), ref) < 1e-4
    assert set(online_rotations(model2)) == set(names)


def test_online_rotation_wraps_quantized_linears():
    config, _, ref, _, folded = fold_and_rebuild("qwen3", {"kind": "randomized_hadamard", "seed": 1}, True, True)
    model, _ = build({**config, "tie_word_embeddings": False}, folded)
    nn.quantize(model, group_size=32, bits=8)  # quantize first, then install: paths stay as recorded
    err_without = rel(logits(model), ref)
    online = {f"model.layers.{i}.mlp.down_proj": {"kind": "block_hadamard", "size": 96, "seed": 6, "block": 96}
              for i in range(2)}
    apply_online_rotations(model, online)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, RotatedInput) and isinstance(down.linear, nn.QuantizedLinear)
    assert online_rotations(model) == online
    err_with = rel(logits(model), ref)  # 8-bit weights and embeddings
    assert err_with < 0.05 and err_with < err_without / 5, (err_with, err_without)
    x = mx.random.normal((2, 96))
    assert float(mx.max(mx.abs(down(x) - down.linear(x @ down.rotation.matrix())))) < 1e-4


def test_online_rotation_errors():
    model, _ = build(CONFIGS["llama_tied"])
    spec = {"kind": "hadamard", "size": 96}
    with pytest.raises(DupqError, match="no module there"):
        apply_online_rotations(model, {"model.layers.7.mlp.down_proj": spec})
    with pytest.raises(DupqError, match="takes 96 inputs"):
        apply_online_rotations(model, {"model.layers.0.mlp.down_proj": {"kind": "hadamard", "size": 64}})
    apply_online_rotations(model, {"model.layers.0.mlp.down_proj": spec})
    with pytest.raises(DupqError, match="already has an online rotation"):
        apply_online_rotations(model, {"model.layers.0.mlp.down_proj": spec})


def test_fold_errors():
    config = CONFIGS["llama_tied"]
    _, w = build(config)
    with pytest.raises(DupqError, match="model types"):
        fold_rotation(w, dict(config, model_type="gemma"), make_rotation("hadamard", 64))
    with pytest.raises(DupqError, match="hidden size is 64"):
        rotate_layer(fuse_norms_layer(w, 0), 0, make_rotation("hadamard", 32), config)
    with pytest.raises(ValueError, match="not folded"):
        rotate_layer(w, 0, make_rotation("hadamard", 64), config)
    with pytest.raises(DupqError, match="missing"):
        fuse_norms_layer({}, 0)


def rtn4(weights: dict) -> dict:
    """4-bit group-32 round-to-nearest of every linear weight (mx.quantize round trip)."""
    out = dict(weights)
    for k, v in weights.items():
        if v.ndim == 2 and (k.endswith("proj.weight") or k == "lm_head.weight"):
            q = mx.quantize(v, group_size=32, bits=4)
            out[k] = mx.dequantize(*q, group_size=32, bits=4)
    return out


@pytest.mark.parametrize("name", ["llama_bias", "qwen2_tied", "qwen3"])
def test_rotated_model_quantizes_no_worse_than_the_original(name):
    """Sanity, not a claim: with outlier channels, RTN-4 of the rotated model is not worse.

    Error = ||logits_q - logits||_F / ||logits||_F over 4 x 32 random tokens (the rotated model
    is compared with the *original* float logits, which its own float version reproduces).
    """
    config = CONFIGS[name]
    tokens = mx.array(np.random.default_rng(0).integers(0, 80, (4, 32)))

    def err(m, ref):
        out = m(tokens).astype(mx.float32)
        return float(mx.linalg.norm((out - ref).reshape(-1)) / mx.linalg.norm(ref.reshape(-1)))

    model, w = build(config, seed=4)
    ref = model(tokens).astype(mx.float32)
    err_plain = err(build(config, rtn4(w))[0], ref)
    r = make_rotation({"kind": "randomized_hadamard", "seed": 1}, 64)
    h = make_rotation({"kind": "hadamard"}, 16)
    d = make_rotation({"kind": "block_hadamard", "seed": 2}, 96)
    folded, update, online = fold_rotation(w, config, r, head_rotation=h, down_rotation=d)
    float_model, _ = build({**config, **update}, folded)
    apply_online_rotations(float_model, online)
    assert err(float_model, ref) < 1e-5
    qmodel, _ = build({**config, **update}, rtn4(folded))
    apply_online_rotations(qmodel, online)
    err_rot = err(qmodel, ref)
    assert 0 < err_rot <= 1.05 * err_plain, (err_rot, err_plain)


# --------------------------------------------------------------------------- mixture-of-experts models


def _restack(weights: dict) -> dict:
    """Inverse of tests.tiny.unstack_experts: ``<block>.experts.<e>.<proj>.weight`` -> stacked switch_mlp."""
    out, groups = {}, {}
    for k, v in weights.items():
        if ".experts." in k:
            head, rest = k.split(".experts.")
            e, proj = rest.split(".")[:2]
            groups.setdefault(f"{head}.switch_mlp.{proj}.weight", {})[int(e)] = v
        else:
            out[k] = v
    for k, d in groups.items():
        out[k] = mx.stack([d[e] for e in sorted(d)])
    return out


@pytest.mark.parametrize("family", ["deepseek", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe"])
@pytest.mark.parametrize("per_expert", [False, True])
def test_moe_models_fold_exactly(family, per_expert):
    """Router, experts (stacked or one tensor per expert), shared experts and Qwen2-MoE's shared
    expert gate are rotated with the residual stream: same logits, same routing; the online
    down_proj rotation lands on dense MLPs only (DeepSeek's first layer)."""
    from tests.tiny import build_model, unstack_experts

    model, config = build_model(family)
    ref = logits(model)
    w = dict(tree_flatten(model.parameters()))
    if per_expert:
        w = unstack_experts(w)
    r = make_rotation({"kind": "randomized_hadamard", "seed": 1}, config["hidden_size"])
    hd = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    h = make_rotation({"kind": "randomized_hadamard", "seed": 5}, hd)
    d = make_rotation({"kind": "block_hadamard", "seed": 6}, config["intermediate_size"])
    folded, update, online = fold_rotation(w, config, r, head_rotation=h, down_rotation=d)
    assert set(online) == ({"model.layers.0.mlp.down_proj"} if family == "deepseek" else set())
    moved = [k for k in w if (".gate." in k or "experts" in k or "switch_mlp" in k) and k.endswith("weight")]
    assert moved and all(not np.allclose(np.array(folded[k]), np.array(w[k]), atol=1e-4) for k in moved)
    model2, _ = build_model(family)
    model2.load_weights(list(_restack(folded).items()))
    apply_online_rotations(model2, online)
    assert rel(logits(model2), ref) < 1e-4


def test_moe_partial_rotation_is_refused_in_one_line():
    from mlx_dupq.config import RotationSpec
    from mlx_dupq.rotation.plan import plan_rotation
    from tests.tiny import CONFIGS as TINY

    with pytest.raises(DupqError, match="partial rotation.*mixture-of-experts.*remove rotation.layers"):
        plan_rotation(RotationSpec(kind="hadamard", layers=(0,)), TINY["deepseek"], [], lambda k: None)
