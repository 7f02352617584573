"""Normalised Walsh-Hadamard transforms, full and block-diagonal, as pure functions.

``mx.hadamard_transform`` handles widths ``n = m * 2**k`` with ``m`` in {1, 12, 20, 28}. For
any other width it does not raise: it returns wrong numbers (n = 36) or crashes the process
(n = 576), so every call here checks the width first with :func:`hadamard_supported`.

Conventions (checked in the tests):

- ``hadamard(x)`` computes ``x @ H`` along the last axis, with ``H`` orthonormal
  (``H @ H.T = I``). ``H`` is symmetric for powers of two, not for ``m > 1``.
- ``block_hadamard(x, b)`` computes ``x @ blockdiag(H_b, ..., H_b)``: the last axis is cut into
  contiguous blocks of ``b`` and each block is transformed on its own.

Widths that are not ``m * 2**k`` (SmolLM2's 576 = 9 * 64, Qwen2.5-0.5B's 4864 = 19 * 256,
Qwen2-7B's 18944 = 37 * 512) use a block size that divides them (64, 256, 512, ...).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

HADAMARD_BASES = (1, 12, 20, 28)


def _is_pow2(k: int) -> bool:
    return k > 0 and (k & (k - 1)) == 0


def hadamard_supported(n: int) -> bool:
    """True when ``mx.hadamard_transform`` computes an exact Hadamard transform of width ``n``."""
    if n < 1:
        return False
    return any(n % m == 0 and _is_pow2(n // m) for m in HADAMARD_BASES)


def block_sizes(n: int) -> list[int]:
    """Supported Hadamard block sizes that divide ``n``, ascending (``[1, 2, 4, ..., n?]``)."""
    return [b for b in range(1, n + 1) if n % b == 0 and hadamard_supported(b)]


def largest_block(n: int) -> int:
    """The largest supported Hadamard block dividing ``n`` (``n`` itself when supported)."""
    return block_sizes(n)[-1]


def hadamard(x: mx.array) -> mx.array:
    """``x @ H`` along the last axis: (..., n) -> (..., n), ``H`` the orthonormal Hadamard of width n."""
    n = x.shape[-1]
    if not hadamard_supported(n):
        raise ValueError(f"no Hadamard transform of width {n}; use block_hadamard with a block from {block_sizes(n)}")
    return mx.hadamard_transform(x, scale=1.0 / math.sqrt(n))


def block_hadamard(x: mx.array, block: int) -> mx.array:
    """``x @ blockdiag(H_b, ...)``: (..., n) -> (..., n) with ``b = block`` dividing ``n``."""
    n = x.shape[-1]
    if n % block != 0 or not hadamard_supported(block):
        raise ValueError(f"block {block} does not tile width {n}; supported blocks: {block_sizes(n)}")
    if block == n:
        return hadamard(x)
    y = x.reshape(*x.shape[:-1], n // block, block)
    return hadamard(y).reshape(x.shape)


def hadamard_matrix(n: int) -> mx.array:
    """The explicit (n, n) float32 orthonormal Hadamard matrix ``H`` of :func:`hadamard`."""
    return hadamard(mx.eye(n, dtype=mx.float32))


def sylvester_matrix(n: int) -> np.ndarray:
    """Reference (n, n) float64 Sylvester-Hadamard matrix / sqrt(n) for a power of two ``n`` (tests)."""
    if not _is_pow2(n):
        raise ValueError(f"Sylvester construction needs a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)
