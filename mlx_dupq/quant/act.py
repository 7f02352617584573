"""Simulated (fake) quantization of activations (docs/quality.md, F3): pure functions over mx.array.

Everything is symmetric INT-b: ``q = clip(round(x / s), -Q, Q) * s`` with ``Q = 2^(b-1) - 1`` and
``s = range / Q``; 16 bits is an exact passthrough. The range comes from

- the token itself (dynamic, per token = per row of ``(..., n)``): ``max |x|`` of the row, or a
  percentile of the row's ``|x|``, times ``clip_ratio``;
- calibration (static, one number per linear): :func:`static_range` picks ``max |x|``, a percentile
  or the TensorRT KL threshold (:func:`kl_clip`) from calibration samples, times ``clip_ratio``.

Massive activations (:func:`massive_mask`) can be kept in float: they are excluded from the range
and from rounding, the rest of the row is quantized.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..specs import ActSpec
from ..errors import DupqError

_TINY = 1e-12


def qmax(bits: int) -> int:
    """Largest symmetric level ``2^(b-1) - 1`` (127 for INT8)."""
    return 2 ** (int(bits) - 1) - 1


def quantize_symmetric(x: mx.array, scale: mx.array | float, bits: int) -> mx.array:
    """x (..., n), scale broadcastable to x (e.g. (..., 1) or scalar) -> clip(round(x/s), -Q, Q) * s (..., n)."""
    q = qmax(bits)
    scale = mx.maximum(mx.array(scale, dtype=mx.float32) if not isinstance(scale, mx.array) else scale, _TINY)
    return mx.clip(mx.round(x / scale), -q, q) * scale


def percentile_abs(x: mx.array, p: float, axis: int | None = None) -> mx.array:
    """The ``p``-th percentile of ``|x|`` (linear interpolation, like ``numpy.percentile``).

    x (..., n); axis None -> scalar over all entries, axis -1 -> (..., 1) one value per row.
    """
    a = mx.abs(x.astype(mx.float32))
    if axis is None:
        a = a.reshape(-1)
        axis_ = 0
    else:
        axis_ = axis
    a = mx.sort(a, axis=axis_)
    n = a.shape[axis_]
    pos = (p / 100.0) * (n - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    frac = pos - lo
    v_lo = mx.take(a, mx.array([lo]), axis=axis_)
    v_hi = mx.take(a, mx.array([hi]), axis=axis_)
    out = v_lo + (v_hi - v_lo) * frac
    return out.reshape(()) if axis is None else out


def massive_mask(x: mx.array, rule: str = "sigma3") -> mx.array:
    """x (..., n) -> bool (..., n): the row's massive entries.

    ``sigma<k>``: ``|x| > k * std(row)`` (population std); ``mean<k>``: ``|x| > k * mean(|row|)``.
    A single outlier in a row of n entries can pass ``mean<k>`` only when ``n > k``.
    """
    kind, k = ActSpec(massive_rule=rule).massive_threshold()
    xf = x.astype(mx.float32)
    a = mx.abs(xf)
    if kind == "sigma":
        ref = mx.sqrt(mx.var(xf, axis=-1, keepdims=True))
    else:
        ref = mx.mean(a, axis=-1, keepdims=True)
    return a > k * ref


def per_token_fake_quant(x: mx.array, bits: int, clip_ratio: float = 1.0, percentile: float | None = None) -> mx.array:
    """Dynamic per-token fake quant: x (..., n) -> (..., n), one scale per row.

    Row range = ``max |x|`` (or the ``percentile`` of the row's ``|x|``) times ``clip_ratio``.
    """
    if bits >= 16:
        return x
    xf = x.astype(mx.float32)
    if percentile is None:
        r = mx.max(mx.abs(xf), axis=-1, keepdims=True)
    else:
        r = percentile_abs(xf, percentile, axis=-1)
    return quantize_symmetric(xf, r * clip_ratio / qmax(bits), bits).astype(x.dtype)


def static_fake_quant(x: mx.array, bits: int, clip_value: float) -> mx.array:
    """Static per-tensor fake quant: x (..., n) -> (..., n) with the scale ``clip_value / Q``."""
    if bits >= 16:
        return x
    return quantize_symmetric(x.astype(mx.float32), clip_value / qmax(bits), bits).astype(x.dtype)


def kl_clip(x: mx.array | np.ndarray, bits: int = 8, num_bins: int = 2048) -> float:
    """TensorRT entropy calibration: the |x| threshold whose INT-b histogram loses least (KL).

    x: any shape (the calibration samples). The ``|x|`` histogram has ``num_bins`` bins over
    ``[0, max |x|]``; for each candidate ``i >= 2^(b-1)`` bins, P = the first ``i`` bins with the
    tail folded into the last one, Q = P merged into ``2^(b-1)`` chunks and spread back over the
    chunk's non-empty bins; returns ``i * bin_width`` for the ``i`` minimising KL(P || Q).
    """
    a = np.abs(np.asarray(x, dtype=np.float32)).reshape(-1)
    amax = float(a.max()) if a.size else 0.0
    if amax <= 0.0:
        return 0.0
    hist, edges = np.histogram(a, bins=num_bins, range=(0.0, amax))
    hist = hist.astype(np.float64)
    n_q = 2 ** (int(bits) - 1)
    if n_q >= num_bins:
        return amax
    tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tail[i] = sum(hist[i:])
    best_kl, best_i = np.inf, num_bins
    for i in range(n_q, num_bins + 1):
        p = hist[:i].copy()
        p[-1] += tail[i]
        nonzero = p > 0
        chunk = (np.arange(i) * n_q) // i
        sums = np.bincount(chunk, weights=p, minlength=n_q)
        counts = np.bincount(chunk, weights=nonzero, minlength=n_q)
        q = np.where(nonzero, sums[chunk] / np.maximum(counts[chunk], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if ps <= 0 or qs <= 0:
            continue
        pn, qn = p[nonzero] / ps, q[nonzero] / qs
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(edges[best_i])


def static_range(samples: mx.array | np.ndarray, spec: ActSpec) -> float:
    """One linear's static clip value from its calibration inputs ``samples`` (any shape).

    clip none -> max |x|; percentile -> ``spec.percentile`` of |x|; kl -> :func:`kl_clip`; then
    times ``spec.clip_ratio``. With ``keep_massive`` pass only the non-massive entries.
    """
    a = np.abs(np.asarray(samples, dtype=np.float32)).reshape(-1)
    if a.size == 0:
        raise DupqError("no calibration samples for a static activation range; use more calibration tokens")
    if spec.clip == "none":
        r = float(a.max())
    elif spec.clip == "percentile":
        r = float(percentile_abs(mx.array(a), spec.percentile).item())
    else:
        r = kl_clip(a, spec.bits)
    return r * spec.clip_ratio


def fake_quant(x: mx.array, spec: ActSpec, static_range: float | None = None) -> tuple[mx.array, mx.array]:
    """Fake-quantize activations as ``spec`` says: x (..., n) -> (y (..., n), kept share ()).

    ``kept share`` is the fraction of entries kept in float as massive (0 unless
    ``spec.keep_massive``). Static mode needs ``static_range`` (the calibrated clip value).
    """
    if spec.passthrough:
        return x, mx.array(0.0)
    xf = x.astype(mx.float32)
    mask = massive_mask(xf, spec.massive_rule) if spec.keep_massive else None
    body = mx.where(mask, 0.0, xf) if mask is not None else xf
    if spec.mode == "static":
        if static_range is None:
            raise DupqError(
                "static activation quantization needs a calibrated range per linear; "
                "run mlx_dupq.layers.act_quant.calibrate_static_ranges or use mode = \"dynamic\""
            )
        y = static_fake_quant(body, spec.bits, static_range)
    else:
        pct = spec.percentile if spec.clip == "percentile" else None
        y = per_token_fake_quant(body, spec.bits, spec.clip_ratio, pct)
    if mask is None:
        return y.astype(x.dtype), mx.array(0.0)
    return mx.where(mask, xf, y).astype(x.dtype), mask.astype(mx.float32).mean()
