"""GPTQ: round column by column and push each column's rounding error onto the columns not yet
rounded, weighted by the inverse Hessian of the layer's output error (Frantar et al., 2022).

For a linear layer ``y = x @ W.T`` and calibration inputs ``x`` the output error of a weight
error ``D = W - Q`` is ``E||x D^T||^2 = tr(D H D^T)`` with ``H = E[x x^T]`` (:func:`hessian_from_activations`).
GPTQ minimises it greedily:

1. damping ``H += damp * mean(diag H) * I``; dead inputs (``H_jj == 0``: the column never saw a
   non-zero activation) get ``H_jj = mean(diag H)`` so ``H`` stays invertible. Their weights are
   *kept* (rounded to nearest, no error feedback since their row/column of ``H`` is zero) rather
   than zeroed: a channel silent in calibration is not necessarily silent at run time.
2. ``U = chol(H^-1)`` upper triangular (mlx's CPU LAPACK in float32; if the factor is not positive
   definite the damping is raised 10x, up to :data:`MAX_DAMP_TRIES` times, else DupqError).
3. columns in order (``act_order``: by ``diag H`` descending); column ``j`` is rounded to the
   nearest level of its group's stored grid, ``e = (w_j - q_j) / U_jj`` and the remaining columns
   receive ``w_k -= e * U_jk``. Updates inside a block of ``block_size`` columns are immediate,
   later columns receive the block's accumulated errors in one matmul ("lazy batch updates").

Group parameters. The stored format has groups of contiguous columns in the *original* order
(no permutation index is stored), so act-order can only change the order columns are rounded
in, never which columns share a scale:

- ``static_groups=True`` (default): every group's scale/offset is the RTN rule (:func:`rtn_quantize`)
  on the original weights, fixed before any rounding.
- ``static_groups=False``: a group's scale/offset is fixed the first time one of its
  columns is about to be rounded, by the same RTN rule applied to the group's *current* values
  (original weights plus the error feedback received so far). Without act-order this is the
  reference GPTQ (params at each group's first column); with act-order a group's columns are
  spread over the permuted order and its params are taken when its most important column
  comes up. The current values of columns beyond the current block are computed exactly
  (pending block errors included).

Static is the default because it was better in every low-bit case measured (tests/test_gptq.py
layer, output error vs RTN): the error feedback widens a group's range before a dynamic group
is fitted, which coarsens its grid; 1-bit g64 without act-order even became worse than RTN
(ratio 1.96 dynamic vs 0.80 static; 2-bit g64: 1.08 vs 0.58).

Per-channel (group 0) and per-tensor (-1) have one group per row / tensor, fixed at the start,
so both modes agree there. Because parameters come from ``rtn_quantize`` and codes from
``codes_for`` on the stored (dtype-rounded) grid, GPTQ with ``H = I`` reproduces RTN bit for bit.
All of 1 bit, ternary, 2..8 bits, symmetric or not, work: only the grid differs.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np

from ..specs import QuantSpec
from ..errors import DupqError
from .qtensor import QTensor, codes_for
from .rtn import rtn_quantize

MAX_DAMP_TRIES = 6


def hessian_from_activations(x: mx.array) -> mx.array:
    """``H = X^T X / tokens`` in float32: x (..., in) -> (in, in)."""
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.finalize()


class HessianAccumulator:
    """Streams calibration batches into ``E[x x^T]``: ``add(x (..., in))`` any number of times, then ``finalize()``."""

    def __init__(self, in_features: int):
        self.in_features = int(in_features)
        self.total = mx.zeros((self.in_features, self.in_features), dtype=mx.float32)
        self.tokens = 0

    def add(self, x: mx.array) -> None:
        """Add a batch x (..., in); the running sum is evaluated so memory stays at one (in, in)."""
        if x.shape[-1] != self.in_features:
            raise DupqError(
                f"activation batch has {x.shape[-1]} features, the accumulator expects {self.in_features}; "
                "feed the inputs of one linear layer only"
            )
        xf = x.reshape(-1, self.in_features).astype(mx.float32)
        self.total = self.total + xf.T @ xf
        self.tokens += xf.shape[0]
        mx.eval(self.total)

    def finalize(self) -> mx.array:
        """(in, in) float32 mean of ``x x^T`` over every token added."""
        if self.tokens == 0:
            raise DupqError("no calibration activations were added; run the calibration pass before finalize()")
        return self.total / self.tokens


def gptq_quantize(
    w: mx.array,
    H: mx.array,
    spec: QuantSpec,
    dtype: mx.Dtype = mx.float16,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
    static_groups: bool = True,
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
    U = _inverse_cholesky(H, diag[perm], damp)

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


def _inverse_cholesky(H: mx.array, diag: np.ndarray, damp: float) -> mx.array:
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
