"""GPTQ: round column by column and push each column's rounding error onto the columns not yet
rounded, weighted by the inverse Hessian of the layer's output error (Frantar et al., 2022).

For a linear layer ``y = x @ W.T`` and calibration inputs ``x`` the output error of a weight
error ``D = W - Q`` is ``E||x D^T||^2 = tr(D H D^T)`` with ``H = E[x x^T]`` (:func:`hessian_from_activations`).
GPTQ minimises it greedily:

1. damping ``H += damp * mean(diag H) * I``; dead inputs (``H_jj == 0``: the column never saw a
   non-zero activation) get ``H_jj = mean(diag H)`` so ``H`` stays invertible. Their weights are
   *kept* (rounded to nearest, no error feedback since their row/column of ``H`` is zero) rather
   than zeroed: a channel silent in calibration is not necessarily silent at run time.
2. ``U = chol(H^-1)`` upper triangular, computed as ``J L^-1 J`` from the Cholesky factor ``L`` of
   the reversed ``J H J`` (mlx's CPU LAPACK in float32; if the factor is not positive definite the
   damping is raised 10x, up to :data:`MAX_DAMP_TRIES` times, else DupqError).
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
``codes_for``'s rule (the same float32 operations, in numpy) on the stored (dtype-rounded) grid,
GPTQ with ``H = I`` reproduces RTN bit for bit. All of 1 bit, ternary, 2..8 bits, symmetric or not,
work: only the grid differs.

Coordinate-descent sweeps (``cd_sweeps``; QuantEase, Behdin et al. 2023; CDQuant, Nair & Suggala
2024). GPTQ visits each column once and never revisits a code after later columns moved. A sweep
of :func:`coordinate_descent` revisits every column ``j`` (original order) with all others fixed
and sets its codes to the grid level nearest ``v_j + G_j / H_jj`` (``v_j`` the column's current
dequantized values, ``R = W - V``, ``G = R H``): the exact minimiser of the same objective
``tr(R H R^T)`` over that column's levels (a 1-D quadratic in each weight, and the grid is evenly
spaced), so no sweep raises it. ``H`` is the damped Hessian GPTQ factorised (same damping, dead
inputs at ``mean(diag H)``, so a dead column keeps its RTN code). The grid stays the one GPTQ used:
static groups' RTN parameters, or the parameters dynamic groups were fixed to during the GPTQ pass;
zero scales keep code 0. Rows are independent (each row's objective is ``r H r^T``), so a sweep
runs over row chunks; inside a chunk, columns go in blocks: a column's change updates ``G`` of the
block's later columns at once (numpy, rank-1), the later blocks receive a block's changes in one
matmul, and ``G`` is recomputed (one matmul) at the start of every sweep so float rounding never
accumulates across sweeps. ``cd_sweeps=0`` (default) returns GPTQ's result unchanged.

Speed (Qwen2.5's down_proj, 896 x 4864): the column loop runs in numpy (one block transposed, so
a column is a contiguous row; per-column mlx ops cost more in dispatch than in arithmetic) over
row chunks that stay in cache, with the same float32 operations as the mlx loop it replaced
(tests/test_gptq_fast.py: bit-identical codes). ``U`` takes one Cholesky and one triangular
inverse (it took a Cholesky, ``cholesky_inv`` and a second Cholesky) and the Hessian is summed with
BLAS ``syrk`` (:class:`HessianAccumulator`): both agree with the previous way up to float32
rounding, which moves a few codes (tests/test_gptq_fast.py).
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np

from ..specs import QuantSpec
from ..errors import DupqError
from .qtensor import QTensor, dequantize
from .rtn import rtn_quantize

MAX_DAMP_TRIES = 6
ROW_CHUNK = 2048  # rows per pass of the column loop: a 128-column block of them is 1 MB


def hessian_from_activations(x: mx.array) -> mx.array:
    """``H = X^T X / tokens`` in float32: x (..., in) -> (in, in)."""
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.finalize()


class HessianAccumulator:
    """Streams calibration batches into ``E[x x^T]``: ``add(x (..., in))`` any number of times, then ``finalize()``.

    The running sum is a numpy float32 array: numpy's ``x.T @ x`` on one buffer is BLAS ``syrk``,
    which computes one triangle (half the flops of mlx's general matmul)."""

    def __init__(self, in_features: int):
        self.in_features = int(in_features)
        self.total = np.zeros((self.in_features, self.in_features), dtype=np.float32)
        self.tokens = 0

    def add(self, x: mx.array) -> None:
        """Add a batch x (..., in); memory stays at one (in, in) sum plus the batch."""
        if x.shape[-1] != self.in_features:
            raise DupqError(
                f"activation batch has {x.shape[-1]} features, the accumulator expects {self.in_features}; "
                "feed the inputs of one linear layer only"
            )
        xf = np.asarray(x.reshape(-1, self.in_features).astype(mx.float32))
        self.total += xf.T @ xf
        self.tokens += xf.shape[0]

    def finalize(self) -> mx.array:
        """(in, in) float32 mean of ``x x^T`` over every token added."""
        if self.tokens == 0:
            raise DupqError("no calibration activations were added; run the calibration pass before finalize()")
        return mx.array(self.total / np.float32(self.tokens))


def gptq_quantize(
    w: mx.array,
    H: mx.array,
    spec: QuantSpec,
    dtype: mx.Dtype = mx.float16,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
    static_groups: bool = True,
    cd_sweeps: int = 0,
) -> QTensor:
    """GPTQ of w (out, in) against H (in, in) -> QTensor (original column order, fitted spec).

    See the module doc for the algorithm and how groups interact with ``act_order``. The
    column loop runs in numpy on one block (transposed, a column is a contiguous row); the
    block's errors reach the later columns through one mlx matmul per block. ``cd_sweeps`` > 0
    then runs that many :func:`coordinate_descent` sweeps on GPTQ's grid and damped Hessian.
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
    check_sweeps(cd_sweeps)
    spec = spec.fit(n)
    w = w.astype(mx.float32)
    Hn = np.array(H.astype(mx.float32))

    diag = np.diagonal(Hn).copy()
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(n)
    inv_perm = np.argsort(perm)
    if act_order:
        Hn = Hn.take(perm, axis=0).take(perm, axis=1)
    if cd_sweeps:
        Un, damp_used = _damped_inverse_cholesky(Hn, diag[perm], damp)
    else:
        Un = _inverse_cholesky(Hn, diag[perm], damp)
    del Hn
    U = mx.array(Un)

    g = spec.group_for(n)
    n_groups = n // g
    top = np.float32(spec.levels - 1)
    # per group (rows = groups): float32 scale, offset, the scale used as divisor, zero-scale mask
    S = np.zeros((n_groups, out_f), dtype=np.float32)
    B = np.zeros((n_groups, out_f), dtype=np.float32)
    safe = np.ones((n_groups, out_f), dtype=np.float32)
    zero = np.zeros((n_groups, out_f), dtype=bool)
    has_zero = np.zeros(n_groups, dtype=bool)
    known = np.zeros(n_groups, dtype=bool)
    scales: list[mx.array | None] = [None] * n_groups
    biases: list[mx.array | None] = [None] * n_groups
    init = None

    def fix_group(k: int, scale: mx.array, offset: mx.array) -> None:
        S[k] = np.array(scale.astype(mx.float32)).reshape(out_f)
        B[k] = np.array(offset.astype(mx.float32)).reshape(out_f)
        zero[k] = S[k] == 0
        has_zero[k] = zero[k].any()
        safe[k] = np.where(zero[k], np.float32(1), S[k])
        known[k] = True

    if static_groups or spec.group_size in (0, -1):
        init = rtn_quantize(w, spec, dtype)
        off = init.offsets()
        for k in range(n_groups):
            fix_group(k, init.scales[:, k], off[:, k])

    col_group = perm // g
    # current values of the columns not yet reached by a block
    tail = mx.array(np.array(w).take(perm, axis=1)) if act_order else w
    codes = np.empty((n, out_f), dtype=np.uint8)  # permuted order, transposed
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        W1, tail = np.array(tail[:, : b1 - b0]).T.copy(), tail[:, b1 - b0 :]  # (block, out)
        Ub = Un[b0:b1, b0:b1]
        E = np.empty_like(W1)  # the block's scaled errors, one row per column
        # rows are independent once every group of the block is fixed: run the block over row chunks
        # that stay in cache (a 151936-row lm_head block is 78 MB); a group still to be fitted needs all rows
        step = ROW_CHUNK if known[col_group[b0:b1]].all() else out_f
        tmp = np.empty((b1 - b0, min(step, out_f)), dtype=np.float32)  # for the rank-1 updates
        for r0 in range(0, out_f, step):
            rows = slice(r0, r0 + step)
            Wc, Ec = W1[:, rows], E[:, rows]
            for i in range(b1 - b0):
                k = col_group[b0 + i]
                if not known[k]:
                    cur = _group_now(W1, tail, E[:i], U, inv_perm[k * g : (k + 1) * g], b0, b1)
                    qt = rtn_quantize(cur, dataclasses.replace(spec, group_size=0), dtype)
                    fix_group(k, qt.scales, qt.offsets())
                    scales[k], biases[k] = qt.scales, qt.biases
                col = Wc[i]
                q = np.round((col - B[k, rows]) / safe[k, rows])
                if has_zero[k]:
                    q[zero[k, rows]] = 0
                np.clip(q, 0, top, out=q)
                codes[b0 + i, rows] = q
                Ec[i] = (col - (q * S[k, rows] + B[k, rows])) / Ub[i, i]
                # U is upper triangular: only later columns move, w_k -= U_ik * e_i
                upd = np.multiply(Ub[i, i + 1 :, None], Ec[i], out=tmp[: b1 - b0 - i - 1, : Wc.shape[1]])
                np.subtract(Wc[i + 1 :], upd, out=Wc[i + 1 :])
        if b1 < n:
            tail = tail - mx.array(E.T) @ U[b0:b1, b1:]
            mx.eval(tail)

    qcodes = mx.array(codes[inv_perm].T) if act_order else mx.array(codes.T)
    if init is not None:
        qt = QTensor(codes=qcodes, scales=init.scales, biases=init.biases, spec=spec)
    else:
        qt = QTensor(
            codes=qcodes,
            scales=mx.concatenate(scales, axis=1),
            biases=None if spec.symmetric else mx.concatenate(biases, axis=1),
            spec=spec,
        )
    if cd_sweeps:
        qt = coordinate_descent(w, damped_hessian(H, damp_used), qt, cd_sweeps, block_size)
    return qt


def check_sweeps(sweeps) -> None:
    """``cd_sweeps`` must be an integer >= 0 (one-line DupqError otherwise)."""
    if isinstance(sweeps, bool) or not isinstance(sweeps, (int, np.integer)) or sweeps < 0:
        raise DupqError(f"cd_sweeps {sweeps!r} must be an integer >= 0 (0 = plain GPTQ)")


def damped_hessian(H: mx.array, damp: float) -> np.ndarray:
    """(in, in) -> float32 numpy ``H`` as GPTQ factorises it: dead inputs (``H_jj == 0``) at
    ``mean(diag H)`` of the live ones, plus ``damp * mean(diag H)`` on the diagonal."""
    Hn = np.array(H.astype(mx.float32))
    fixed, mean_diag = _live_diagonal(np.diagonal(Hn).copy())
    Hn[np.diag_indices_from(Hn)] = fixed + np.float32(damp * mean_diag)
    return Hn


def _live_diagonal(diag: np.ndarray) -> tuple[np.ndarray, float]:
    """``diag`` with dead inputs (``H_jj == 0``) set to the mean of the live ones, and that mean
    (1.0 when every input is dead): the undamped diagonal GPTQ factorises."""
    live = diag > 0
    mean_diag = float(diag[live].mean()) if live.any() else 1.0
    return diag + np.where(live, 0.0, mean_diag).astype(np.float32), mean_diag


def layer_objective(w: mx.array, H: np.ndarray, qt: QTensor) -> float:
    """``tr((W - Q) H (W - Q)^T)`` in float64: the quantity GPTQ and coordinate descent minimise."""
    R = (np.array(w.astype(mx.float32)) - np.array(dequantize(qt))).astype(np.float64)
    return float(np.einsum("ij,ij->", R @ H.astype(np.float64), R))


def coordinate_descent(w: mx.array, H: np.ndarray, qt: QTensor, sweeps: int = 1, block_size: int = 128) -> QTensor:
    """``sweeps`` cyclic coordinate-descent sweeps over the codes of ``qt`` (module doc) -> QTensor.

    w (out, in) the float weight, H (in, in) float32 the (damped) Hessian with a positive diagonal,
    qt its quantization (grid kept: same scales/biases/spec, only codes change).
    """
    check_sweeps(sweeps)
    if block_size < 1:
        raise DupqError(f"block_size must be >= 1 (got {block_size})")
    if w.ndim != 2 or tuple(qt.codes.shape) != tuple(w.shape) or tuple(H.shape) != (w.shape[1], w.shape[1]):
        raise DupqError(f"coordinate descent needs w (out, in), codes of the same shape and H (in, in); "
                        f"got {tuple(w.shape)}, {tuple(qt.codes.shape)}, {tuple(H.shape)}")
    if sweeps == 0:
        return qt
    out_f, n = w.shape
    H = np.ascontiguousarray(H, dtype=np.float32)
    if not (np.diagonal(H) > 0).all():
        raise DupqError("coordinate descent needs a Hessian with a positive diagonal; damp it (damped_hessian)")
    g = qt.group
    col_group = np.arange(n) // g
    top = np.float32(qt.spec.levels - 1)
    S = np.ascontiguousarray(np.array(qt.scales.astype(mx.float32)).reshape(out_f, -1).T)  # (groups, out)
    B = np.ascontiguousarray(np.array(qt.offsets()).reshape(out_f, -1).T)
    zero = S == 0
    has_zero = zero.any(axis=1)
    safe = np.where(zero, np.float32(1), S)
    W = np.array(w.astype(mx.float32))
    codes = np.array(qt.codes).T.copy()  # (in, out): a column is a contiguous row
    for r0 in range(0, out_f, ROW_CHUNK):
        rows = slice(r0, r0 + ROW_CHUNK)
        Wt = np.ascontiguousarray(W[rows].T)  # (in, rows)
        C = codes[:, rows]
        Rt = Wt - (C.astype(np.float32) * S[col_group, rows] + B[col_group, rows])
        for _ in range(sweeps):
            Gt = H @ Rt  # G^T = H R^T, H symmetric
            for b0 in range(0, n, block_size):
                b1 = min(b0 + block_size, n)
                Hb = H[b0:b1, b0:b1]
                before = Rt[b0:b1].copy()
                for i in range(b1 - b0):
                    j, k = b0 + i, col_group[b0 + i]
                    target = (Wt[j] - Rt[j]) + Gt[j] / Hb[i, i]  # the column's optimum, others fixed
                    q = np.round((target - B[k, rows]) / safe[k, rows])
                    if has_zero[k]:
                        q[zero[k, rows]] = 0
                    np.clip(q, 0, top, out=q)
                    C[j] = q
                    r = Wt[j] - (q * S[k, rows] + B[k, rows])
                    dr = r - Rt[j]
                    Rt[j] = r
                    Gt[j + 1 : b1] += Hb[i, i + 1 :, None] * dr  # H symmetric: row i = column i
                if b1 < n:
                    Gt[b1:] += H[b1:, b0:b1] @ (Rt[b0:b1] - before)
    return dataclasses.replace(qt, codes=mx.array(codes.T))


def _group_now(W1: np.ndarray, tail: mx.array, E: np.ndarray, U: mx.array, pos: np.ndarray, b0: int, b1: int) -> mx.array:
    """Current values (out, g) of a group's columns (permuted positions ``pos``, original order).

    Every position is >= the column being rounded; those in the block come from ``W1`` (block, out),
    those beyond it from ``tail`` minus the block's errors so far (``E`` (columns done, out)).
    """
    in_block = pos < b1
    cur = np.empty((len(pos), W1.shape[1]), dtype=np.float32)
    cur[in_block] = W1[pos[in_block] - b0]
    if (~in_block).any():
        far = pos[~in_block]
        vals = tail[:, mx.array(far - b1)]
        if len(E):
            vals = vals - mx.array(E.T) @ U[b0 : b0 + len(E)][:, mx.array(far)]
        cur[~in_block] = np.array(vals).T
    return mx.array(cur.T)


def _inverse_cholesky(H: np.ndarray, diag: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of ``(H + damping)^-1``: (n, n) -> (n, n) float32 (see module doc).

    With ``J`` the reversal and ``J (H + damping) J = L L^T``, ``U = J L^-1 J`` is upper triangular
    with ``U^T U = (H + damping)^-1``: one Cholesky and one triangular inverse (mlx's CPU LAPACK).
    """
    return _damped_inverse_cholesky(H, diag, damp)[0]


def _damped_inverse_cholesky(H: np.ndarray, diag: np.ndarray, damp: float) -> tuple[np.ndarray, float]:
    """:func:`_inverse_cholesky` and the damping it ended with (raised 10x per failed try)."""
    n = H.shape[0]
    fixed, mean_diag = _live_diagonal(diag)
    Hr = np.ascontiguousarray(H[::-1, ::-1])
    d = damp
    for _ in range(MAX_DAMP_TRIES):
        np.fill_diagonal(Hr, (fixed + np.float32(d * mean_diag))[::-1])
        L = mx.linalg.cholesky(mx.array(Hr), stream=mx.cpu)
        Linv = mx.linalg.tri_inv(L, upper=False, stream=mx.cpu)
        ok = mx.all(mx.isfinite(Linv)) & (mx.min(mx.diagonal(L)) > 0) & (mx.min(mx.diagonal(Linv)) > 0)
        if ok.item():
            return np.ascontiguousarray(np.array(Linv)[::-1, ::-1]), d
        d = max(d * 10, 1e-4)
    raise DupqError(
        f"the Hessian is not positive definite even with damping {d / 10:g}; "
        "use more calibration tokens or a larger damp"
    )
