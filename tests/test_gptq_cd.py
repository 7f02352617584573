"""GPTQ + coordinate-descent sweeps (``cd_sweeps``): monotone on the layer objective, exact per
coordinate on every grid format, a clear gain over GPTQ on correlated inputs, 0 = plain GPTQ."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_dupq.config import QuantSpec
from mlx_dupq.errors import DupqError
from mlx_dupq.quant.gptq import coordinate_descent, damped_hessian, gptq_quantize, hessian_from_activations, layer_objective
from mlx_dupq.quant.qtensor import dequantize
from mlx_dupq.quant.rtn import rtn_quantize
from mlx_dupq.specs import QuantizerSpec
from tests.test_gptq import outlier_layer, same  # same: QTensors equal (spec, codes, scales, biases)

OUT, IN = 64, 256
FORMATS = [QuantSpec(2, 64), QuantSpec(3, 128), QuantSpec(1.58, 64, True), QuantSpec(1.58, 64), QuantSpec(1, 64, True),
           QuantSpec(1, 32), QuantSpec(4, 32, True), QuantSpec(2, 0), QuantSpec(3, -1)]


@pytest.fixture(scope="module")
def layer():
    """Correlated, outlier-heavy inputs (as tests/test_gptq.py); the first 1024 rows give H, the rest are held out."""
    w, x = outlier_layer(2048, IN, OUT)
    w = mx.concatenate([w[:-1], mx.zeros((1, IN))])  # a zero row: zero scales (code 0 everywhere)
    mx.eval(x, w)
    return w, x[:1024], x[1024:], hessian_from_activations(x[:1024])


def output_error(x, w, qt):
    return mx.sum((x @ (w - dequantize(qt)).T) ** 2).item()


@pytest.mark.parametrize("spec", FORMATS, ids=lambda s: s.label())
def test_objective_never_rises(layer, spec):
    w, _, _, H = layer
    Hd = damped_hessian(H, 0.01)
    for static in (True, False):
        objs = [layer_objective(w, Hd, gptq_quantize(w, H, spec, static_groups=static, cd_sweeps=s)) for s in range(5)]
        print(spec.label(), static, [f"{o:.4f}" for o in objs])
        assert all(b <= a * (1 + 1e-6) for a, b in zip(objs, objs[1:])), objs
        assert objs[-1] < objs[0]


@pytest.mark.parametrize("spec", FORMATS, ids=lambda s: s.label())
def test_each_code_is_the_best_level_given_the_others(layer, spec):
    """After the sweeps converge, no single code can be moved to another level of its grid and lower
    the objective: the nearest-level rule is the exact coordinate minimiser (clipping, negative
    and zero scales, symmetric offsets included). Brute force on 8 rows x 64 inputs."""
    w, x, _, _ = layer
    w, xs = mx.concatenate([w[:7, :64], w[-1:, :64]]), x[:, :64]  # keeps the zero row
    Hd = damped_hessian(hessian_from_activations(xs), 0.01)
    qt = coordinate_descent(w, Hd, rtn_quantize(w, spec), sweeps=60, block_size=24)
    W, V = np.array(w, dtype=np.float64), np.array(dequantize(qt), dtype=np.float64)
    codes = np.array(qt.codes)
    H64 = Hd.astype(np.float64)
    levels = np.arange(spec.levels)
    g = qt.group
    s = np.array(qt.scales.astype(mx.float32)).reshape(8, -1)
    b = np.array(qt.offsets()).reshape(8, -1)
    for r in range(8):
        res = W[r] - V[r]
        base = res @ H64 @ res
        for j in range(64):
            k = j // g if s.shape[1] > 1 else 0
            if s[r, k] == 0:
                assert codes[r, j] == 0
                continue
            for q in levels:
                trial = res.copy()
                trial[j] = W[r, j] - (q * s[r, k] + b[r, k])
                assert trial @ H64 @ trial >= base - 1e-9 * max(base, 1e-12), (r, j, q, codes[r, j])


@pytest.mark.parametrize("spec", [QuantSpec(2, 64), QuantSpec(1.58, 64, True), QuantSpec(3, -1)], ids=lambda s: s.label())
def test_identity_hessian_keeps_rtn(spec):
    w = mx.random.normal((16, 512), key=mx.random.key(4))
    assert same(gptq_quantize(w, mx.eye(512), spec, cd_sweeps=3), rtn_quantize(w, spec, mx.float16))


def test_zero_sweeps_is_plain_gptq(layer):
    w, _, _, H = layer
    for spec in (QuantSpec(2, 64), QuantSpec(1.58, 64, True)):
        for act_order in (True, False):
            plain = gptq_quantize(w, H, spec, act_order=act_order)
            assert same(gptq_quantize(w, H, spec, act_order=act_order, cd_sweeps=0), plain)
            assert same(coordinate_descent(w, damped_hessian(H, 0.01), plain, sweeps=0), plain)


@pytest.mark.parametrize("spec", [QuantSpec(2, 64), QuantSpec(1.58, 64, True)], ids=lambda s: s.label())
def test_sweeps_lower_the_output_error_vs_gptq(layer, spec):
    w, x, held, H = layer
    gptq = gptq_quantize(w, H, spec)
    cd = gptq_quantize(w, H, spec, cd_sweeps=4)
    fit, out = output_error(x, w, cd) / output_error(x, w, gptq), output_error(held, w, cd) / output_error(held, w, gptq)
    print(f"{spec.label()}: GPTQ+CD4 / GPTQ output error: calibration {fit:.3f}, held out {out:.3f}")
    assert fit < 0.95
    assert out < 0.98


def test_row_chunks_and_blocks_do_not_change_the_result(layer, monkeypatch):
    from mlx_dupq.quant import gptq
    w, _, _, H = layer
    Hd = damped_hessian(H, 0.01)
    start = gptq_quantize(w, H, QuantSpec(2, 64))
    want = coordinate_descent(w, Hd, start, sweeps=2, block_size=128)
    got = coordinate_descent(w, Hd, start, sweeps=2, block_size=1)
    assert mx.mean(got.codes == want.codes).item() > 0.999  # same maths, float rounding of G only
    monkeypatch.setattr(gptq, "ROW_CHUNK", 20)
    assert same(coordinate_descent(w, Hd, start, sweeps=2, block_size=128), want)


def test_dead_columns_keep_their_rtn_codes(layer):
    w, x, _, _ = layer
    dead = np.arange(0, IN, 17)
    mask = np.ones(IN, dtype=np.float32)
    mask[dead] = 0
    H = hessian_from_activations(x * mx.array(mask))
    spec = QuantSpec(2, 64)
    qt = gptq_quantize(w, H, spec, cd_sweeps=2)
    d = mx.array(dead)
    assert mx.array_equal(qt.codes[:, d], rtn_quantize(w, spec).codes[:, d]).item()


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_sweeps_raise(layer, bad):
    w, _, _, H = layer
    with pytest.raises(DupqError, match="cd_sweeps"):
        gptq_quantize(w, H, QuantSpec(2, 64), cd_sweeps=bad)
    with pytest.raises(DupqError, match="cd_sweeps"):
        QuantizerSpec(method="gptq", cd_sweeps=bad)


def test_recipe_option_round_trips_and_is_checked():
    q = QuantizerSpec.from_dict({"method": "gptq", "cd_sweeps": 3})
    assert q.cd_sweeps == 3 and QuantizerSpec.from_dict(q.to_dict()) == q
    assert QuantizerSpec.from_dict({"method": "gptq"}).cd_sweeps == 0  # older recipes and packs: plain GPTQ
    with pytest.raises(DupqError, match="cd_sweeps"):
        QuantizerSpec.from_dict({"method": "gptq", "cd_sweeps": -1})
    with pytest.raises(DupqError, match="cd_sweep"):
        QuantizerSpec.from_dict({"method": "gptq", "cd_sweep": 1})
