"""Layers that run packed weights, the module factory, and bit accounting."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from mlx_dupq.config import QuantSpec
from mlx_dupq.errors import DupqError
from mlx_dupq.layers.quant_linear import (
    DupqEmbedding,
    DupqLinear,
    DupqSwitchLinear,
    build_module,
    kernel_group,
    quantize_tensor,
)
from mlx_dupq.quant.bpw import bits_per_weight, count_params, entry_params, tensor_bits
from mlx_dupq.quant.bitpack import unpack
from mlx_dupq.quant.qtensor import dequantize

SPECS = [
    QuantSpec(b, g, s)
    for b in (1, 1.58, 2, 3, 4, 8)
    for g in (32, 128, 256, 512, 0, -1)
    for s in (False, True)
]


def ref_weight(arrays, entry):
    return dequantize(unpack(arrays, entry))


def loaded(kind, shape, arrays, entry, bias=None):
    m = build_module(kind, shape, entry, bias=bias is not None)
    params = dict(arrays)
    if bias is not None:
        params["bias"] = bias
    m.load_weights(list(params.items()))  # strict: names and shapes must match the empty module
    return m


def close(a, b, scale):
    return mx.max(mx.abs(a - b)).item() <= 1e-5 * scale


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
@pytest.mark.parametrize("lead", [(1,), (3, 7)], ids=["decode", "batch"])  # packed kernel / CPU dense rule
def test_linear_forward_equals_dequantized_matmul(spec, lead):
    w = mx.random.normal((48, 512), key=mx.random.key(1)) * 0.05
    x = mx.random.normal((*lead, 512), key=mx.random.key(2))
    bias = mx.random.normal((48,), key=mx.random.key(3))
    arrays, entry = quantize_tensor(w, spec, mx.float16)
    m = loaded("linear", (48, 512), arrays, entry, bias)
    assert isinstance(m, nn.QuantizedLinear if spec.mlx_native else DupqLinear)
    ref = x @ ref_weight(arrays, entry).T + bias
    y = m(x)
    assert y.shape == (*lead, 48) and y.dtype == mx.float32
    assert close(y, ref, mx.max(mx.abs(ref)).item())
    # the module's parameters are exactly the pack's arrays (checked after the first call)
    params = dict(tree_flatten(m.parameters()))
    assert tensor_bits({k: v for k, v in params.items() if k != "bias"}) == tensor_bits(arrays)
    assert mx.array_equal(params["weight"], arrays["weight"]).item()


@pytest.mark.parametrize("spec", [QuantSpec(2, 64), QuantSpec(1.58, 128, True), QuantSpec(3, 256), QuantSpec(2, -1, True)], ids=lambda s: s.label())
def test_switch_linear_with_indices(spec):
    E, O, D = 4, 32, 256
    w = mx.random.normal((E, O, D), key=mx.random.key(4)) * 0.05
    bias = mx.random.normal((E, O), key=mx.random.key(5))
    arrays, entry = quantize_tensor(w, spec, mx.float16)
    m = loaded("switch_linear", (E, O, D), arrays, entry, bias)
    assert isinstance(m, QuantizedSwitchLinear if spec.mlx_native else DupqSwitchLinear)
    wd = ref_weight(arrays, entry)
    # as mlx-lm's SwitchGLU calls it: x (B, L, 1, 1, D), indices (B, L, k)
    x = mx.random.normal((2, 3, 1, 1, D), key=mx.random.key(6))
    idx = mx.array(np.random.default_rng(0).integers(0, E, size=(2, 3, 2)).astype(np.uint32))
    y = m(x, idx)
    ref = x @ wd[idx].swapaxes(-1, -2) + bias[idx][..., None, :]
    assert y.shape == (2, 3, 2, 1, O)
    assert close(y, ref, mx.max(mx.abs(ref)).item())
    # sorted path: flattened tokens (N, 1, D) with sorted indices (N,)
    xs = mx.random.normal((5, 1, D), key=mx.random.key(7))
    ids = mx.array([0, 0, 1, 3, 3], dtype=mx.uint32)
    ys = m(xs, ids, sorted_indices=True)
    refs = xs @ wd[ids].swapaxes(-1, -2) + bias[ids][:, None, :]
    assert close(ys, refs, mx.max(mx.abs(refs)).item())


@pytest.mark.parametrize("spec", [QuantSpec(8, 64), QuantSpec(1.58, 0, True), QuantSpec(2, 256), QuantSpec(4, -1)], ids=lambda s: s.label())
def test_embedding_and_tied_head(spec):
    V, D = 96, 512
    w = mx.random.normal((V, D), key=mx.random.key(8))
    arrays, entry = quantize_tensor(w, spec, mx.float16)
    m = loaded("embedding", (V, D), arrays, entry)
    assert isinstance(m, nn.QuantizedEmbedding if spec.mlx_native else DupqEmbedding)
    wd = ref_weight(arrays, entry)
    ids = mx.array([[0, 5, 95], [7, 7, 1]])
    rows = m(ids)
    assert rows.shape == (2, 3, D) and rows.dtype == mx.float16  # like nn.QuantizedEmbedding: scales' dtype
    # mx.dequantize computes s*q + b in the scales' dtype: fp16 rounding of each term
    assert mx.max(mx.abs(rows.astype(mx.float32) - wd[ids])).item() <= 2**-9 * mx.max(mx.abs(wd)).item()
    x = mx.random.normal((2, D), key=mx.random.key(9))
    ref = x @ wd.T
    assert close(m.as_linear(x), ref, mx.max(mx.abs(ref)).item())


def test_mlx_quantized_linear_loads_native_arrays_like_its_own():
    w = mx.random.normal((64, 256), key=mx.random.key(10))
    x = mx.random.normal((4, 256), key=mx.random.key(11))
    own = nn.QuantizedLinear.from_linear(_linear(w), group_size=64, bits=4)
    arrays, entry = quantize_tensor(w, QuantSpec(4, 64), mx.float32)
    ours = nn.QuantizedLinear(256, 64, bias=False, group_size=64, bits=4)
    ours.load_weights(list(arrays.items()))
    for k in ("weight", "scales", "biases"):
        assert mx.array_equal(arrays[k], own[k]).item()
    assert mx.array_equal(ours(x), own(x)).item()


def test_mlx_lm_switch_linear_loads_native_arrays():
    w = mx.random.normal((3, 32, 128), key=mx.random.key(12))
    sl = SwitchLinear(128, 32, 3, bias=False)
    sl.weight = w
    own = sl.to_quantized(group_size=32, bits=2)
    arrays, entry = quantize_tensor(w, QuantSpec(2, 32), mx.float32)
    for k in ("weight", "scales", "biases"):
        assert mx.array_equal(arrays[k], own[k]).item()


def _linear(w):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = w
    return lin


def test_new_weights_invalidate_the_kernel_cache():
    """Ternary codes are re-encoded once; loading other weights must re-encode again."""
    w1 = mx.random.normal((32, 128), key=mx.random.key(13))
    w2 = mx.random.normal((32, 128), key=mx.random.key(14))
    x = mx.random.normal((2, 128), key=mx.random.key(15))
    spec = QuantSpec(1.58, 64, True)
    a1, e1 = quantize_tensor(w1, spec)
    a2, _ = quantize_tensor(w2, spec)
    m = loaded("linear", (32, 128), a1, e1)
    y1 = m(x)
    assert mx.array_equal(m.weight, a1["weight"]).item()  # stored parameter still equals the pack
    m.load_weights(list(a2.items()))
    y2 = m(x)
    ref2 = x @ ref_weight(a2, e1).T
    assert close(y2, ref2, mx.max(mx.abs(ref2)).item())
    assert not mx.allclose(y1, y2).item()


def test_rows_without_kernel_layout_use_the_fallback():
    w = mx.random.normal((16, 100), key=mx.random.key(16))
    x = mx.random.normal((3, 100), key=mx.random.key(17))
    for spec in (QuantSpec(2, 64), QuantSpec(1.58, 32, True)):
        arrays, entry = quantize_tensor(w, spec)
        assert entry["group_size"] == 0 and kernel_group(100, 100) is None
        m = loaded("linear", (16, 100), arrays, entry)
        ref = x @ ref_weight(arrays, entry).T
        assert close(m(x), ref, mx.max(mx.abs(ref)).item())
        e = loaded("embedding", (16, 100), arrays, entry)
        assert close(e(mx.array([3, 0])), ref_weight(arrays, entry)[mx.array([3, 0])], 1.0)


def test_kernel_group():
    assert kernel_group(512, 896) == 128
    assert kernel_group(256, 1408) == 128
    assert kernel_group(896, 896) == 128  # per channel
    assert kernel_group(576, 576) == 64
    assert kernel_group(96, 96) == 32


def test_build_module_refuses_bad_requests():
    _, entry = quantize_tensor(mx.ones((8, 64)), QuantSpec(2, 256))
    with pytest.raises(DupqError):
        build_module("conv", (8, 64), entry)
    with pytest.raises(DupqError):
        build_module("switch_linear", (8, 64), entry)
    with pytest.raises(DupqError):
        build_module("linear", (8, 128), entry)
    m = build_module("linear", (8, 64), entry)
    with pytest.raises(ValueError):  # mlx: the pack for another shape does not load
        m.load_weights([("weight", mx.zeros((8, 3), dtype=mx.uint32)), ("scales", mx.zeros((8, 1))), ("biases", mx.zeros((8, 1)))])


# ---------------------------------------------------------------- bit accounting


def test_bpw_of_known_packs():
    w = mx.random.normal((64, 1024), key=mx.random.key(18))
    arrays, entry = quantize_tensor(w, QuantSpec(2, 64), mx.float16)
    assert bits_per_weight(tensor_bits(arrays), entry_params(entry)) == 2.5  # 2 + (16 + 16) / 64
    arrays, entry = quantize_tensor(w, QuantSpec(4, 128, True), mx.float16)
    assert bits_per_weight(tensor_bits(arrays), w.size) == 4.25  # symmetric still stores mlx's bias
    arrays, entry = quantize_tensor(w, QuantSpec(2, 256, True), mx.float16)
    assert bits_per_weight(tensor_bits(arrays), w.size) == 2 + 16 / 256

    wt = mx.random.normal((64, 1000), key=mx.random.key(19))
    arrays, entry = quantize_tensor(wt, QuantSpec(1.58, 0, True), mx.float16)
    assert bits_per_weight(tensor_bits(arrays), wt.size) == pytest.approx(1.6 + 16 / 1000)
    arrays, entry = quantize_tensor(wt, QuantSpec(1.58, -1), mx.float16)
    assert bits_per_weight(tensor_bits(arrays), wt.size) == pytest.approx(1.6 + 32 / wt.size)


def test_all_in_bpw_counts_unquantized_tensors():
    shapes = {"embed": (96, 64), "q": (64, 64), "norm": (64,)}
    assert count_params(shapes) == 96 * 64 + 64 * 64 + 64
    assert count_params([(2, 3), (4,)]) == 10
    q_arrays, _ = quantize_tensor(mx.ones((64, 64)), QuantSpec(2, 64), mx.float16)
    e_arrays, _ = quantize_tensor(mx.ones((96, 64)), QuantSpec(8, 64), mx.float16)
    stored = tensor_bits(q_arrays) + tensor_bits(e_arrays) + tensor_bits([mx.ones((64,), dtype=mx.float16)])
    bpw = bits_per_weight(stored, count_params(shapes))
    assert bpw == (64 * 64 * 2.5 + 96 * 64 * 8.5 + 64 * 16) / (96 * 64 + 64 * 64 + 64)
    with pytest.raises(DupqError):
        bits_per_weight(100, 0)
