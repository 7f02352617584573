"""Per-tensor weight statistics (README.md, F1.6): mean, spread, tails and outliers.

Definitions for a tensor with elements ``w_i`` (``n`` of them), all population (biased) moments,
accumulated in float64 over chunks of ~4 M elements so that a 152k x 5120 embedding needs only
a chunk of extra memory:

- ``mean`` = sum(w) / n; ``std`` = sqrt(m2) with ``m_k = sum((w - mean)^k) / n``
- ``kurtosis`` = m4 / m2^2 - 3 (excess, Fisher; 0 for a Gaussian, scipy's default ``bias=True``)
- ``outlier_share`` = share of elements with ``|w - mean| > 3 std`` (0.27 % for a Gaussian)
- ``absmax`` = max |w|; ``max_over_std`` = absmax / std
- ``min``, ``max``, ``numel``

For a constant tensor (``std == 0``) ``kurtosis`` and ``max_over_std`` are NaN and
``outlier_share`` is 0.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import mlx.core as mx
import numpy as np

from .adapter import layer_index

CHUNK = 1 << 22  # elements per float64 chunk (32 MB)


def _chunks(w: mx.array) -> Iterator[np.ndarray]:
    flat = w.reshape(-1)
    for s in range(0, flat.size, CHUNK):
        yield np.asarray(flat[s : s + CHUNK].astype(mx.float32), dtype=np.float64)


def weight_stats(w: mx.array) -> dict:
    """Statistics of one tensor: any shape, any float dtype -> dict of python floats (see module doc)."""
    n = w.size
    if n == 0:
        raise ValueError("weight_stats needs a non-empty tensor")
    mx.eval(w)  # a lazily loaded tensor is read once, not once per pass
    total, lo, hi = 0.0, math.inf, -math.inf
    for c in _chunks(w):
        total += float(c.sum())
        lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
    mean = total / n
    m2 = m4 = 0.0
    for c in _chunks(w):
        d2 = (c - mean) ** 2
        m2 += float(d2.sum())
        m4 += float((d2 * d2).sum())
    m2, m4 = m2 / n, m4 / n
    std = math.sqrt(m2)
    absmax = max(abs(lo), abs(hi))
    if std > 0:
        kurt = m4 / (m2 * m2) - 3.0
        outliers = sum(int(np.count_nonzero(np.abs(c - mean) > 3.0 * std)) for c in _chunks(w))
        max_over_std = absmax / std
    else:
        kurt, outliers, max_over_std = math.nan, 0, math.nan
    return {
        "numel": int(n),
        "mean": mean,
        "std": std,
        "kurtosis": kurt,
        "outlier_share": outliers / n,
        "absmax": absmax,
        "max_over_std": max_over_std,
        "min": lo,
        "max": hi,
    }


def model_weight_stats(named_weights: Iterable[tuple[str, mx.array]]) -> list[dict]:
    """Statistics of every floating-point tensor, one at a time (nothing is kept but the numbers).

    ``named_weights`` yields ``(name, array)``, e.g. ``((k, src.get(k)) for k in src.keys())``.
    Each row: ``{"name", "layer" (decoder layer index or None), "shape", "dtype", **weight_stats}``.
    Integer tensors (packed codes) and empty tensors are skipped."""
    rows = []
    for name, w in named_weights:
        if w.size == 0 or not mx.issubdtype(w.dtype, mx.floating):
            continue
        row = {"name": name, "layer": layer_index(name), "shape": list(w.shape), "dtype": str(w.dtype).replace("mlx.core.", "")}
        row.update(weight_stats(w))
        rows.append(row)
        del w
    return rows
