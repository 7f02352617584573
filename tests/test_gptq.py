"""GPTQ: equals RTN for H = I, lowers a layer's output error vs RTN, packs and runs unchanged."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_dupq.config import QuantSpec
from mlx_dupq.errors import DupqError
from mlx_dupq.layers.quant_linear import build_module
from mlx_dupq.quant.gptq import HessianAccumulator, gptq_quantize, hessian_from_activations
from mlx_dupq.quant.bitpack import pack
from mlx_dupq.quant.qtensor import dequantize
from mlx_dupq.quant.rtn import rtn_quantize

OUT, IN = 64, 256


def same(a, b):
    return a.spec == b.spec and mx.array_equal(a.codes, b.codes).item() and mx.array_equal(a.scales, b.scales).item() and (
        (a.biases is None and b.biases is None) or mx.array_equal(a.biases, b.biases).item()
    )


def outlier_layer(rows: int, n_in: int = IN, n_out: int = OUT) -> tuple[mx.array, mx.array]:
    """A random (n_out, n_in) weight and ``rows`` correlated, outlier-heavy inputs (every 37th
    channel 20x larger), seeded."""
    k = mx.random.normal((n_in, n_in), key=mx.random.key(1)) * 0.3 + mx.eye(n_in)
    x = mx.random.normal((rows, n_in), key=mx.random.key(2)) @ k
    x = x * mx.where(mx.arange(n_in) % 37 == 0, 20.0, 1.0)
    w = mx.random.normal((n_out, n_in), key=mx.random.key(3)) * 0.02
    mx.eval(x, w)
    return w, x


@pytest.fixture(scope="module")
def layer():
    """A random layer and correlated, outlier-heavy inputs (every 37th channel 20x larger)."""
    w, x = outlier_layer(1024)
    return w, x, hessian_from_activations(x)


def output_error(x, w, qt):
    return mx.sum((x @ (w - dequantize(qt)).T) ** 2).item()


IDENTITY_SPECS = [
    QuantSpec(b, g, s)
    for b in (1, 1.58, 2, 3, 4, 8)
    for g in (32, 128, 512, 0, -1)
    for s in (False, True)
]


@pytest.mark.parametrize("spec", IDENTITY_SPECS, ids=lambda s: s.label())
def test_identity_hessian_equals_rtn(spec):
    w = mx.random.normal((16, 512), key=mx.random.key(4))
    rtn = rtn_quantize(w, spec, mx.float16)
    for act_order in (False, True):
        for static in (False, True):
            qt = gptq_quantize(w, mx.eye(512), spec, act_order=act_order, static_groups=static, block_size=48)
            assert same(qt, rtn), (act_order, static)


REDUCE_SPECS = [QuantSpec(b, g, s) for b in (2, 3, 4) for g in (64, 128, 0) for s in (False,)] + [
    QuantSpec(b, g, s) for b in (1, 1.58) for g in (64, 128, 0) for s in (False, True)
]


@pytest.mark.parametrize("spec", REDUCE_SPECS, ids=lambda s: s.label())
def test_gptq_lowers_output_error(layer, spec):
    w, x, H = layer
    base = output_error(x, w, rtn_quantize(w, spec))
    for act_order in (False, True):
        ratio = output_error(x, w, gptq_quantize(w, H, spec, act_order=act_order)) / base
        print(f"{spec.label()} act_order={act_order}: GPTQ/RTN output error {ratio:.3f}")
        assert ratio < 0.9


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dynamic_groups_with_act_order_lower_output_error(layer, bits):
    w, x, H = layer
    spec = QuantSpec(bits, 64)
    ratio = output_error(x, w, gptq_quantize(w, H, spec, static_groups=False)) / output_error(x, w, rtn_quantize(w, spec))
    print(f"{spec.label()} dynamic groups: GPTQ/RTN output error {ratio:.3f}")
    assert ratio < 0.9


@pytest.mark.parametrize("spec", [QuantSpec(2, 64), QuantSpec(1.58, 64, True), QuantSpec(3, 256), QuantSpec(1, 0, True)], ids=lambda s: s.label())
def test_packed_gptq_runs_in_layer(layer, spec):
    w, x, H = layer
    qt = gptq_quantize(w, H, spec)
    arrays, entry = pack(qt)
    m = build_module("linear", (OUT, IN), entry)
    m.load_weights(list(arrays.items()))
    want = x[:8] @ dequantize(qt).T
    got = m(x[:8])
    assert mx.max(mx.abs(got - want)).item() <= 1e-4 * mx.max(mx.abs(want)).item()


def test_accumulator_streams_batches():
    x = mx.random.normal((3, 40, 32), key=mx.random.key(5))
    acc = HessianAccumulator(32)
    acc.add(x[0])
    acc.add(x[1:])
    want = x.reshape(-1, 32).T @ x.reshape(-1, 32) / 120
    assert mx.allclose(acc.finalize(), want, atol=1e-5).item()
    assert mx.allclose(hessian_from_activations(x), want, atol=1e-5).item()
    with pytest.raises(DupqError):
        acc.add(mx.zeros((4, 16)))
    with pytest.raises(DupqError):
        HessianAccumulator(8).finalize()


def test_dead_columns_keep_their_rtn_codes(layer):
    w, x, _ = layer
    dead = np.arange(0, IN, 17)
    mask = np.ones(IN, dtype=np.float32)
    mask[dead] = 0
    H = hessian_from_activations(x * mx.array(mask))
    spec = QuantSpec(2, 64)
    qt = gptq_quantize(w, H, spec)
    assert mx.all(mx.isfinite(dequantize(qt))).item()
    d = mx.array(dead)
    assert mx.array_equal(qt.codes[:, d], rtn_quantize(w, spec).codes[:, d]).item()
    assert not mx.array_equal(qt.codes, rtn_quantize(w, spec).codes).item()


def test_bad_inputs_raise():
    w = mx.random.normal((8, 4), key=mx.random.key(6))
    with pytest.raises(DupqError):
        gptq_quantize(w, mx.eye(8), QuantSpec(2, 0))
    with pytest.raises(DupqError):
        gptq_quantize(w[None], mx.eye(4), QuantSpec(2, 0))
    indefinite = mx.eye(4) + 5000.0 * (mx.ones((4, 4)) - mx.eye(4))  # eigenvalue -4999
    with pytest.raises(DupqError):
        gptq_quantize(w, indefinite, QuantSpec(2, 0))
