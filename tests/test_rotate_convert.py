"""Rotation as a recipe option of the streaming converter (QuaRot folding, online Hadamards)."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

import mlx_dupq
from mlx_dupq.config import QuantSpec, Recipe, RotationSpec, Rule, load_recipe
from mlx_dupq.errors import DupqError
from mlx_dupq.io import pack as packio
from mlx_dupq.layers.online_rotation import RotatedInput
from tests.tiny import interrupt_after, logits, rel_err

Q8 = QuantSpec(bits=8, group_size=32)


def recipe(rotation, spec=Q8, **kw):
    return Recipe(name="rot-test", default=spec, embed=spec, lm_head=spec, rotation=rotation, **kw)


def float_recipe(rotation):
    """Every module kept in float32: the pack is the rotated float model itself."""
    return Recipe(name="rot-float", rules=(Rule(".*", None),), embed=None, lm_head=None, dtype="float32",
                  rotation=rotation)


@pytest.fixture(scope="module")
def refs(tiny_dirs):
    return {t: logits(mlx_dupq.load(tiny_dirs[t])[0]) for t in ("qwen2", "llama")}


def config(path):
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
@pytest.mark.parametrize(
    "rot",
    [
        RotationSpec(),
        RotationSpec(kind="randomized_hadamard", seed=3, head=True, online_down=True),
        RotationSpec(kind="perturbed", eps=0.2, head=True),
        RotationSpec(kind="random_orthogonal", layers=(1,), head=True, online_down=True),
    ],
    ids=["block", "rh-head-down", "perturbed-head", "partial"],
)
def test_rotated_float_pack_keeps_logits(tiny_dirs, refs, tmp_path, model_type, rot):
    out = tmp_path / "pack"
    mlx_dupq.convert(tiny_dirs[model_type], out, float_recipe(rot))
    m, _ = mlx_dupq.load(out)
    assert rel_err(logits(m), refs[model_type]) < 1e-4
    # the norms were fused into the linears (and the rotation folded after them)
    stored = {k: v for f in out.glob("model-*.safetensors") for k, v in mx.load(str(f)).items()}
    assert mx.all(stored["model.layers.1.input_layernorm.weight"] == 1).item()


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_rotated_8bit_is_as_good_as_unrotated_and_opens_in_mlx_lm(tiny_dirs, refs, tmp_path, model_type):
    import mlx_lm

    rot = recipe(RotationSpec(head=True))
    out, plain = tmp_path / "rot", tmp_path / "plain"
    mlx_dupq.convert(tiny_dirs[model_type], out, rot)
    mlx_dupq.convert(tiny_dirs[model_type], plain, recipe(None))
    q, _ = mlx_dupq.load(out)
    y = logits(q)
    assert rel_err(y, refs[model_type]) < 0.02
    assert rel_err(logits(mlx_dupq.load(plain)[0]), refs[model_type]) < 0.02
    assert not mx.allclose(q.model.layers[0].self_attn.q_proj.weight, mlx_dupq.load(plain)[0].model.layers[0].self_attn.q_proj.weight).item()
    cfg = config(out)
    assert cfg["tie_word_embeddings"] is False  # QuaRot unties: lm_head = E diag(g) R
    assert "lm_head" in cfg["mlx_dupq"]["modules"] and "online_rotations" not in cfg["mlx_dupq"]
    assert Recipe.from_dict(cfg["mlx_dupq"]["recipe"]) == rot
    # fully folded: a plain model that mlx-lm opens unchanged
    m2, _ = mlx_lm.load(str(out))
    packio.cast_floats(m2, mx.float32)
    assert rel_err(logits(m2), y) < 1e-3


def test_online_down_pack_loads_through_mlx_dupq(tiny_dirs, refs, tmp_path):
    out = tmp_path / "pack"
    mlx_dupq.convert(tiny_dirs["qwen2"], out, recipe(RotationSpec(online_down=True, head=True)))
    online = config(out)["mlx_dupq"]["online_rotations"]
    assert sorted(online) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert online["model.layers.0.mlp.down_proj"]["kind"] == "block_hadamard"
    m, _ = mlx_dupq.load(out)
    assert isinstance(m.model.layers[1].mlp.down_proj, RotatedInput)
    assert rel_err(logits(m), refs["qwen2"]) < 0.02
    # mlx-lm cannot apply the run-time rotation: it must refuse the pack, not run it wrongly
    import mlx_lm

    with pytest.raises(ValueError, match="linear"):
        mlx_lm.load(str(out))


def test_resume_with_rotation(tiny_dirs, tmp_path, monkeypatch):
    rot = recipe(RotationSpec(online_down=True), spec=QuantSpec(bits=4, group_size=32))
    out = tmp_path / "pack"
    real = interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        mlx_dupq.convert(tiny_dirs["qwen2"], out, rot)
    with pytest.raises(DupqError, match="another model or recipe"):
        mlx_dupq.convert(tiny_dirs["qwen2"], out, recipe(RotationSpec(seed=1, online_down=True)), resume=True)
    monkeypatch.setattr(packio.PartialState, "write_group", real)
    res = mlx_dupq.convert(tiny_dirs["qwen2"], out, rot, resume=True)
    assert res.groups_resumed == 2 and res.groups_total == 3  # embeddings group + 2 layers
    fresh = tmp_path / "fresh"
    mlx_dupq.convert(tiny_dirs["qwen2"], fresh, rot)
    assert config(out)["mlx_dupq"]["online_rotations"] == config(fresh)["mlx_dupq"]["online_rotations"]
    assert mx.array_equal(logits(mlx_dupq.load(out)[0]), logits(mlx_dupq.load(fresh)[0])).item()


def test_moe_model_rotated_whole_keeps_logits(tiny_dirs, tmp_path):
    """The streaming converter folds the residual rotation into a DeepSeek-MoE checkpoint with one
    tensor per expert (router, routed and shared experts; online Hadamard on the dense layer's
    down_proj only): the rotated float pack computes the same logits."""
    ref = logits(mlx_dupq.load(tiny_dirs["deepseek"])[0])
    out = tmp_path / "pack"
    mlx_dupq.convert(tiny_dirs["deepseek"], out, float_recipe(RotationSpec(kind="randomized_hadamard", seed=2,
                                                                           head=True, online_down=True)))
    assert rel_err(logits(mlx_dupq.load(out)[0]), ref) < 1e-4
    assert list(config(out)["mlx_dupq"]["online_rotations"]) == ["model.layers.0.mlp.down_proj"]


def test_moe_partial_and_unsupported_models_are_rejected(tiny_dirs, tmp_path):
    with pytest.raises(DupqError, match="partial rotation.*mixture-of-experts"):
        mlx_dupq.convert(tiny_dirs["deepseek"], tmp_path / "pack", recipe(RotationSpec(layers=[1])))
    with pytest.raises(DupqError, match="layers \\[7\\] do not exist"):
        mlx_dupq.convert(tiny_dirs["llama"], tmp_path / "pack2", recipe(RotationSpec(layers=[7])))


def test_rotation_spec_round_trip_and_errors():
    spec = RotationSpec(kind="block_hadamard", seed=2, block=32, head=True, online_down=True, layers=[3, 1, 1])
    assert spec.layers == (1, 3)
    assert RotationSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    r = recipe(spec)
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert Recipe.from_dict({k: v for k, v in recipe(None).to_dict().items() if k != "rotation"}) == recipe(None)
    assert load_recipe("rtn2").rotation is None
    for name, bits in (("rot-rtn2", 2), ("rot-rtn4", 4)):
        rec = load_recipe(name)
        assert rec.default.bits == bits and rec.embed.bits == 8 and rec.lm_head.bits == 8
        assert rec.rotation == RotationSpec(kind="block_hadamard", online_down=True)
    for bad, msg in (
        ({"kind": "spin"}, "unknown rotation kind"),
        ({"kind": "hadamard", "block": 64}, "only to kind block_hadamard"),
        ({"eps": 0.9}, "out of range"),
        ({"layers": []}, "non-empty"),
        ({"gamma": 50}, "unknown rotation option"),
    ):
        with pytest.raises(DupqError, match=msg):
            RotationSpec.from_dict(bad)


def test_untied_head_is_stored_but_not_counted_as_a_parameter(tiny_dirs, tmp_path):
    """Rotating a tied model unties its head (lm_head = E diag(g) R): the pack stores those bytes,
    but the bpw denominator stays the source model's parameter count (the tied matrix once)."""
    plain = mlx_dupq.convert(tiny_dirs["qwen2"], tmp_path / "plain", recipe(None))
    rot = mlx_dupq.convert(tiny_dirs["qwen2"], tmp_path / "rot", recipe(RotationSpec()))
    assert config(tmp_path / "rot")["tie_word_embeddings"] is False
    assert rot.n_params == plain.n_params
    assert rot.stored_bytes > plain.stored_bytes  # the head's codes and scales
    assert rot.bits_per_weight == pytest.approx(8 * rot.stored_bytes / rot.n_params, rel=0.02)
