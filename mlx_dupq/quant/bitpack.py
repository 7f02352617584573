"""Storage formats of a QTensor: mlx's own affine layout, or our "dupq" layout.

``pack(qt) -> (arrays, entry)`` and ``unpack(arrays, entry) -> QTensor`` are exact inverses.
``arrays`` uses the names the loaders expect (``weight``, ``scales`` and ``biases``); ``entry`` is
a JSON-able dict that a pack's config.json records per module::

    {"format": "mlx" | "dupq", "bits": 2, "group_size": 64, "symmetric": false, "shape": [out, in]}

``shape`` is the float weight's shape ((out, in), (vocab, dims) or (E, out, in)).

**mlx** (``spec.mlx_native``: bits 1-8 except ternary, groups 32/64/128): exactly what
``mx.quantize`` writes, so ``nn.QuantizedLinear``, ``nn.QuantizedEmbedding`` and mlx-lm's
``QuantizedSwitchLinear`` load it unchanged: ``weight`` uint32 (..., in*bits/32), ``scales`` and
``biases`` (..., in/g) in the storage dtype. mlx's format always has a bias, so a symmetric
grid stores its implied offset ``-s*(L-1)/2`` (:func:`symmetric_offsets`) -- those bytes count.

**dupq** (everything else):

- ternary codes 5 trits per byte (``sum q_k 3^k``, 3^5 = 243 <= 256), each row padded to a
  multiple of 5: ``weight`` uint8 (..., ceil(in/5)) = 1.6 bits/weight;
- other bit widths in mlx's bit layout, each row zero-padded to a multiple of 32 weights:
  ``weight`` uint32 (..., ceil(in/32)*bits) (identical to mlx's when 32 divides ``in``);
- ``scales`` per actual group (..., in/g) -- g = 256, 512 or the whole row -- or a single value
  of shape (1,) per tensor; ``biases`` likewise, only when asymmetric.

mlx's bit layout is a little-endian bit stream per row: weight ``i`` occupies bits
``[i*bits, (i+1)*bits)``; for 3/5/6 bits mlx writes 8, 8 and 4 weights per 3, 5 and 3 bytes,
which is the same stream.
"""

from __future__ import annotations

import mlx.core as mx

from ..specs import QuantSpec
from ..errors import DupqError
from .qtensor import QTensor, symmetric_offsets

FORMAT_MLX = "mlx"
FORMAT_DUPQ = "dupq"
FORMATS = (FORMAT_MLX, FORMAT_DUPQ)
TRITS_PER_BYTE = 5
_POW3 = (1, 3, 9, 27, 81)


def _pad_last(a: mx.array, multiple: int) -> mx.array:
    n = a.shape[-1]
    extra = -n % multiple
    if extra == 0:
        return a
    return mx.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, extra)])


def pack_bits(codes: mx.array, bits: int) -> mx.array:
    """mlx's bit layout: (..., n) uint8 codes < 2**bits -> (..., ceil(n/32)*bits) uint32."""
    lead = tuple(codes.shape[:-1])
    c = _pad_last(codes.astype(mx.uint8), 32)
    n = c.shape[-1]
    if bits == 8:
        stream = c
    elif bits in (1, 2, 4):
        per = 8 // bits
        shifts = mx.arange(per, dtype=mx.uint8) * bits
        stream = mx.sum(c.reshape(*lead, n // per, per) << shifts, axis=-1).astype(mx.uint8)
    elif bits in (3, 5, 6):
        per = 4 if bits == 6 else 8  # weights per pack of `nbytes` bytes, as mlx does
        nbytes = per * bits // 8
        wide = mx.uint64 if per * bits > 32 else mx.uint32
        shifts = mx.arange(per).astype(wide) * bits
        value = mx.sum(c.reshape(*lead, n // per, per).astype(wide) << shifts, axis=-1)
        byte_shifts = mx.arange(nbytes).astype(wide) * 8
        stream = ((value[..., None] >> byte_shifts) & 0xFF).astype(mx.uint8)
        stream = stream.reshape(*lead, n * bits // 8)
    else:
        raise ValueError(f"pack_bits: unsupported bit width {bits}")
    return mx.view(stream, mx.uint32)


def unpack_bits(packed: mx.array, bits: int, n: int) -> mx.array:
    """Inverse of :func:`pack_bits`: (..., W) uint32 -> (..., n) uint8 codes."""
    lead = tuple(packed.shape[:-1])
    stream = mx.view(packed, mx.uint8)
    mask = (1 << bits) - 1
    if bits == 8:
        codes = stream
    elif bits in (1, 2, 4):
        shifts = mx.arange(8 // bits, dtype=mx.uint8) * bits
        codes = ((stream[..., None] >> shifts) & mask).reshape(*lead, -1)
    elif bits in (3, 5, 6):
        per = 4 if bits == 6 else 8
        nbytes = per * bits // 8
        wide = mx.uint64 if per * bits > 32 else mx.uint32
        by = stream.reshape(*lead, -1, nbytes).astype(wide)
        value = mx.sum(by << (mx.arange(nbytes).astype(wide) * 8), axis=-1)
        shifts = mx.arange(per).astype(wide) * bits
        codes = ((value[..., None] >> shifts) & mask).astype(mx.uint8).reshape(*lead, -1)
    else:
        raise ValueError(f"unpack_bits: unsupported bit width {bits}")
    return codes if codes.shape[-1] == n else codes[..., :n]


def pack_trits(codes: mx.array) -> mx.array:
    """Ternary codes (..., n) in {0, 1, 2} -> (..., ceil(n/5)) uint8, 5 trits per byte."""
    lead = tuple(codes.shape[:-1])
    c = _pad_last(codes.astype(mx.uint8), TRITS_PER_BYTE)
    c = c.reshape(*lead, -1, TRITS_PER_BYTE)
    return mx.sum(c * mx.array(_POW3, dtype=mx.uint8), axis=-1).astype(mx.uint8)


def unpack_trits(packed: mx.array, n: int) -> mx.array:
    """Inverse of :func:`pack_trits`: (..., ceil(n/5)) uint8 -> (..., n) uint8 codes."""
    lead = tuple(packed.shape[:-1])
    digits = (packed[..., None] // mx.array(_POW3, dtype=mx.uint8)) % 3
    codes = digits.astype(mx.uint8).reshape(*lead, -1)
    return codes if codes.shape[-1] == n else codes[..., :n]


def spec_of(entry: dict) -> QuantSpec:
    """The QuantSpec an entry was packed with (DupqError if the entry is malformed)."""
    try:
        fmt = entry["format"]
        spec = QuantSpec(bits=entry["bits"], group_size=entry["group_size"], symmetric=entry["symmetric"])
    except (KeyError, TypeError) as e:
        raise DupqError(f"quantization entry {entry!r} lacks {e}; the pack's config.json is damaged, re-convert the model") from None
    if fmt not in FORMATS:
        raise DupqError(f"unknown pack format {fmt!r} (known: {', '.join(FORMATS)}); re-convert with this mlx-dupq")
    if fmt == FORMAT_MLX and not spec.mlx_native:
        raise DupqError(f"entry {entry!r} claims mlx format for {spec.label()}, which mlx cannot store; re-convert the model")
    return spec


def packed_shapes(shape: tuple[int, ...], entry: dict) -> dict[str, tuple[int, ...]]:
    """Shapes of the arrays :func:`pack` writes for a float weight of ``shape`` and this entry."""
    spec = spec_of(entry)
    *lead, n = shape
    lead = tuple(lead)
    g = spec.group_for(n)
    if entry["format"] == FORMAT_MLX:
        w = (*lead, n * int(spec.bits) // 32)
        return {"weight": w, "scales": (*lead, n // g), "biases": (*lead, n // g)}
    if spec.ternary:
        w = (*lead, -(-n // TRITS_PER_BYTE))
    else:
        w = (*lead, -(-n // 32) * int(spec.bits))
    s = (1,) if spec.group_size == -1 else (*lead, n // g)
    out = {"weight": w, "scales": s}
    if not spec.symmetric:
        out["biases"] = s
    return out


def pack(qt: QTensor) -> tuple[dict[str, mx.array], dict]:
    """QTensor -> (arrays, entry); mlx's layout when ``spec.mlx_native``, ours otherwise."""
    spec = qt.spec
    entry = {
        "format": FORMAT_MLX if spec.mlx_native else FORMAT_DUPQ,
        "bits": spec.bits,
        "group_size": spec.group_size,
        "symmetric": spec.symmetric,
        "shape": list(qt.shape),
    }
    if spec.mlx_native:
        biases = symmetric_offsets(qt.scales, spec.levels) if spec.symmetric else qt.biases
        arrays = {"weight": pack_bits(qt.codes, int(spec.bits)), "scales": qt.scales, "biases": biases}
        return arrays, entry
    weight = pack_trits(qt.codes) if spec.ternary else pack_bits(qt.codes, int(spec.bits))
    arrays = {"weight": weight, "scales": _stored_group_params(qt.scales, spec)}
    if not spec.symmetric:
        arrays["biases"] = _stored_group_params(qt.biases, spec)
    return arrays, entry


def _stored_group_params(a: mx.array, spec: QuantSpec) -> mx.array:
    """Per-tensor parameters are stored once, shape (1,); others as they are."""
    return a.reshape(-1)[:1] if spec.group_size == -1 else a


def unpack(arrays: dict[str, mx.array], entry: dict) -> QTensor:
    """Inverse of :func:`pack`: (arrays, entry) -> QTensor (per-tensor params broadcast to (..., 1))."""
    spec = spec_of(entry)
    shape = tuple(entry["shape"])
    expected = packed_shapes(shape, entry)
    for name, want in expected.items():
        got = arrays.get(name)
        if got is None or tuple(got.shape) != want:
            have = None if got is None else tuple(got.shape)
            raise DupqError(
                f"packed '{name}' has shape {have}, expected {want} for {spec.label()} of shape {shape}; "
                "the pack is damaged, re-convert the model"
            )
    *lead, n = shape
    weight = arrays["weight"]
    codes = unpack_trits(weight, n) if spec.ternary else unpack_bits(weight, int(spec.bits), n)
    scales = arrays["scales"]
    biases = None if spec.symmetric else arrays["biases"]
    if spec.group_size == -1 and entry["format"] == FORMAT_DUPQ:
        one = (1,) * (len(lead) + 1)
        scales = mx.broadcast_to(scales.reshape(one), (*lead, 1))
        if biases is not None:
            biases = mx.broadcast_to(biases.reshape(one), (*lead, 1))
    return QTensor(codes=codes, scales=scales, biases=biases, spec=spec)
