"""Round-to-nearest (RTN) quantizers: closed-form scales/offsets per group, nearest codes.

Every quantizer here chooses per-group parameters from the float weights alone, rounds them
to the storage dtype, and only then computes the nearest codes on that stored grid
(:func:`~mlx_dupq.quant.qtensor.codes_for`), so what is stored is exactly what was optimised.

Parameter choice per bit width (``L = spec.levels``):

- **asymmetric 2..8 bits**: mlx's own affine rule (``mx.quantize``, CPU and GPU alike): the
  scale spans ``[min, max]`` in ``L-1`` steps, and is then nudged so that the extreme with the
  larger magnitude (the "edge") is exactly representable: ``q0 = round(edge / s)``,
  ``s = edge / q0``, ``b = edge`` (when ``q0 == 0``: ``b = 0``). The scale may be negative
  (codes then count down from the edge). With float32 storage the result is bit-identical to
  ``mx.quantize``; with fp16/bf16 storage the scales/biases are identical and the codes differ
  only where rounding the scale moved a weight across a decision boundary -- there our code is
  the nearest on the stored grid, mlx's is not (it rounds with the unrounded float32 scale).
- **symmetric 2..8 bits**: levels ``s * (q - (L-1)/2)`` centred on zero, ``s = absmax / ((L-1)/2)``.
- **1 bit symmetric**: sign x ``mean|w|`` (the L2-optimal magnitude for sign codes); stored as
  step ``s = 2 * mean|w|`` since the levels are ``+-s/2``.
- **1 bit asymmetric**: two levels = the means of the weights above and below the group mean
  (one Lloyd step of 2-means from the mean split; the L2-optimal pair for that split).
- **ternary symmetric** ``{-1, 0, +1} * s``: TWN init (threshold ``0.7 * mean|w|``, ``s`` = mean of
  ``|w|`` above it), then :data:`TERNARY_ITERS` Lloyd steps ``s <- mean(|w| : |w| > s/2)``. Each
  step alternates the optimal assignment for ``s`` (nearest level = threshold ``s/2``, which is
  also what :func:`codes_for` uses) and the optimal ``s`` for that assignment, so the L2 error
  never increases from the TWN starting point.
- **ternary asymmetric**: levels ``m - s, m, m + s`` around the group mean ``m``, with ``s`` fitted
  to ``w - m`` exactly as in the symmetric case. (Three levels spanning min..max put the outer
  levels at the rare extremes: on Gaussian weights that is worse than 1 bit, 0.67 vs 0.59
  relative error at g64; the centred fit gives 0.52.)

Granularity: groups of 32..512 along the last axis, per channel (group = row) or per tensor
(one scale/offset for the whole tensor; the QTensor broadcasts it as ``(..., 1)``).
Large tensors are processed in row chunks (each evaluated) to bound peak memory.
"""

from __future__ import annotations

import mlx.core as mx

from ..specs import QuantSpec
from ..errors import DupqError
from .qtensor import QTensor, codes_for, grouped, symmetric_offsets

TERNARY_ITERS = 3
MLX_EPS = 1e-7  # mlx's lower bound on the affine scale magnitude
CHUNK_ELEMENTS = 1 << 24  # rows per chunk are chosen so a chunk holds about this many weights


def rtn_quantize(w: mx.array, spec: QuantSpec, dtype: mx.Dtype = mx.float16) -> QTensor:
    """Round-to-nearest quantization of ``w`` (..., in) -> QTensor with the fitted spec.

    ``w`` is a 2-D linear/embedding weight (out, in) or stacked experts (E, out, in); groups run
    along the last axis. Scales/offsets are stored in ``dtype``.
    """
    if w.ndim < 2:
        raise DupqError(f"cannot quantize a tensor of shape {tuple(w.shape)}; expected (..., in) with at least 2 dims")
    if not mx.issubdtype(w.dtype, mx.floating):
        raise DupqError(f"cannot quantize a {w.dtype} tensor; expected float weights")
    spec = spec.fit(w.shape[-1])
    if spec.group_size == -1:
        return _quantize_per_tensor(w, spec, dtype)

    in_features = w.shape[-1]
    g = spec.group_for(in_features)
    rows = w.reshape(-1, in_features)
    step = max(1, CHUNK_ELEMENTS // in_features)
    if rows.shape[0] <= step:
        codes, scales, biases = _quantize_rows(rows, spec, g, dtype)
    else:
        parts = []
        for start in range(0, rows.shape[0], step):
            part = _quantize_rows(rows[start : start + step], spec, g, dtype)
            mx.eval([a for a in part if a is not None])
            parts.append(part)
        codes = mx.concatenate([p[0] for p in parts])
        scales = mx.concatenate([p[1] for p in parts])
        biases = None if spec.symmetric else mx.concatenate([p[2] for p in parts])
    lead = tuple(w.shape[:-1])
    return QTensor(
        codes=codes.reshape(w.shape),
        scales=scales.reshape(*lead, -1),
        biases=None if biases is None else biases.reshape(*lead, -1),
        spec=spec,
    )


def _quantize_rows(rows: mx.array, spec: QuantSpec, g: int, dtype: mx.Dtype):
    """(R, in) -> codes (R, in) uint8, scales (R, in//g), biases (R, in//g) or None."""
    wg = grouped(rows.astype(mx.float32), g)
    scales, offsets, biases = _stored_params(wg, spec, dtype)
    return codes_for(rows, scales, offsets, spec), scales, biases


def _quantize_per_tensor(w: mx.array, spec: QuantSpec, dtype: mx.Dtype) -> QTensor:
    """One scale/offset for the whole tensor, broadcast to (..., 1)."""
    flat = w.astype(mx.float32).reshape(1, 1, -1)
    scale, offset, bias = _stored_params(flat, spec, dtype)  # (1, 1) each
    shape = (*w.shape[:-1], 1)
    scales = mx.broadcast_to(scale.reshape((1,) * len(shape)), shape)
    offsets = mx.broadcast_to(offset.reshape((1,) * len(shape)), shape)
    biases = None if bias is None else mx.broadcast_to(bias.reshape((1,) * len(shape)), shape)
    rows = w.reshape(-1, w.shape[-1])
    step = max(1, CHUNK_ELEMENTS // w.shape[-1])
    if rows.shape[0] <= step:
        codes = codes_for(w, scales, offsets, spec)
    else:
        s1, o1 = scale.reshape(1, 1), offset.reshape(1, 1)
        chunks = []
        for start in range(0, rows.shape[0], step):
            c = codes_for(rows[start : start + step], s1, o1, spec)
            mx.eval(c)
            chunks.append(c)
        codes = mx.concatenate(chunks).reshape(w.shape)
    return QTensor(codes=codes, scales=scales, biases=biases, spec=spec)


def _stored_params(wg: mx.array, spec: QuantSpec, dtype: mx.Dtype):
    """(..., n, g) float32 -> (scales, offsets, biases) (..., n) in ``dtype``; biases None if symmetric."""
    scale, bias = group_params(wg, spec)
    scales = scale.astype(dtype)
    if spec.symmetric:
        return scales, symmetric_offsets(scales, spec.levels), None
    biases = bias.astype(dtype)
    return scales, biases, biases


def group_params(wg: mx.array, spec: QuantSpec) -> tuple[mx.array, mx.array | None]:
    """Float32 RTN parameters of each group, before storage rounding.

    wg: (..., n, g) float32 -> (scale (..., n), offset (..., n) or None when symmetric).
    """
    if spec.ternary:
        if spec.symmetric:
            return _ternary_sym_scale(wg), None
        centre = _group_mean(wg)
        scale = _ternary_sym_scale(wg - centre[..., None])
        return scale, centre - scale
    if spec.bits == 1:
        return (2.0 * mx.mean(mx.abs(wg), axis=-1), None) if spec.symmetric else _two_means(wg)
    if spec.symmetric:
        return mx.max(mx.abs(wg), axis=-1) / ((spec.levels - 1) / 2), None
    return mlx_affine_params(wg, spec.levels)


def mlx_affine_params(wg: mx.array, levels: int) -> tuple[mx.array, mx.array]:
    """mlx's affine rule (see module doc): (..., n, g) float32 -> scale, bias (..., n) float32."""
    n_bins = float(levels - 1)
    w_max = mx.max(wg, axis=-1)
    w_min = mx.min(wg, axis=-1)
    mask = mx.abs(w_min) > mx.abs(w_max)
    scale = mx.maximum((w_max - w_min) / n_bins, MLX_EPS)
    scale = mx.where(mask, scale, -scale)
    edge = mx.where(mask, w_min, w_max)
    q0 = mx.round(edge / scale)
    nonzero = q0 != 0
    scale = mx.where(nonzero, edge / mx.where(nonzero, q0, 1.0), scale)
    bias = mx.where(nonzero, edge, 0.0)
    return scale, bias


def _group_mean(wg: mx.array) -> mx.array:
    """Group mean (..., n, g) -> (..., n); exactly the value of a constant group."""
    w_min = mx.min(wg, axis=-1)
    return mx.where(mx.max(wg, axis=-1) == w_min, w_min, mx.mean(wg, axis=-1))


def _two_means(wg: mx.array) -> tuple[mx.array, mx.array]:
    """1-bit affine levels lo < hi = means below / above the group mean: (..., n, g) -> (hi-lo, lo)."""
    g = wg.shape[-1]
    w_min = mx.min(wg, axis=-1)
    w_max = mx.max(wg, axis=-1)
    mu = mx.mean(wg, axis=-1, keepdims=True)
    above = wg > mu
    n_hi = mx.sum(above, axis=-1).astype(mx.float32)
    n_lo = g - n_hi
    lo = mx.sum(mx.where(above, 0.0, wg), axis=-1) / mx.maximum(n_lo, 1.0)
    hi = mx.where(n_hi > 0, mx.sum(mx.where(above, wg, 0.0), axis=-1) / mx.maximum(n_hi, 1.0), lo)
    lo = mx.clip(lo, w_min, w_max)
    hi = mx.clip(hi, lo, w_max)
    constant = w_max == w_min
    lo = mx.where(constant, w_min, lo)
    hi = mx.where(constant, w_min, hi)
    return hi - lo, lo


def _ternary_sym_scale(wg: mx.array) -> mx.array:
    """Scale of the ternary grid {-s, 0, s}: TWN init + Lloyd steps. (..., n, g) -> (..., n)."""
    t = mx.abs(wg)
    delta = 0.7 * mx.mean(t, axis=-1, keepdims=True)
    scale = _mean_above(t, delta, mx.zeros(t.shape[:-1], dtype=mx.float32))
    for _ in range(TERNARY_ITERS):
        scale = _mean_above(t, scale[..., None] / 2, scale)
    return scale


def _mean_above(t: mx.array, threshold: mx.array, fallback: mx.array) -> mx.array:
    """Mean of ``t`` over entries > threshold, per group; ``fallback`` where there are none."""
    above = t > threshold
    count = mx.sum(above, axis=-1).astype(mx.float32)
    total = mx.sum(mx.where(above, t, 0.0), axis=-1)
    return mx.where(count > 0, total / mx.maximum(count, 1.0), fallback)
