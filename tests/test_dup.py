"""Layer duplication (SPEC F5): copies, aggregation, serial runtime with KV cache, scores, plans, sizes."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_dupq.config import QuantSpec
from mlx_dupq.dup import plans
from mlx_dupq.dup.aggregate import hessian_of
from mlx_dupq.dup.copies import collapse_shared, copy_bits, effective_weight, load_copies, make_copies, pack_copies
from mlx_dupq.dup.runtime import (
    copies_run, dup_linear, duplicate_layers, duplicate_linears, layout, quantized_layer_copies,
)
from mlx_dupq.dup.scores import layer_scores, measured_truth, spearman
from mlx_dupq.dup.specs import CopySpec, DupPlan
from mlx_dupq.errors import DupqError
from mlx_dupq.layers.dup_linear import DupLinear
from mlx_dupq.quant.qtensor import dequantize
from mlx_dupq.quant.rounding import grid_offset_quantize, noise_quantize, stochastic_round_quantize
from tests.tiny import VOCAB, build_model

S2 = QuantSpec(bits=2, group_size=32)


def _w(out=64, n=128, seed=0):
    rng = np.random.default_rng(seed)
    return mx.array((rng.standard_normal((out, n)) * 0.05).astype(np.float32))


def _x(t=96, n=128, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, n)).astype(np.float32)
    x[:, 3] *= 10  # an outlier channel, like real activations
    return mx.array(x)


def _rel(a, b):
    return float(mx.sqrt(mx.sum(mx.square(a - b))).item() / mx.sqrt(mx.sum(mx.square(b))).item())


def test_spec_round_trip():
    c = CopySpec(quant=QuantSpec(3, 64, True), rotation={"kind": "perturbed", "seed": 2, "eps": 0.05},
                 scale_mult=1.05, grid_offset=0.25, stochastic_seed=3, noise=0.1, noise_seed=4,
                 act_clip=0.9, act_bits=6)
    assert CopySpec.from_dict(c.to_dict()) == c
    p = DupPlan(mode="parallel", aggregation="learned", copies={3: [CopySpec(), CopySpec(scale_mult=0.95, shared_codes=True)], 1: 2},
                early_stop=0.01, max_copies=2)
    q = DupPlan.from_dict(p.to_dict())
    assert q == p and list(q.copies) == [1, 3] and q.count(1) == 2 and q.count(7) == 1
    import json
    assert DupPlan.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(DupqError):
        DupPlan(mode="residual", copies={0: [CopySpec(), CopySpec(shared_codes=True)]})
    with pytest.raises(DupqError):
        CopySpec.from_dict({"scale": 1.0})
    with pytest.raises(DupqError):
        DupPlan(copies={0: 2}).check(0)


def test_single_variant_copies_equal_existing_rounding():
    w = _w()
    off, sr, nz = make_copies(w, S2, [CopySpec(grid_offset=0.25), CopySpec(stochastic_seed=5), CopySpec(noise=0.3, noise_seed=2)])
    for got, ref in ((off, grid_offset_quantize(w, S2, 0.25)), (sr, stochastic_round_quantize(w, S2, 5)),
                     (nz, noise_quantize(w, S2, 0.3, 2))):
        assert mx.array_equal(got.codes, ref.codes) and mx.array_equal(got.scales, ref.scales)
        assert mx.array_equal(got.biases, ref.biases)


def test_parallel_mean_of_identical_copies_equals_one_copy():
    w, x = _w(), _x()
    b = mx.zeros((64,)) + 0.1
    one = dup_linear(w, b, S2, [CopySpec()])
    three = dup_linear(w, b, S2, [CopySpec()] * 3)
    assert mx.allclose(one(x), three(x), atol=1e-5)


def test_residual_copies_reduce_weight_error():
    w, x = _w(), _x()
    errs = []
    for n in (1, 2, 3):
        qts = make_copies(w, S2, [CopySpec()] * n, residual=True)
        errs.append(_rel(sum(effective_weight(q, None) for q in qts), w))
    assert errs[0] > errs[1] > errs[2]
    # 2 x 2-bit residual beats 1 x 2-bit at the output too (and is a real module)
    y = x @ w.T
    assert _rel(dup_linear(w, None, S2, [CopySpec()] * 2, mode="residual")(x), y) < _rel(dup_linear(w, None, S2, [CopySpec()])(x), y)


@pytest.mark.parametrize("agg", ["variance_weighted", "learned", "selective"])
def test_fitted_aggregation_never_worse_than_mean(agg):
    w, x = _w(), _x()
    specs = plans.diversify(3, "scale")
    h = hessian_of(x)
    y = x @ w.T
    mean = dup_linear(w, None, S2, specs, aggregation="mean")
    fit = dup_linear(w, None, S2, specs, aggregation=agg, hessian=h)
    assert _rel(fit(x), y) <= _rel(mean(x), y) + 1e-6
    with pytest.raises(DupqError):
        dup_linear(w, None, S2, specs, aggregation=agg)  # needs calibration


def test_rotated_copy_computes_the_same_function():
    w, x = _w(), _x()
    rot = CopySpec(rotation={"kind": "perturbed", "seed": 1, "eps": 0.05})
    lin = dup_linear(w, None, QuantSpec(bits=8, group_size=32), [rot])
    assert _rel(lin(x), x @ w.T) < 0.02
    plain = dup_linear(w, None, S2, [CopySpec()])
    assert not mx.allclose(dup_linear(w, None, S2, [rot])(x), plain(x), atol=1e-4)  # a different copy


def test_shared_codes_counted_once_and_collapse():
    w, x = _w(), _x()
    specs = [CopySpec(), CopySpec(scale_mult=1.05, shared_codes=True), CopySpec(grid_offset=0.25, shared_codes=True)]
    packed = pack_copies(w, S2, specs)
    bits = copy_bits(packed)
    own = pack_copies(w, S2, [CopySpec(), CopySpec(scale_mult=1.05), CopySpec(grid_offset=0.25)])
    code_bits = 8 * packed[0][0]["weight"].nbytes
    assert bits[0] == copy_bits(own)[0] and bits[1] == bits[0] - code_bits and bits[2] == bits[1]
    assert sum(copy_bits(own)) - sum(bits) == 2 * code_bits
    mods = load_copies(w.shape, packed)
    assert mods[1]["weight"] is mods[0]["weight"]  # one buffer in memory
    # parallel mean of shared-code copies == one layer with the mean scales/biases
    qts = make_copies(w, S2, specs)
    one = collapse_shared(qts, dtype=mx.float32)
    lin = DupLinear(mods)
    assert mx.allclose(lin(x), x @ dequantize(one).T, atol=1e-3)
    with pytest.raises(DupqError):
        make_copies(w, S2, [CopySpec(), CopySpec(quant=QuantSpec(3, 32), shared_codes=True)])


def test_dynamic_early_stop_counts_copies():
    w, x = _w(), _x()
    same = dup_linear(w, None, S2, [CopySpec()] * 4, early_stop=1e-3)
    y = same(x)
    assert same.copies_run == 2 and same.calls == 1  # copies agree: stop after the second
    assert mx.allclose(y, dup_linear(w, None, S2, [CopySpec()])(x), atol=1e-5)
    diff = dup_linear(w, None, S2, plans.diversify(4, "offset"), early_stop=1e-6)
    diff(x)
    assert diff.copies_run == 4
    budget = dup_linear(w, None, S2, [CopySpec()] * 4, max_copies=1)
    budget(x)
    assert budget.copies_run == 1
    res = dup_linear(w, None, S2, [CopySpec()] * 3, mode="residual", early_stop=0.5)
    res(x)
    assert res.copies_run == 2  # the second residual already adds < 50 %


def _greedy_matches_full_forward(model, prompt, steps=6):
    from mlx_lm.generate import generate_step

    toks = list(prompt)
    gen = []
    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=steps, sampler=lambda lp: mx.argmax(lp, axis=-1)):
        gen.append(int(tok))
    for t in gen:
        full = model(mx.array([toks]))
        assert int(mx.argmax(full[0, -1]).item()) == t
        toks.append(t)
    return gen


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_serial_copies_keep_kv_generation_equal_to_full_forward(model_type):
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = build_model(model_type)
    plan = DupPlan(mode="serial", copies={1: [CopySpec(), CopySpec(scale_mult=1.05, shared_codes=True),
                                              CopySpec(grid_offset=0.25)]})
    duplicate_layers(model, plan, quantized_layer_copies(QuantSpec(bits=4, group_size=32), mx.float32))
    assert layout(model) == [(0, 0), (1, 0), (1, 1), (1, 2)]
    assert len(model.layers) == 4 and len(make_prompt_cache(model)) == 4
    _greedy_matches_full_forward(model, [1, 5, 9, 13, 2])
    # the cached logits themselves equal the full forward's
    cache = make_prompt_cache(model)
    seq = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    a = model(seq[:, :5], cache=cache)
    b = model(seq[:, 5:], cache=cache)
    full = model(seq)
    assert mx.allclose(mx.concatenate([a, b], axis=1), full, atol=1e-4)
    with pytest.raises(DupqError):
        duplicate_layers(model, plan, quantized_layer_copies(S2))


def test_parallel_plan_in_a_model_and_counter():
    model, _ = build_model("qwen2")
    plan = DupPlan(mode="parallel", copies={0: [CopySpec()] * 3}, early_stop=1e-3)
    duplicate_linears(model, plan, QuantSpec(bits=4, group_size=32), mx.float32)
    out = model(mx.array([[1, 2, 3]]))
    assert out.shape == (1, 3, VOCAB)
    runs = copies_run(model)
    assert set(runs) == {f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                          "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert all(r == (2, 1) for r in runs.values())


def test_scores_and_truth():
    model, _ = build_model("llama")
    tokens = mx.array(np.random.default_rng(0).integers(0, 96, (2, 16)))
    sc = layer_scores(model, tokens, S2)
    assert len(sc) == 2 and all(np.isfinite([s.error, s.sensitivity, s.massive, s.score]).all() for s in sc)
    assert all(s.score > 0 and 0 < s.error < 1 for s in sc)
    truth = measured_truth(model, tokens, S2)
    assert len(truth) == 2 and all(t["kl"] > 0 and np.isfinite(t["ppl_increase"]) for t in truth)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isfinite(spearman([s.score for s in sc], [t["kl"] for t in truth]))


def test_plan_constructors():
    scores = [0.1, 0.5, 0.3, 0.9, 0.2, 0.8, 0.05, 0.4, 0.7, 0.6]
    assert plans.global_plan(4).layers == [0, 1, 2, 3]
    assert plans.selective_plan(scores, 0.3).layers == [3, 5, 8]
    assert plans.selective_plan(scores, 0.5).layers == [1, 3, 5, 8, 9]
    crit = plans.critical_plan(scores, 2)
    assert crit.layers == [3, 5] and crit.count(3) == 3
    last = plans.last_n_plan(10, 3, copies=5)
    assert last.layers == [7, 8, 9] and last.count(9) == 5
    prog = plans.progressive_plan(9, front=1, middle=2, back=3)
    assert prog.layers == [3, 4, 5, 6, 7, 8] and prog.count(4) == 2 and prog.count(8) == 3 and prog.count(0) == 1
    ex = plans.explicit_plan({2: 3, 5: [CopySpec(), CopySpec(grid_offset=0.5)]}, mode="residual")
    assert ex.layers == [2, 5] and ex.mode == "residual" and ex.copies[5][1].grid_offset == 0.5
    assert [c.scale_mult for c in plans.diversify(3, "scale")] == [1.0, 1.05, 0.95]
    assert [c.grid_offset for c in plans.diversify(3, "offset")] == [0.0, 0.25, 0.5]
    with pytest.raises(DupqError):
        plans.last_n_plan(10, 3, copies=6)
    with pytest.raises(DupqError):
        plans.global_plan(4).check(3)
