"""Plain-mx reference twins of the custom kernels (the CPU path and the tests' ground truth).

Every function works on float32 and takes packed layers as ``(arrays, entry)`` pairs, exactly
what :func:`mlx_dupq.quant.bitpack.pack` writes (mlx or dupq format; 1-8 bits and ternary;
groups 32..512, per-channel, per-tensor; symmetric or not), so it shares no code with the
kernels' flat layout. :func:`gqmv_reference` is the twin of the kernel itself, over a
:class:`~mlx_dupq.kernels.layout.KernelPack`.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from ..errors import DupqError
from ..quant.bitpack import unpack
from ..quant.qtensor import dequantize
from ..rotation.hadamard import block_hadamard
from .layout import KernelPack, expert_dense

MODES = ("mean", "residual")


def dense_weight(arrays: dict, entry: dict) -> mx.array:
    """Packed layer -> float32 weight (out, in)."""
    return dequantize(unpack(arrays, entry))


def qmv_ref(x: mx.array, arrays: dict, entry: dict) -> mx.array:
    """Dequant GEMV / small GEMM: x (..., in) -> (..., out) = x @ W.T, float32."""
    return x.astype(mx.float32) @ dense_weight(arrays, entry).T


def rotate_ref(x: mx.array, signs: mx.array, block: int) -> mx.array:
    """Randomized block Hadamard: (..., n) -> (..., n) = (x * signs) @ blockdiag(H_block, ...)."""
    return block_hadamard(x.astype(mx.float32) * signs.astype(mx.float32), block)


def hadamard_qmv_ref(x: mx.array, signs: mx.array, block: int, arrays: dict, entry: dict) -> mx.array:
    """Fused online rotation + quantized matmul: x (..., in), signs (in,) -> (..., out)."""
    return qmv_ref(rotate_ref(x, signs, block), arrays, entry)


def multi_copy_ref(x: mx.array, copies: Sequence[tuple[dict, dict]], mode: str = "mean") -> mx.array:
    """k copies of one layer: x (..., in) -> (..., out); "mean" = (1/k) sum_j W_j x (parallel
    copies), "residual" = sum_j W_j x (each copy quantizes the previous ones' residual)."""
    if mode not in MODES:
        raise DupqError(f"unknown multi-copy mode {mode!r}; use one of {', '.join(MODES)}")
    y = sum(qmv_ref(x, a, e) for a, e in copies)
    return y / len(copies) if mode == "mean" else y


def gather_qmv_ref(x: mx.array, experts: Sequence[tuple[dict, dict]], indices: mx.array) -> mx.array:
    """MoE expert gather, each expert with its own format: x (M, in), indices (M, J) int -> (M, J, out)."""
    dense = mx.stack([dense_weight(a, e) for a, e in experts])  # (E, out, in)
    w = dense[indices]  # (M, J, out, in)
    return (w @ x.astype(mx.float32)[:, None, :, None]).squeeze(-1)


def gqmv_reference(x: mx.array, kp: KernelPack, idx: mx.array, coef: mx.array, summed: bool,
                   signs: mx.array | None = None, had: int = 0) -> mx.array:
    """Twin of mlx_dupq/kernels/src/gqmv.body.h: x (M, in), idx/coef (M, J) -> (M, 1 if summed else J, out)."""
    xf = x.astype(mx.float32)
    if had:
        xf = rotate_ref(xf, signs, had)
    used = sorted(set(int(i) for i in idx.reshape(-1).tolist()))
    pos = {e: p for p, e in enumerate(used)}
    ys = mx.stack([xf @ expert_dense(kp, e).T for e in used])  # (U, M, out): each used layer once
    slot = mx.array([[pos[int(e)] for e in row] for row in idx.tolist()], dtype=mx.int32)  # (M, J)
    y = ys[slot, mx.arange(x.shape[0])[:, None]] * coef.astype(mx.float32)[..., None]  # (M, J, out)
    return mx.sum(y, axis=1, keepdims=True) if summed else y
