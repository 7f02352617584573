"""Exact GGUF blocks for quantized weights: which llama.cpp type holds a pack's numbers, and its bytes.

A pack's quantized weight (:class:`~mlx_dupq.quant.qtensor.QTensor`) is, per group of ``g``
weights along a row, ``w = s * q + b`` with integer codes ``q`` in ``[0, 2^bits - 1]`` and the scale
``s`` and offset ``b`` stored in the pack's dtype. llama.cpp's 32-weight blocks (``QK = 32``,
row-major, along the input dimension) compute, in float32::

    Q4_0:  w = d * (q' - 8)        q' in [0, 15]      d fp16               18 bytes / 32 weights
    Q4_1:  w = d * q' + m          q' in [0, 15]      d, m fp16            20 bytes / 32 weights
    Q8_0:  w = d * q'              q' in [-128, 127]  d fp16               34 bytes / 32 weights

A group of ``g`` (a multiple of 32) becomes ``g / 32`` blocks that share its ``s`` and ``b``. Then

- **Q4_1** holds any grid with ``bits <= 4`` whose ``s`` and ``b`` are fp16 numbers: ``d = s``,
  ``m = b``, ``q' = q`` (our 2/3/4-bit packs with float16 storage, symmetric or not);
- **Q4_0** and **Q8_0** have no free offset: they hold a group only when ``b = -k s`` for an
  integer ``k`` (zero is on the grid) with every code landing in range, ``q' = q - k + 8`` resp.
  ``q' = q - k`` (``s = 0``: only ``b = 0``). Our symmetric grids put zero between two levels
  (``b = -s (L-1)/2``), so they never qualify; mlx's asymmetric rule aims for an integer ``k``
  but rounds ``s`` and ``b`` to fp16 separately.

Exactness is bitwise, not approximate: ``s``, ``b`` fp16-exact means the products ``d * q'`` are
exact in float32 (11 + 8 significant bits), so llama.cpp's float32 ``d * q' + m`` -- fused or not
-- equals the pack's ``s * q + b``. :func:`exact_blocks` checks every group and returns None when
the type cannot hold the tensor. Everything here is numpy over one tensor; no I/O.
"""

from __future__ import annotations

import numpy as np

QK = 32
#: bytes per 32-weight block
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
#: the exact quantized types in order of preference (smallest first)
EXACT_TYPES = ("Q4_0", "Q4_1", "Q8_0")


def _fp16_exact(a: np.ndarray) -> bool:
    a = np.asarray(a, dtype=np.float32)
    with np.errstate(over="ignore"):
        return bool(np.array_equal(a.astype(np.float16).astype(np.float32), a))


def _per_block(a: np.ndarray, g: int) -> np.ndarray:
    """(rows, n/g) group parameters -> (rows, n/32) block parameters."""
    return np.repeat(a, g // QK, axis=1)


def _integer_zero_point(s: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """Per group the integer ``k`` with ``b == -k * s`` exactly (float32), or None if a group has none."""
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(s != 0, np.rint(-b / np.where(s != 0, s, 1)), 0)
    ok = np.where(s != 0, (-k.astype(np.float32) * s) == b, b == 0)
    return k.astype(np.int64) if ok.all() else None


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(rows, n) codes in [0, 15] -> (rows, n/32, 16) bytes: byte j = q[j] | q[j + 16] << 4 (ggml's order)."""
    rows, n = q.shape
    q = q.reshape(rows, n // QK, 2, QK // 2).astype(np.uint8)
    return q[:, :, 0, :] | (q[:, :, 1, :] << 4)


def _f16_bytes(a: np.ndarray) -> np.ndarray:
    """(rows, nb) float32 -> (rows, nb, 2) little-endian fp16 bytes."""
    return a.astype("<f2").view(np.uint8).reshape(*a.shape, 2)


def exact_blocks(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray, bits: int, qtype: str) -> np.ndarray | None:
    """The ``qtype`` blocks holding ``w = s * q + b`` exactly, or None when that type cannot.

    codes: (rows, n) integers in [0, 2^bits - 1]; scales, offsets: (rows, n/g) float32 with ``g``
    a multiple of 32 (``n`` too). Returns (rows, n/32 * BLOCK_BYTES[qtype]) uint8, ggml's layout.
    """
    codes = np.asarray(codes)
    s = np.asarray(scales, dtype=np.float32)
    b = np.asarray(offsets, dtype=np.float32)
    rows, n = codes.shape
    g = n // s.shape[1]
    if n % QK or g % QK or g * s.shape[1] != n:
        return None
    if not _fp16_exact(s):
        return None
    nb = n // QK
    if qtype == "Q4_1":
        if bits > 4 or not _fp16_exact(b):
            return None
        head = np.concatenate([_f16_bytes(_per_block(s, g)), _f16_bytes(_per_block(b, g))], axis=-1)
        return np.concatenate([head, _pack_nibbles(codes)], axis=-1).reshape(rows, nb * BLOCK_BYTES[qtype])
    k = _integer_zero_point(s, b)
    if k is None:
        return None
    shifted = codes.astype(np.int64) - np.repeat(k, g, axis=1)
    d = np.where(s != 0, s, 0).astype(np.float32)
    if qtype == "Q4_0":
        q = shifted + 8
        if q.min() < 0 or q.max() > 15:
            return None
        return np.concatenate([_f16_bytes(_per_block(d, g)), _pack_nibbles(q)], axis=-1).reshape(rows, nb * 18)
    if qtype == "Q8_0":
        if shifted.min() < -128 or shifted.max() > 127:
            return None
        qs = shifted.astype(np.int8).view(np.uint8).reshape(rows, nb, QK)
        return np.concatenate([_f16_bytes(_per_block(d, g)), qs], axis=-1).reshape(rows, nb * 34)
    raise ValueError(f"no exact packer for {qtype}")


def best_exact(codes, scales, offsets, bits: int) -> tuple[str, np.ndarray] | None:
    """The smallest of Q4_0 / Q4_1 / Q8_0 that holds the tensor exactly, with its blocks (or None)."""
    for qtype in EXACT_TYPES:
        blocks = exact_blocks(codes, scales, offsets, bits, qtype)
        if blocks is not None:
            return qtype, blocks
    return None
