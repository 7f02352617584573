"""Scale / zero-point search (never worse than range init) and the rounding variants."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_dupq.config import QuantSpec
from mlx_dupq.errors import DupqError
from mlx_dupq.quant.qtensor import dequantize
from mlx_dupq.quant.rounding import grid_offset_quantize, noise_quantize, stochastic_round_quantize
from mlx_dupq.quant.rtn import rtn_quantize
from mlx_dupq.quant.scales import (
    DEFAULT_GRID,
    activation_importance,
    activation_weighted_search,
    mse_scale_search,
    zero_point_search,
)

SPECS = [QuantSpec(b, g, s) for b in (1, 1.58, 2, 3, 4) for g in (64, 0, -1) for s in (False, True)]


def heavy_tailed(shape, seed):
    k1, k2 = mx.random.split(mx.random.key(seed))
    return mx.random.normal(shape, key=k1) / mx.sqrt(mx.random.uniform(0.05, 1.0, shape, key=k2))


def err(w, qt, imp=None):
    d = (w - dequantize(qt)) ** 2
    return mx.sum(d if imp is None else d * imp).item()


def test_default_grid_spans_half_to_double_with_one():
    assert DEFAULT_GRID[0] == 0.5 and DEFAULT_GRID[-1] == 2.0 and 1.0 in DEFAULT_GRID and len(DEFAULT_GRID) >= 20


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
def test_search_never_worse_than_range_init(spec):
    w = heavy_tailed((16, 256), 1)
    imp = activation_importance(heavy_tailed((64, 256), 2))
    base = err(w, rtn_quantize(w, spec))
    assert err(w, mse_scale_search(w, spec)) <= base * (1 + 1e-6)
    base_w = err(w, rtn_quantize(w, spec), imp)
    assert err(w, activation_weighted_search(w, imp, spec), imp) <= base_w * (1 + 1e-6)
    if not spec.symmetric:
        assert err(w, zero_point_search(w, spec)) <= base * (1 + 1e-6)


@pytest.mark.parametrize("spec", [QuantSpec(2, 64), QuantSpec(3, 128, True), QuantSpec(4, 0), QuantSpec(2, -1)], ids=lambda s: s.label())
def test_search_lowers_weight_error(spec):
    w = heavy_tailed((32, 512), 3)
    base = err(w, rtn_quantize(w, spec))
    searched = err(w, mse_scale_search(w, spec))
    print(f"{spec.label()}: MSE search / RTN weight error {searched / base:.3f}")
    assert searched < 0.95 * base
    if not spec.symmetric:
        joint = err(w, zero_point_search(w, spec, grid=DEFAULT_GRID))
        print(f"{spec.label()}: joint scale+zero search / RTN {joint / base:.3f}")
        assert joint <= searched * (1 + 1e-6)


def test_activation_weighted_search_beats_plain_mse_search_on_weighted_error():
    w = heavy_tailed((32, 512), 4)
    x = mx.random.normal((256, 512), key=mx.random.key(5)) * mx.where(mx.arange(512) % 11 == 0, 30.0, 1.0)
    imp = activation_importance(x)
    for spec in (QuantSpec(2, 64), QuantSpec(1.58, 128, True), QuantSpec(3, 0)):
        plain = err(w, mse_scale_search(w, spec), imp)
        weighted = err(w, activation_weighted_search(w, imp, spec), imp)
        print(f"{spec.label()}: weighted error, AWQ-like / MSE search {weighted / plain:.3f}")
        assert weighted < 0.97 * plain


def test_search_rejects_bad_requests():
    w = heavy_tailed((4, 64), 6)
    with pytest.raises(DupqError):
        zero_point_search(w, QuantSpec(2, 64, True))
    with pytest.raises(DupqError):
        activation_weighted_search(w, mx.ones((32,)), QuantSpec(2, 64))
    with pytest.raises(DupqError):
        mse_scale_search(w, QuantSpec(2, 64), grid=(0.0, 1.0))


# ---------------------------------------------------------------- rounding


@pytest.mark.parametrize("spec", [QuantSpec(4, 64, True), QuantSpec(2, 64, True), QuantSpec(3, 0, True)], ids=lambda s: s.label())
def test_stochastic_rounding_is_unbiased(spec):
    w = mx.random.normal((4, 128), key=mx.random.key(7))
    n = 400
    tiled = mx.tile(w, (n, 1))  # n independent roundings of the same rows (same RTN grid per row)
    mean = mx.mean(dequantize(stochastic_round_quantize(tiled, spec, seed=0)).reshape(n, 4, 128), axis=0)
    step = mx.repeat(rtn_quantize(w, spec).scales.astype(mx.float32), spec.group_for(128), axis=-1)
    bias = mx.abs(mean - w) / step
    rtn_bias = mx.abs(dequantize(rtn_quantize(w, spec)) - w) / step
    assert mx.mean(bias).item() < 0.03 < mx.mean(rtn_bias).item()
    assert mx.max(bias).item() < 0.15


def test_stochastic_rounding_is_deterministic_per_seed():
    w = mx.random.normal((8, 128), key=mx.random.key(8))
    spec = QuantSpec(2, 64)
    a, b, c = (stochastic_round_quantize(w, spec, s) for s in (3, 3, 4))
    assert mx.array_equal(a.codes, b.codes).item()
    assert not mx.array_equal(a.codes, c.codes).item()
    assert mx.array_equal(a.scales, rtn_quantize(w, spec).scales).item()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
def test_zero_offset_and_zero_noise_equal_rtn(spec):
    w = heavy_tailed((8, 256), 9)
    rtn = rtn_quantize(w, spec)
    for qt in (grid_offset_quantize(w, spec, 0.0), noise_quantize(w, spec, 0.0, seed=1)):
        assert mx.array_equal(qt.codes, rtn.codes).item() and mx.array_equal(qt.scales, rtn.scales).item()


def test_grid_offset_folds_into_bias():
    w = heavy_tailed((8, 256), 10)
    spec = QuantSpec(2, 64)
    rtn, shifted = rtn_quantize(w, spec), grid_offset_quantize(w, spec, 0.5)
    want = (rtn.biases.astype(mx.float32) + 0.5 * rtn.scales.astype(mx.float32)).astype(mx.float16)
    assert mx.array_equal(shifted.biases, want).item() and mx.array_equal(shifted.scales, rtn.scales).item()
    assert not mx.array_equal(shifted.codes, rtn.codes).item()
    with pytest.raises(DupqError):
        grid_offset_quantize(w, QuantSpec(2, 64, True), 0.25)
    with pytest.raises(DupqError):
        grid_offset_quantize(w, spec, 0.7)


def test_noise_moves_codes_by_at_most_one_step():
    w = heavy_tailed((8, 256), 11)
    spec = QuantSpec(3, 64)
    rtn, noisy = rtn_quantize(w, spec), noise_quantize(w, spec, 0.5, seed=2)
    diff = mx.abs(noisy.codes.astype(mx.int32) - rtn.codes.astype(mx.int32))
    assert 0 < mx.sum(diff).item() and mx.max(diff).item() <= 1
    assert mx.array_equal(noisy.codes, noise_quantize(w, spec, 0.5, seed=2).codes).item()
    with pytest.raises(DupqError):
        noise_quantize(w, spec, 0.6, seed=0)
