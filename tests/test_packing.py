"""Storage formats: mlx's bit layout, base-3 ternary packing, exact pack/unpack round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx.core as mx

from mlx_dupq.config import QuantSpec
from mlx_dupq.errors import DupqError
from mlx_dupq.quant.bitpack import (
    pack,
    pack_bits,
    pack_trits,
    packed_shapes,
    unpack,
    unpack_bits,
    unpack_trits,
)
from mlx_dupq.quant.qtensor import dequantize, symmetric_offsets
from mlx_dupq.quant.rtn import rtn_quantize


def random_codes(shape, levels, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, levels, size=shape).astype(np.uint8))


@pytest.mark.parametrize("bits", (1, 2, 3, 4, 5, 6, 8))
def test_bit_layout_is_mlx_layout(bits):
    """unpack_bits decodes what mx.quantize wrote (checked by mlx's own dequantize) and packs it back."""
    w = mx.random.normal((8, 256), key=mx.random.key(bits))
    wq, s, b = mx.quantize(w, 64, bits)
    codes = unpack_bits(wq, bits, 256)
    assert int(mx.max(codes).item()) < 2**bits
    mine = (codes.astype(mx.float32).reshape(8, 4, 64) * s[..., None] + b[..., None]).reshape(8, 256)
    assert mx.allclose(mine, mx.dequantize(wq, s, b, 64, bits), rtol=0, atol=1e-6).item()
    assert mx.array_equal(pack_bits(codes, bits), wq).item()


@pytest.mark.parametrize("bits", (1, 2, 3, 4, 5, 6, 8))
@pytest.mark.parametrize("n", (32, 96, 100, 7))
def test_pack_bits_round_trip_any_length(bits, n):
    codes = random_codes((3, 5, n), 2**bits, seed=bits * n)
    packed = pack_bits(codes, bits)
    assert packed.dtype == mx.uint32 and packed.shape == (3, 5, -(-n // 32) * bits)
    assert mx.array_equal(unpack_bits(packed, bits, n), codes).item()


@pytest.mark.parametrize("n", (5, 64, 101, 1))
def test_trits_round_trip(n):
    codes = random_codes((4, n), 3, seed=n)
    packed = pack_trits(codes)
    assert packed.dtype == mx.uint8 and packed.shape == (4, -(-n // 5))
    assert int(mx.max(packed).item()) <= 242
    assert mx.array_equal(unpack_trits(packed, n), codes).item()
    # known value: trits (2, 0, 1, 0, 2) -> 2 + 9 + 162
    assert pack_trits(mx.array([[2, 0, 1, 0, 2]], dtype=mx.uint8)).tolist() == [[173]]


ALL_BITS = (1, 1.58, 2, 3, 4, 5, 6, 8)
ALL_GROUPS = (32, 64, 128, 256, 512, 0, -1)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("group", ALL_GROUPS)
@pytest.mark.parametrize("symmetric", (False, True))
def test_pack_unpack_exact(bits, group, symmetric):
    w = mx.random.normal((2, 6, 512), key=mx.random.key(3)) * 0.02
    qt = rtn_quantize(w, QuantSpec(bits, group, symmetric), dtype=mx.bfloat16)
    arrays, entry = pack(qt)
    entry = json.loads(json.dumps(entry))  # what config.json gives back
    assert {k: tuple(v.shape) for k, v in arrays.items()} == packed_shapes((2, 6, 512), entry)
    back = unpack(arrays, entry)
    assert back.spec == qt.spec
    assert mx.array_equal(back.codes, qt.codes).item()
    assert mx.array_equal(back.scales, qt.scales).item() and back.scales.dtype == mx.bfloat16
    assert (back.biases is None) == symmetric
    if not symmetric:
        assert mx.array_equal(back.biases, qt.biases).item()
    assert mx.array_equal(dequantize(back), dequantize(qt)).item()


def test_format_choice_and_contents():
    w = mx.random.normal((4, 512), key=mx.random.key(0))
    arrays, entry = pack(rtn_quantize(w, QuantSpec(3, 64, True)))
    assert entry["format"] == "mlx" and arrays["weight"].dtype == mx.uint32
    # mlx's format always has a bias: the implied symmetric offset, in the storage dtype
    assert arrays["biases"].dtype == mx.float16
    assert mx.array_equal(arrays["biases"], symmetric_offsets(arrays["scales"], 8)).item()

    arrays, entry = pack(rtn_quantize(w, QuantSpec(2, 256, True)))
    assert entry["format"] == "dupq" and set(arrays) == {"weight", "scales"}
    assert arrays["scales"].shape == (4, 2)

    arrays, entry = pack(rtn_quantize(w, QuantSpec(1.58, -1)))
    assert entry["format"] == "dupq" and arrays["weight"].dtype == mx.uint8
    assert arrays["weight"].shape == (4, 103) and arrays["scales"].shape == (1,) and arrays["biases"].shape == (1,)


def test_odd_row_length_round_trip():
    w = mx.random.normal((5, 100), key=mx.random.key(1))
    for spec in (QuantSpec(3, 64), QuantSpec(1.58, 64, True), QuantSpec(8, -1)):
        qt = rtn_quantize(w, spec)
        assert qt.spec.group_size in (0, -1)
        back = unpack(*pack(qt))
        assert mx.array_equal(dequantize(back), dequantize(qt)).item()


def test_damaged_pack_is_refused():
    arrays, entry = pack(rtn_quantize(mx.ones((4, 256)), QuantSpec(2, 64)))
    with pytest.raises(DupqError, match="shape"):
        unpack({**arrays, "scales": arrays["scales"][:, :2]}, entry)
    with pytest.raises(DupqError, match="biases"):
        unpack({k: v for k, v in arrays.items() if k != "biases"}, entry)
    with pytest.raises(DupqError):
        unpack(arrays, {k: v for k, v in entry.items() if k != "bits"})
    with pytest.raises(DupqError):
        unpack(arrays, {**entry, "format": "gguf"})
    with pytest.raises(DupqError):
        unpack(arrays, {**entry, "format": "mlx", "group_size": 256})
