"""The kernels' weight layout: one or more packed (out, in) layers concatenated into flat buffers.

A :class:`KernelPack` holds E packed layers of one shape (out, in) -- the copies of a
duplicated layer or the experts of an MoE block -- each with its own bit width, group size and
symmetry. Built by :func:`kernel_pack` from the arrays and entries :func:`mlx_dupq.quant.bitpack.pack`
writes, without re-quantizing:

- ``w`` (W,) uint32: expert e's stored ``weight`` flattened at word ``meta[e, 2]``; binary codes
  keep mlx's bit stream (row o at word ``o * (in/32) * bits``), ternary keeps its base-3 bytes
  (row o at byte ``o * ceil(in/5)``), padded to whole words; layers whose ``weight`` is one and
  the same array (shared-codes copies) share one offset, the codes stored once;
- ``scales``, ``biases`` (S,): (out, in/g) per expert at ``meta[e, 3]``; symmetric offsets are the
  implied ``-s*(L-1)/2`` (:func:`~mlx_dupq.quant.qtensor.symmetric_offsets`), per-tensor
  parameters are repeated per row (g = in), per-channel has g = in;
- ``meta`` (E, 4) int32: bits (0 = ternary), group, word offset, scale offset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from ..specs import QuantSpec
from ..errors import DupqError
from ..quant.qtensor import symmetric_offsets
from ..quant.bitpack import FORMAT_DUPQ, spec_of, unpack_bits, unpack_trits

TERNARY_CODE = 0


@dataclass(frozen=True, eq=False)
class KernelPack:
    """E packed (out, in) layers in the kernels' flat layout (see module doc)."""

    w: mx.array
    scales: mx.array
    biases: mx.array
    meta: mx.array
    specs: tuple[QuantSpec, ...]
    n_out: int
    n_in: int

    @property
    def num(self) -> int:
        return len(self.specs)

    def nbytes(self) -> int:
        return self.w.nbytes + self.scales.nbytes + self.biases.nbytes


def _group_params(arrays: dict, entry: dict, spec: QuantSpec, out: int) -> tuple[mx.array, mx.array]:
    """(out, in/g) scales and offsets; per-tensor ones repeated per row, implied symmetric offsets."""
    scales, biases = arrays["scales"], arrays.get("biases")
    if spec.group_size == -1 and entry["format"] == FORMAT_DUPQ:
        scales = mx.broadcast_to(scales.reshape(1, 1), (out, 1))
        biases = None if biases is None else mx.broadcast_to(biases.reshape(1, 1), (out, 1))
    if biases is None:
        biases = symmetric_offsets(scales, spec.levels)
    return scales, biases


def _flat_codes(weight: mx.array, ternary: bool) -> mx.array:
    """Stored codes -> flat uint32 words (ternary base-3 bytes padded to whole words)."""
    if not ternary:
        return weight.reshape(-1)
    flat = weight.astype(mx.uint8).reshape(-1)
    pad = -flat.size % 4
    if pad:
        flat = mx.concatenate([flat, mx.zeros((pad,), dtype=mx.uint8)])
    return mx.view(flat, mx.uint32)


def kernel_pack(layers: Sequence[tuple[dict, dict]], dtype: mx.Dtype | None = None) -> KernelPack:
    """[(arrays, entry)] of E packed (out, in) layers -> KernelPack; ``dtype`` of the group
    parameters defaults to the first layer's scales dtype."""
    if not layers:
        raise DupqError("kernel_pack needs at least one packed layer")
    ws, ss, bs, meta, specs = [], [], [], [], []
    codes: list[tuple[mx.array, int]] = []  # (codes array, word offset) already in ws
    shape = None
    woff = soff = 0
    for arrays, entry in layers:
        spec = spec_of(entry)
        s = tuple(entry["shape"])
        if len(s) != 2:
            raise DupqError(f"kernel_pack takes (out, in) layers, got shape {s}; split stacked experts with split_stacked()")
        if shape is None:
            shape = s
        elif s != shape:
            raise DupqError(f"all layers of a kernel pack must share one shape; got {s} and {shape}")
        out, n = s
        if n % 32:
            raise DupqError(f"the kernels need rows of a multiple of 32 weights, got {n}; use the reference path")
        g = spec.group_for(n)
        scales, biases = _group_params(arrays, entry, spec, out)
        if dtype is None:
            dtype = scales.dtype
        weight = arrays["weight"]
        bits = TERNARY_CODE if spec.ternary else int(spec.bits)
        at = next((o for w, o in codes if w is weight), None)  # shared-codes copies: stored once
        if at is None:
            flat = _flat_codes(weight, spec.ternary)
            codes.append((weight, woff))
            ws.append(flat)
            at, woff = woff, woff + flat.size
        ss.append(scales.astype(dtype).reshape(-1))
        bs.append(biases.astype(dtype).reshape(-1))
        meta.append([bits, g, at, soff])
        specs.append(spec)
        soff += out * (n // g)

    def cat(parts):  # one layer: the stored buffer itself (a reshape is a view, no copy)
        return parts[0] if len(parts) == 1 else mx.concatenate(parts)

    return KernelPack(
        w=cat(ws),
        scales=cat(ss),
        biases=cat(bs),
        meta=mx.array(meta, dtype=mx.int32),
        specs=tuple(specs),
        n_out=shape[0],
        n_in=shape[1],
    )


def split_stacked(arrays: dict, entry: dict) -> list[tuple[dict, dict]]:
    """A stacked (E, out, in) pack -> E (out, in) (arrays, entry) pairs (views, no copies)."""
    shape = tuple(entry["shape"])
    if len(shape) != 3:
        raise DupqError(f"split_stacked takes an (E, out, in) pack, got shape {shape}")
    sub = dict(entry, shape=list(shape[1:]))
    out = []
    for e in range(shape[0]):
        part = {k: (v if v.shape == (1,) else v[e]) for k, v in arrays.items()}
        out.append((part, sub))
    return out


def expert_dense(kp: KernelPack, e: int) -> mx.array:
    """Float32 (out, in) weight of expert ``e`` decoded from the flat layout with plain mx ops."""
    bits, g, woff, soff = (int(v) for v in kp.meta[e].tolist())
    out, n = kp.n_out, kp.n_in
    if bits == TERNARY_CODE:
        rowbytes = -(-n // 5)
        by = mx.view(kp.w[woff:], mx.uint8)[: out * rowbytes].reshape(out, rowbytes)
        codes = unpack_trits(by, n)
    else:
        words = (n // 32) * bits
        codes = unpack_bits(kp.w[woff: woff + out * words].reshape(out, words), bits, n)
    ng = n // g
    s = kp.scales[soff: soff + out * ng].reshape(out, ng, 1).astype(mx.float32)
    b = kp.biases[soff: soff + out * ng].reshape(out, ng, 1).astype(mx.float32)
    q = codes.astype(mx.float32).reshape(out, ng, g)
    return (q * s + b).reshape(out, n)
