"""What layers call: the four kernel entry points, run on :func:`~mlx_dupq.kernels.dispatch.backend`.

All take x (..., in) and a :class:`~mlx_dupq.kernels.layout.KernelPack` (``kernel_pack``) and
return x's dtype; the reference twins over (arrays, entry) are in
:mod:`mlx_dupq.kernels.reference`.
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import DupqError
from . import dispatch
from .layout import KernelPack


def _rows(x: mx.array, kp: KernelPack) -> mx.array:
    if x.shape[-1] != kp.n_in:
        raise DupqError(f"input has {x.shape[-1]} features, the packed layer takes {kp.n_in}")
    return x.reshape(-1, kp.n_in)


def _run(x2, kp, idx, coef, summed, signs=None, had=0):
    return dispatch.backend().gqmv(x2, kp, idx, coef, summed, signs, had)


def qmv(x: mx.array, kp: KernelPack, expert: int = 0) -> mx.array:
    """Dequant GEMV / small GEMM with layer ``expert`` of ``kp``: (..., in) -> (..., out)."""
    x2 = _rows(x, kp)
    m = x2.shape[0]
    y = _run(x2, kp, mx.full((m, 1), expert, mx.int32), mx.ones((m, 1)), True)
    return y.reshape(*x.shape[:-1], kp.n_out)


def hadamard_qmv(x: mx.array, kp: KernelPack, signs: mx.array, block: int) -> mx.array:
    """Online randomized block Hadamard fused with the GEMV: (..., in), signs (in,) -> (..., out)
    = qmv((x * signs) @ blockdiag(H_block)); ``block`` divides ``in``."""
    if kp.n_in % block:
        raise DupqError(f"Hadamard block {block} does not divide the layer's {kp.n_in} inputs")
    x2 = _rows(x, kp)
    m = x2.shape[0]
    y = _run(x2, kp, mx.zeros((m, 1), mx.int32), mx.ones((m, 1)), True, signs, block)
    return y.reshape(*x.shape[:-1], kp.n_out)


def multi_copy_qmv(x: mx.array, kp: KernelPack, mode: str = "mean", weights: mx.array | None = None) -> mx.array:
    """All ``kp.num`` copies of one layer in one pass over x: (..., in) -> (..., out);
    "mean" averages them (parallel copies), "residual" sums them (residual copies); ``weights``
    (K,) replaces either with ``sum_k weights[k] W_k x`` (a scalar aggregation mix)."""
    if mode not in ("mean", "residual"):
        raise DupqError(f"unknown multi-copy mode {mode!r}; use mean or residual")
    x2 = _rows(x, kp)
    m, k = x2.shape[0], kp.num
    idx = mx.broadcast_to(mx.arange(k, dtype=mx.int32), (m, k))
    if weights is None:
        coef = mx.full((m, k), 1.0 / k if mode == "mean" else 1.0)
    elif weights.shape != (k,):
        raise DupqError(f"multi-copy weights must have shape ({k},) for {k} copies, got {tuple(weights.shape)}")
    else:
        coef = mx.broadcast_to(weights.astype(mx.float32), (m, k))
    y = _run(x2, kp, idx, coef, True)
    return y.reshape(*x.shape[:-1], kp.n_out)


def gather_qmv(x: mx.array, kp: KernelPack, indices: mx.array) -> mx.array:
    """MoE: x (M, in), indices (M, J) of experts in ``kp`` (each with its own bit width) -> (M, J, out)."""
    x2 = _rows(x, kp)
    if indices.ndim != 2 or indices.shape[0] != x2.shape[0]:
        raise DupqError(f"indices must be (M, J) with M = {x2.shape[0]} rows, got {tuple(indices.shape)}")
    return _run(x2, kp, indices.astype(mx.int32), mx.ones(indices.shape), False)
