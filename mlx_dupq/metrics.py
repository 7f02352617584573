"""The comparison metrics, one of each (docs/architecture.md, layer "math"): rank correlation,
next-token negative log-likelihood, KL divergence of next-token distributions.

Pure functions of arrays; shapes in each docstring.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .errors import DupqError

CHUNK_BYTES = 256 << 20  # float32 logits per loss chunk


def _ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), 0-based."""
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(len(a), dtype=np.float64)
    for v in np.unique(a):
        idx = a == v
        if idx.sum() > 1:
            ranks[idx] = ranks[idx].mean()
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation of two equal-length 1-D sequences (average ranks for ties);
    nan when shorter than 2 or either is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise DupqError(f"spearman needs two 1-D sequences of equal length, got {a.shape} and {b.shape}")
    if len(a) < 2:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def token_nll_sum(logits: mx.array, targets: mx.array) -> float:
    """Sum over positions of ``-log softmax(logits)[target]``, computed in float32.

    logits: (B, L, V), any float dtype (may be a strided slice); targets: (B, L) int -> python
    float. Rows are processed in chunks of ~CHUNK_BYTES, one float32 chunk at a time; nothing
    else of size (L, V) is copied."""
    B, L, V = logits.shape
    rows = max(1, CHUNK_BYTES // (4 * V))
    total = 0.0
    for b in range(B):
        for s in range(0, L, rows):
            chunk = logits[b, s : s + rows].astype(mx.float32)  # (r, V)
            t = targets[b, s : s + rows]
            picked = mx.take_along_axis(chunk, t[:, None], axis=-1)[:, 0]
            nll = mx.logsumexp(chunk, axis=-1) - picked  # stable log-softmax
            total += float(nll.sum().item())
    return total


def mean_nll(logits: mx.array, tokens: mx.array) -> float:
    """Mean next-token negative log-likelihood of logits (n, L, V) for tokens (n, L)."""
    lg = logits[:, :-1].astype(mx.float32)
    logp = lg - mx.logsumexp(lg, axis=-1, keepdims=True)
    tgt = tokens[:, 1:]
    return float(-mx.mean(mx.take_along_axis(logp, tgt[..., None], axis=-1)).item())


def log_probs(logits: mx.array) -> mx.array:
    """(..., V) logits -> float32 log-probabilities."""
    lg = logits.astype(mx.float32)
    return lg - mx.logsumexp(lg, axis=-1, keepdims=True)


def mean_kl(ref_logp: mx.array, logits: mx.array) -> float:
    """Mean over positions of KL(p_ref || p): ref_logp (n, L, V) log-probabilities, logits (n, L, V)."""
    logp = log_probs(logits)
    kl = mx.sum(mx.exp(ref_logp) * (ref_logp - logp), axis=-1)
    return float(mx.mean(kl).item())
