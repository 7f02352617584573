"""The GPTQ implementation as it was before the numpy rewrite (commit d5af4c3): per-column mlx ops,
mx.linalg.cholesky_inv for U, H accumulated with mlx's gemm. The straightforward reference that
tests/test_gptq_fast.py compares mlx_dupq.quant.gptq with; not used by the package."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np

from mlx_dupq.errors import DupqError
from mlx_dupq.quant.qtensor import QTensor, codes_for
from mlx_dupq.quant.rtn import rtn_quantize
from mlx_dupq.specs import QuantSpec

MAX_DAMP_TRIES = 6


def reference_hessian(batches) -> mx.array:
    """E[x x^T] with mlx's gemm, batch by batch (the old HessianAccumulator)."""
    total, tokens = None, 0
    for x in batches:
        xf = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        total = xf.T @ xf if total is None else total + xf.T @ xf
        tokens += xf.shape[0]
        mx.eval(total)
    return total / tokens


def reference_gptq(
    w: mx.array,
    H: mx.array,
    spec: QuantSpec,
    dtype: mx.Dtype = mx.float16,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
    static_groups: bool = True,
    inverse_cholesky=None,
) -> QTensor:
    """GPTQ of w (out, in) against H (in, in) -> QTensor (original column order, fitted spec).

    See the module doc for the algorithm and how groups interact with ``act_order``.
    """
    if w.ndim != 2:
        raise DupqError(f"GPTQ quantizes one (out, in) weight at a time, got shape {tuple(w.shape)}; loop over experts")
    if not mx.issubdtype(w.dtype, mx.floating):
        raise DupqError(f"cannot quantize a {w.dtype} tensor; expected float weights")
    out_f, n = w.shape
    if tuple(H.shape) != (n, n):
        raise DupqError(f"Hessian has shape {tuple(H.shape)}, expected ({n}, {n}) for a weight of shape {(out_f, n)}")
    if damp < 0 or block_size < 1:
        raise DupqError(f"damp must be >= 0 and block_size >= 1 (got damp={damp}, block_size={block_size})")
    spec = spec.fit(n)
    w = w.astype(mx.float32)
    H = H.astype(mx.float32)

    diag = np.array(mx.diagonal(H))
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(n)
    inv_perm = np.argsort(perm)
    if act_order:
        idx = mx.array(perm)
        H = H[idx][:, idx]
    U = (inverse_cholesky or reference_inverse_cholesky)(H, diag[perm], damp)

    g = spec.group_for(n)
    n_groups = n // g
    col_spec = dataclasses.replace(spec, group_size=0)  # codes_for on a single column
    scales: list[mx.array | None] = [None] * n_groups
    offsets: list[mx.array | None] = [None] * n_groups
    biases: list[mx.array | None] = [None] * n_groups
    if static_groups or spec.group_size in (0, -1):
        init = rtn_quantize(w, spec, dtype)
        off = init.offsets()
        for k in range(n_groups):
            scales[k] = init.scales[:, k : k + 1]
            offsets[k] = off[:, k : k + 1]
            biases[k] = None if init.biases is None else init.biases[:, k : k + 1]

    wp = w[:, mx.array(perm)] if act_order else w
    tail = wp  # current values of the columns not yet reached by a block
    codes = []
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        W1, tail = tail[:, : b1 - b0], tail[:, b1 - b0 :]
        Ub = U[b0:b1, b0:b1]
        errs: list[mx.array] = []
        for i in range(b1 - b0):
            gi = int(perm[b0 + i]) // g
            if scales[gi] is None:
                cur = _group_now(W1, tail, errs, U, inv_perm[gi * g : (gi + 1) * g], b0, b1)
                qt = rtn_quantize(cur, dataclasses.replace(spec, group_size=0), dtype)
                scales[gi], offsets[gi], biases[gi] = qt.scales, qt.offsets(), qt.biases
            col = W1[:, i : i + 1]
            q = codes_for(col, scales[gi], offsets[gi], col_spec)
            wq = q.astype(mx.float32) * scales[gi].astype(mx.float32) + offsets[gi]
            e = (col - wq) / Ub[i, i]
            W1 = W1 - e * Ub[i : i + 1, :]  # U is upper triangular: only columns >= i move
            errs.append(e)
            codes.append(q)
        if b1 < n:
            tail = tail - mx.concatenate(errs, axis=1) @ U[b0:b1, b1:]
        mx.eval(tail, codes[b0:b1], [s for s in scales if s is not None])

    qcodes = mx.concatenate(codes, axis=1)
    if act_order:
        qcodes = qcodes[:, mx.array(inv_perm)]
    return QTensor(
        codes=qcodes,
        scales=mx.concatenate(scales, axis=1),
        biases=None if spec.symmetric else mx.concatenate(biases, axis=1),
        spec=spec,
    )


def _group_now(W1, tail, errs, U, pos, b0, b1) -> mx.array:
    """Current values (out, g) of a group's columns (permuted positions ``pos``, original order).

    Every position is >= the column being rounded; those in the block come from ``W1``, those
    beyond it from ``tail`` minus the block's errors so far (``errs`` (out, 1) each).
    """
    in_block = pos < b1
    parts, order = [], []
    if in_block.any():
        parts.append(W1[:, mx.array(pos[in_block] - b0)])
        order.append(np.nonzero(in_block)[0])
    if (~in_block).any():
        far = pos[~in_block]
        vals = tail[:, mx.array(far - b1)]
        if errs:
            vals = vals - mx.concatenate(errs, axis=1) @ U[b0 : b0 + len(errs)][:, mx.array(far)]
        parts.append(vals)
        order.append(np.nonzero(~in_block)[0])
    cur = mx.concatenate(parts, axis=1)
    return cur[:, mx.array(np.argsort(np.concatenate(order)))]


def reference_inverse_cholesky(H: mx.array, diag: np.ndarray, damp: float) -> mx.array:
    """Upper Cholesky factor of ``(H + damping)^-1``: (n, n) -> (n, n) float32 (see module doc)."""
    n = H.shape[0]
    live = diag > 0
    mean_diag = float(diag[live].mean()) if live.any() else 1.0
    fix = np.where(live, 0.0, mean_diag).astype(np.float32)
    H = H + mx.diag(mx.array(fix))
    eye = mx.eye(n, dtype=mx.float32)
    d = damp
    for _ in range(MAX_DAMP_TRIES):
        L = mx.linalg.cholesky(H + (d * mean_diag) * eye, stream=mx.cpu)
        U = mx.linalg.cholesky(mx.linalg.cholesky_inv(L, stream=mx.cpu), upper=True, stream=mx.cpu)
        ok = mx.all(mx.isfinite(L)) & mx.all(mx.isfinite(U)) & (mx.min(mx.diagonal(L)) > 0) & (mx.min(mx.diagonal(U)) > 0)
        if ok.item():
            return U
        d = max(d * 10, 1e-4)
    raise DupqError(
        f"the Hessian is not positive definite even with damping {d / 10:g}; "
        "use more calibration tokens or a larger damp"
    )
