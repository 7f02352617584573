"""RTN quantizers against an independent NumPy reference, and against mx.quantize."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from mlx_dupq.config import QuantSpec
from mlx_dupq.errors import DupqError
from mlx_dupq.quant import rtn
from mlx_dupq.quant.bitpack import unpack_bits
from mlx_dupq.quant.qtensor import QTensor, dequantize
from mlx_dupq.quant.rtn import rtn_quantize

BITS = (1, 1.58, 2, 3, 4, 8)
GROUPS = (32, 64, 128, 256, 512, 0, -1)
F32 = np.float32


# ---------------------------------------------------------------- numpy reference


def np_params(wg: np.ndarray, bits: float, symmetric: bool):
    """wg (..., n, g) float32 -> float32 (scale, offset-or-None) per group, before storage rounding."""
    absw = np.abs(wg)
    if bits == 1.58:
        centre = np.zeros(wg.shape[:-1], F32)
        if not symmetric:  # levels centre + {-s, 0, s} around the group mean
            const = wg.max(-1) == wg.min(-1)
            centre = np.where(const, wg.min(-1), wg.mean(-1, dtype=F32)).astype(F32)
            absw = np.abs(wg - centre[..., None])
        s = np.zeros(wg.shape[:-1], F32)
        thr = F32(0.7) * absw.mean(-1, dtype=F32)
        for i in range(4):  # TWN init, then 3 Lloyd steps on the nearest-level threshold s/2
            m = absw > thr[..., None]
            cnt = m.sum(-1)
            s = np.where(cnt > 0, (absw * m).sum(-1, dtype=F32) / np.maximum(cnt, 1), s).astype(F32)
            thr = s / F32(2)
        return s, (None if symmetric else (centre - s).astype(F32))
    if bits == 1 and symmetric:
        return (F32(2) * absw.mean(-1, dtype=F32)).astype(F32), None
    if bits == 1:
        mu = wg.mean(-1, dtype=F32, keepdims=True)
        up = wg > mu
        n_up = up.sum(-1)
        lo = (wg * ~up).sum(-1, dtype=F32) / np.maximum(wg.shape[-1] - n_up, 1)
        hi = np.where(n_up > 0, (wg * up).sum(-1, dtype=F32) / np.maximum(n_up, 1), lo)
        const = wg.max(-1) == wg.min(-1)
        lo = np.where(const, wg.min(-1), lo).astype(F32)
        hi = np.where(const, wg.min(-1), hi).astype(F32)
        return (hi - lo).astype(F32), lo
    levels = 2 ** int(bits)
    if symmetric:
        return (absw.max(-1) / F32((levels - 1) / 2)).astype(F32), None
    # mlx's affine rule, written from its C++ reference (backend/cpu/quantized.cpp)
    n_bins = F32(levels - 1)
    w_max, w_min = wg.max(-1), wg.min(-1)
    mask = np.abs(w_min) > np.abs(w_max)
    s = np.maximum((w_max - w_min) / n_bins, F32(1e-7)).astype(F32)
    s = np.where(mask, s, -s)
    edge = np.where(mask, w_min, w_max)
    with np.errstate(divide="ignore", invalid="ignore"):
        q0 = np.rint(edge / s)
        s = np.where(q0 != 0, edge / q0, s).astype(F32)
    b = np.where(q0 != 0, edge, F32(0)).astype(F32)
    return s, b


def np_quantize(w: np.ndarray, bits: float, group: int, symmetric: bool, store=np.float16):
    """-> codes (..., in), scales, offsets (..., n_groups) as float32 (already storage-rounded)."""
    levels = 3 if bits == 1.58 else 2 ** int(bits)
    n = w.shape[-1]
    w = w.astype(F32)
    if group == -1:
        wg = w.reshape(1, 1, -1)
    else:
        g = n if group == 0 else group
        wg = w.reshape(*w.shape[:-1], n // g, g)
    s, b = np_params(wg, bits, symmetric)
    s = s.astype(store).astype(F32)
    if symmetric:
        b = (-(s * F32((levels - 1) / 2))).astype(store).astype(F32)
    else:
        b = b.astype(store).astype(F32)
    if group == -1:
        s = np.broadcast_to(s.reshape(1), (*w.shape[:-1], 1))
        b = np.broadcast_to(b.reshape(1), (*w.shape[:-1], 1))
        wg = w.reshape(*w.shape[:-1], 1, n)
    safe = np.where(s == 0, F32(1), s)[..., None]
    q = np.rint((wg - b[..., None]) / safe)
    q = np.where(s[..., None] == 0, 0, q)
    q = np.clip(q, 0, levels - 1).astype(np.uint8)
    return q.reshape(w.shape), s, b


def np_dequant(q, s, b):
    g = q.shape[-1] // s.shape[-1]
    qg = q.reshape(*q.shape[:-1], s.shape[-1], g).astype(F32)
    return (qg * s[..., None] + b[..., None]).reshape(q.shape)


def weights(shape, seed=0) -> np.ndarray:
    """Gaussian weights with a few outliers and rows that are all positive / all negative."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(F32) * F32(0.05)
    flat = w.reshape(-1, shape[-1])
    flat[0] = np.abs(flat[0]) + F32(0.1)
    flat[1] = -np.abs(flat[1]) - F32(0.02)
    idx = rng.integers(0, w.size, size=max(1, w.size // 500))
    w.reshape(-1)[idx] *= F32(12)
    return w


# ---------------------------------------------------------------- tests


MINMAX_BASED = {2, 3, 4, 8}


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", (False, True))
@pytest.mark.parametrize("group", GROUPS)
def test_matches_numpy_reference(bits, symmetric, group):
    w = weights((6, 1024), seed=int(bits * 100) + group + 7)
    qt = rtn_quantize(mx.array(w), QuantSpec(bits=bits, group_size=group, symmetric=symmetric), dtype=mx.float16)
    q_ref, s_ref, b_ref = np_quantize(w, bits, group, symmetric)
    codes = np.array(qt.codes)
    scales = np.array(qt.scales.astype(mx.float32))
    offsets = np.array(qt.offsets())
    assert qt.scales.dtype == mx.float16
    assert (qt.biases is None) == symmetric
    assert scales.shape == s_ref.shape
    exact = int(bits) in MINMAX_BASED and bits != 1.58
    if exact:  # max/min reductions are order-free: bit-identical parameters and codes
        np.testing.assert_array_equal(scales, s_ref)
        np.testing.assert_array_equal(offsets, b_ref)
        np.testing.assert_array_equal(codes, q_ref)
    else:  # means: float32 summation order may move a parameter by one storage ulp
        np.testing.assert_allclose(scales, s_ref, rtol=2**-10, atol=0)
        np.testing.assert_allclose(offsets, b_ref, rtol=2**-10, atol=1e-7)
        assert np.mean(codes == q_ref) > 0.999
    deq = np.array(dequantize(qt))
    ref = np_dequant(q_ref, s_ref, b_ref)
    step = np.abs(s_ref).max()
    assert np.all(np.abs(deq - ref) <= (0 if exact else step * 1.01))
    assert np.all(np.isfinite(deq))


@pytest.mark.parametrize("spec", [QuantSpec(2, 64), QuantSpec(1.58, 128, True), QuantSpec(3, 0, True), QuantSpec(4, -1)])
def test_three_d_experts_match_reference(spec):
    w = weights((3, 8, 512), seed=3)
    qt = rtn_quantize(mx.array(w), spec, dtype=mx.float16)
    q_ref, s_ref, b_ref = np_quantize(w, spec.bits, spec.group_size, spec.symmetric)
    assert qt.codes.shape == (3, 8, 512)
    assert qt.scales.shape == s_ref.shape
    assert np.mean(np.array(qt.codes) == q_ref) > 0.999
    np.testing.assert_allclose(np.array(dequantize(qt)), np_dequant(q_ref, s_ref, b_ref), atol=np.abs(s_ref).max() * 1.01)


@pytest.mark.parametrize("bits", (2, 3, 4, 5, 6, 8))
@pytest.mark.parametrize("group", (32, 64, 128))
def test_float32_storage_is_bit_identical_to_mx_quantize(bits, group):
    w = mx.array(weights((16, 512), seed=bits))
    wq, s, b = mx.quantize(w, group, bits)
    qt = rtn_quantize(w, QuantSpec(bits=bits, group_size=group), dtype=mx.float32)
    assert mx.array_equal(qt.scales, s).item()
    assert mx.array_equal(qt.biases, b).item()
    assert mx.array_equal(qt.codes, unpack_bits(wq, bits, 512)).item()
    assert mx.array_equal(dequantize(qt), mx.dequantize(wq, s, b, group, bits)).item()


@pytest.mark.parametrize("dtype", (mx.float16, mx.bfloat16))
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group", (32, 64, 128))
def test_half_storage_matches_mx_quantize_and_is_never_worse(dtype, bits, group):
    """Same scales/biases as mx.quantize; codes are nearest on the *stored* grid, mlx's are not."""
    w = mx.array(weights((64, 512), seed=11)).astype(dtype)
    wq, s, b = mx.quantize(w, group, bits)
    qt = rtn_quantize(w, QuantSpec(bits=bits, group_size=group), dtype=dtype)
    assert mx.array_equal(qt.scales, s).item() and mx.array_equal(qt.biases, b).item()
    theirs = dequantize(QTensor(unpack_bits(wq, bits, 512), s, b, qt.spec))
    ours = dequantize(qt)
    wf = w.astype(mx.float32)
    assert mx.all(mx.abs(wf - ours) <= mx.abs(wf - theirs)).item()
    differ = mx.mean((qt.codes != unpack_bits(wq, bits, 512)).astype(mx.float32)).item()
    assert differ < (0.3 if bits == 8 else 0.01)


def rel_err(w, spec):
    w = mx.array(w)
    return (mx.linalg.norm(dequantize(rtn_quantize(w, spec)) - w) / mx.linalg.norm(w)).item()


@pytest.mark.parametrize("symmetric", (False, True))
def test_error_decreases_with_bits(symmetric):
    w = np.random.default_rng(1).standard_normal((64, 1024)).astype(F32)
    e1, et, *errs = [rel_err(w, QuantSpec(b, 64, symmetric)) for b in (1, 1.58, 2, 3, 4, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert e1 > et > 0.4 and errs[-1] < 0.01
    # absmax-symmetric 2-bit wastes a level on the rare extremes: the fitted ternary beats it
    assert (et > errs[0]) != symmetric, (et, errs[0])


def test_smaller_groups_are_more_accurate():
    w = weights((32, 1024), seed=5)
    errs = [rel_err(w, QuantSpec(2, g)) for g in (32, 128, 512, 0, -1)]
    assert all(a < b for a, b in zip(errs, errs[1:])), errs


def test_ternary_lloyd_never_worse_than_twn():
    w = weights((64, 512), seed=2)
    wg = w.reshape(64, 4, 128)
    t = np.abs(wg)
    thr = 0.7 * t.mean(-1, keepdims=True)
    m = t > thr
    s_twn = (t * m).sum(-1) / np.maximum(m.sum(-1), 1)
    twn = np.sign(wg) * np.where(t > s_twn[..., None] / 2, s_twn[..., None], 0)
    ours = np.array(dequantize(rtn_quantize(mx.array(w), QuantSpec(1.58, 128, True), dtype=mx.float32)))
    e_ours = ((ours.reshape(wg.shape) - wg) ** 2).sum(-1)
    e_twn = ((twn - wg) ** 2).sum(-1)
    assert np.all(e_ours <= e_twn * (1 + 1e-5))
    assert e_ours.sum() < e_twn.sum()


def test_binary_symmetric_scale_is_l2_optimal():
    w = weights((8, 256), seed=9)
    qt = rtn_quantize(mx.array(w), QuantSpec(1, 64, True), dtype=mx.float32)
    deq = np.array(dequantize(qt))
    np.testing.assert_array_equal(np.sign(deq), np.where(w > 0, 1.0, -1.0))
    np.testing.assert_allclose(np.abs(deq).reshape(8, 4, 64)[..., 0], np.abs(w).reshape(8, 4, 64).mean(-1), rtol=1e-6)
    base = ((deq - w) ** 2).sum()
    for f in (0.98, 1.02):
        assert ((deq * f - w) ** 2).sum() > base


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", (64, 256, 0, -1))
def test_constant_groups_and_zero_rows(bits, group):
    w = np.random.default_rng(0).standard_normal((6, 512)).astype(F32)
    w[0] = 0.0
    w[1] = 0.375  # constant row (exactly representable in fp16)
    w[2, :256] = -1.25
    for symmetric in (False, True):
        spec = QuantSpec(bits, group, symmetric)
        deq = np.array(dequantize(rtn_quantize(mx.array(w), spec, dtype=mx.float16)))
        assert np.all(np.isfinite(deq)), spec
        if group != -1:
            np.testing.assert_array_equal(deq[0], 0.0)
            if not symmetric:
                np.testing.assert_array_equal(deq[1], 0.375)
                if group in (64, 256):
                    np.testing.assert_array_equal(deq[2, :256], -1.25)
            elif bits != 1.58 and bits != 1:
                np.testing.assert_allclose(deq[1], 0.375, rtol=2**-8)
    z = rtn_quantize(mx.zeros((4, 64)), QuantSpec(bits, group, True))
    assert np.all(np.array(dequantize(z)) == 0)


def test_group_is_fitted_and_recorded():
    qt = rtn_quantize(mx.ones((4, 576)), QuantSpec(2, 128))
    assert qt.spec.group_size == 64 and qt.scales.shape == (4, 9)
    qt = rtn_quantize(mx.ones((4, 100)), QuantSpec(2, 64))
    assert qt.spec.group_size == 0 and qt.scales.shape == (4, 1)


def test_per_tensor_has_one_value():
    qt = rtn_quantize(mx.array(weights((3, 4, 64))), QuantSpec(3, -1))
    assert qt.scales.shape == (3, 4, 1)
    assert np.unique(np.array(qt.scales)).size == 1 and np.unique(np.array(qt.biases)).size == 1


@pytest.mark.parametrize("spec", [QuantSpec(2, 64), QuantSpec(1.58, 0, True), QuantSpec(4, -1, True), QuantSpec(1, -1)])
def test_chunked_equals_unchunked(spec, monkeypatch):
    w = mx.array(weights((40, 256), seed=4))
    whole = rtn_quantize(w, spec)
    monkeypatch.setattr(rtn, "CHUNK_ELEMENTS", 256 * 7)
    parts = rtn_quantize(w, spec)
    assert mx.array_equal(whole.codes, parts.codes).item()
    assert mx.array_equal(whole.scales, parts.scales).item()
    assert (whole.biases is None) == (parts.biases is None)


def test_bad_input():
    with pytest.raises(DupqError):
        rtn_quantize(mx.ones((64,)), QuantSpec(2, 64))
    with pytest.raises(DupqError):
        rtn_quantize(mx.ones((4, 64), dtype=mx.int32), QuantSpec(2, 64))
