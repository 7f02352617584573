"""Aggregation weights of parallel copies, fitted on calibration inputs (F5.3).

Everything is computed from the copies' effective weights ``W_k`` (out, in) (original basis, see
:func:`mlx_dupq.dup.copies.effective_weight`), the float weight ``W`` and the calibration Hessian
``H = X^T X`` (in, in) -- what :func:`mlx_dupq.input_stats.layer_input_hessians` already collects -- so
no calibration outputs have to be kept: with ``D_k = W_k - W`` the output errors are
``<X D_j^T, X D_k^T> = sum((D_j H) * D_k)``.

The aggregated output is ``y = sum_k a_k y_k`` with ``a`` of shape (K,) or (K, out):

- ``mean``: ``a_k = 1/K`` (returned as None).
- ``variance_weighted``: the minimum-variance combination with ``sum_k a_k = 1``,
  ``a = C^-1 1 / (1^T C^-1 1)``, ``C_jk`` the error covariance of copies j and k (the diagonal-only
  ``1/var_k`` rule is its special case for uncorrelated copies; copies of one weight are
  correlated, so the full ``C`` is used). The mean is feasible, so on the calibration data it is
  never worse than the mean.
- ``learned``: unconstrained least squares ``min_a ||sum_k a_k y_k - y||^2`` (scalar per copy),
  also never worse than the mean on the data it was fitted on.
- ``selective``: per output channel, the candidate with the lowest calibration error among every
  single copy *and* the mean of all copies (so never worse than the mean), as one-hot / uniform
  columns of ``a`` (K, out).

A fitted combination that is (numerically) worse than the mean falls back to the mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from ..errors import DupqError
from .specs import AGGREGATIONS

RIDGE = 1e-9


def hessian_of(x: mx.array) -> mx.array:
    """Calibration inputs (..., in) -> ``X^T X`` (in, in) float32."""
    x = x.reshape(-1, x.shape[-1]).astype(mx.float32)
    return x.T @ x


def _gram(ws: Sequence[mx.array], w: mx.array, hessian: mx.array) -> tuple[np.ndarray, np.ndarray]:
    """(C (K, K) error inner products, per-channel errors (K, out))."""
    d = [wk.astype(mx.float32) - w.astype(mx.float32) for wk in ws]
    dh = [dk @ hessian for dk in d]
    k = len(d)
    c = np.zeros((k, k))
    for i in range(k):
        for j in range(i, k):
            c[i, j] = c[j, i] = float(mx.sum(dh[i] * d[j]).item())
    per = np.stack([np.array(mx.sum(dh[i] * d[i], axis=1)) for i in range(k)]).astype(np.float64)
    return c, per


def output_error(ws: Sequence[mx.array], w: mx.array, hessian: mx.array, mix: mx.array | None) -> float:
    """``||sum_k a_k X W_k^T - X W^T||^2`` (a = mix, None: the mean)."""
    k = len(ws)
    a = np.full((k,), 1.0 / k) if mix is None else np.array(mix, dtype=np.float64)
    if a.ndim == 1:
        wa = sum(float(a[i]) * ws[i].astype(mx.float32) for i in range(k))
    else:
        wa = sum(mx.array(a[i].astype(np.float32))[:, None] * ws[i].astype(mx.float32) for i in range(k))
    dd = wa - w.astype(mx.float32)
    return float(mx.sum((dd @ hessian) * dd).item())


def fit_mix(ws: Sequence[mx.array], w: mx.array, hessian: mx.array, aggregation: str) -> mx.array | None:
    """Aggregation weights for copies with effective weights ``ws`` [(out, in)] of float ``w``.

    hessian: (in, in) ``X^T X`` of the calibration inputs. Returns None (mean), (K,) or (K, out).
    """
    if aggregation not in AGGREGATIONS:
        raise DupqError(f"unknown aggregation {aggregation!r}; use one of {', '.join(AGGREGATIONS)}")
    k = len(ws)
    if aggregation == "mean" or k == 1:
        return None
    c, per = _gram(ws, w, hessian)
    ridge = RIDGE * max(float(np.trace(c)), 1e-30)
    if aggregation == "variance_weighted":
        v = np.linalg.solve(c + ridge * np.eye(k), np.ones(k))
        a = v / v.sum()
        mix = mx.array(a.astype(np.float32))
    elif aggregation == "learned":
        w32 = w.astype(mx.float32)
        yh = [wk.astype(mx.float32) @ hessian for wk in ws]
        g = np.array([[float(mx.sum(yh[i] * ws[j].astype(mx.float32)).item()) for j in range(k)] for i in range(k)])
        r = np.array([float(mx.sum(yh[i] * w32).item()) for i in range(k)])
        a = np.linalg.solve(g + RIDGE * max(float(np.trace(g)), 1e-30) * np.eye(k), r)
        mix = mx.array(a.astype(np.float32))
    else:  # selective
        wmean = sum(wk.astype(mx.float32) for wk in ws) / k
        dm = wmean - w.astype(mx.float32)
        mean_err = np.array(mx.sum((dm @ hessian) * dm, axis=1)).astype(np.float64)
        cand = np.concatenate([per, mean_err[None]], axis=0)  # (K+1, out)
        best = np.argmin(cand, axis=0)
        a = np.zeros((k, per.shape[1]), dtype=np.float32)
        for i in range(k):
            a[i, best == i] = 1.0
        a[:, best == k] = 1.0 / k
        mix = mx.array(a)
    if output_error(ws, w, hessian, mix) > output_error(ws, w, hessian, None):
        return None
    return mix
