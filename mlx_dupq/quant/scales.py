"""Scale / clip / zero-point search: per group, pick the grid that minimises the (weighted) error.

Every search starts from the RTN parameters (:func:`~mlx_dupq.quant.rtn.rtn_quantize`, the
"range init") and tries candidate grids derived from them; a candidate replaces the current
best of a group only when its error is strictly lower, and the range init is always evaluated
first, so the result is never worse than RTN on the searched objective.

Candidates (``L`` levels, ``k = (L-1)/2``, RTN scale ``s0`` and offset ``b0``; the grid's centre
``c = b0 + k*s0`` is the middle of the levels):

- scale multiplier ``m`` (``grid``): ``s = m*s0``, levels kept centred on ``c``:
  ``b = c - k*s``. ``m < 1`` clips the range (the extremes saturate), ``m > 1`` widens it. For a
  symmetric grid ``c = 0`` and ``b`` is the implied ``-k*s``, so only ``s`` is stored.
- zero-point shift ``t`` (``shifts``, asymmetric only): ``b += t*s`` -- the levels slide by a
  fraction ``t`` of a step, moving the clipping window towards one tail.

Candidate parameters are rounded to the storage ``dtype`` and the error is measured with the
nearest codes on that stored grid (:func:`codes_for`), exactly as :func:`dequantize` will
reconstruct it. Objectives (per group, ``(..., n_groups)``):

- weight MSE: ``sum_j (w_j - q_j)^2``;
- activation-weighted: ``sum_j a_j (w_j - q_j)^2`` with ``a_j = E[x_j^2]`` (AWQ-like importance; it
  is the exact expected output error when the inputs are uncorrelated). Mean ``|x_j|`` also works
  as a cruder importance -- pass it squared.

Per-tensor specs (group -1) search one multiplier/shift for the whole tensor; other specs are
processed in row chunks to bound memory.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..specs import QuantSpec
from ..errors import DupqError
from .qtensor import QTensor, codes_for, grouped, symmetric_offsets
from .rtn import CHUNK_ELEMENTS, rtn_quantize

# multipliers 0.5..2.0, 1.0 included; denser below 1 where clipping pays off
DEFAULT_GRID = tuple(float(v) for v in np.unique(np.round(np.concatenate([np.linspace(0.5, 1.0, 11), np.linspace(1.0, 2.0, 11)]), 6)))
DEFAULT_SHIFTS = tuple(float(v) for v in np.round(np.linspace(-0.5, 0.5, 11), 6))


def activation_importance(x: mx.array) -> mx.array:
    """``E[x_j^2]`` over tokens: x (..., in) -> (in,) float32."""
    xf = x.reshape(-1, x.shape[-1]).astype(mx.float32)
    return mx.mean(xf * xf, axis=0)


def mse_scale_search(w: mx.array, spec: QuantSpec, grid=DEFAULT_GRID, dtype: mx.Dtype = mx.float16) -> QTensor:
    """Per-group scale multiplier from ``grid`` minimising ``||W - Q(W)||^2``: w (..., in) -> QTensor."""
    return _search(w, spec, dtype, grid, (0.0,), None)


def activation_weighted_search(
    w: mx.array,
    x_sq: mx.array,
    spec: QuantSpec,
    grid=DEFAULT_GRID,
    dtype: mx.Dtype = mx.float16,
    shifts=(0.0,),
) -> QTensor:
    """Per-group multiplier (and shift, asymmetric) minimising ``sum_j x_sq_j (w_j - q_j)^2``.

    w (..., in), x_sq (in,) ``E[x_j^2]`` (see :func:`activation_importance`) -> QTensor.
    """
    if tuple(x_sq.shape) != (w.shape[-1],):
        raise DupqError(f"activation statistics have shape {tuple(x_sq.shape)}, expected ({w.shape[-1]},) for this weight")
    if mx.any(x_sq < 0).item():
        raise DupqError("activation importance must be non-negative (pass E[x^2] or mean |x| squared)")
    return _search(w, spec, dtype, grid, shifts, x_sq.astype(mx.float32))


def zero_point_search(
    w: mx.array,
    spec: QuantSpec,
    shifts=DEFAULT_SHIFTS,
    dtype: mx.Dtype = mx.float16,
    x_sq: mx.array | None = None,
    grid=(1.0,),
) -> QTensor:
    """Per-group zero-point shift (fractions of a step) minimising the (weighted) error; asymmetric only.

    w (..., in), optional x_sq (in,) -> QTensor. ``grid`` adds scale multipliers (joint search).
    """
    if spec.symmetric:
        raise DupqError(f"zero-point search needs an asymmetric spec ({spec.label()} has no free offset)")
    if x_sq is not None:
        return activation_weighted_search(w, x_sq, spec, grid, dtype, shifts)
    return _search(w, spec, dtype, grid, shifts, None)


def _search(w, spec, dtype, grid, shifts, importance) -> QTensor:
    grid, shifts = tuple(float(m) for m in grid), tuple(float(t) for t in shifts)
    if not grid or any(m <= 0 for m in grid):
        raise DupqError(f"scale multipliers must be positive, got {grid}")
    if spec.symmetric and any(t != 0 for t in shifts):
        raise DupqError(f"zero-point shifts need an asymmetric spec ({spec.label()} has no free offset)")
    init = rtn_quantize(w, spec, dtype)
    spec = init.spec
    if spec.group_size == -1:
        return _search_rows(w, init, dtype, grid, shifts, importance, whole=True)
    n = w.shape[-1]
    rows = w.reshape(-1, n)
    flat = QTensor(init.codes.reshape(-1, n), init.scales.reshape(rows.shape[0], -1),
                   None if init.biases is None else init.biases.reshape(rows.shape[0], -1), spec)
    step = max(1, CHUNK_ELEMENTS // n)
    parts = []
    for a in range(0, rows.shape[0], step):
        sub = QTensor(flat.codes[a : a + step], flat.scales[a : a + step],
                      None if flat.biases is None else flat.biases[a : a + step], spec)
        part = _search_rows(rows[a : a + step], sub, dtype, grid, shifts, importance, whole=False)
        mx.eval(part.codes, part.scales, part.biases)
        parts.append(part)
    lead = tuple(w.shape[:-1])
    return QTensor(
        codes=mx.concatenate([p.codes for p in parts]).reshape(w.shape),
        scales=mx.concatenate([p.scales for p in parts]).reshape(*lead, -1),
        biases=None if spec.symmetric else mx.concatenate([p.biases for p in parts]).reshape(*lead, -1),
        spec=spec,
    )


def _search_rows(w, init: QTensor, dtype, grid, shifts, importance, whole: bool) -> QTensor:
    """Search on w (..., in) given its RTN QTensor; ``whole``: one choice for the whole tensor."""
    spec = init.spec
    k = (spec.levels - 1) / 2
    wg = grouped(w.astype(mx.float32), init.group)
    imp = None if importance is None else grouped(importance, init.group)
    s0 = init.scales.astype(mx.float32)
    centre = init.offsets() + k * s0

    def error(scales, offsets):
        q = grouped(codes_for(w, scales, offsets, spec).astype(mx.float32), init.group)
        d = wg - (q * scales.astype(mx.float32)[..., None] + offsets.astype(mx.float32)[..., None])
        d = d * d if imp is None else imp * d * d
        e = mx.sum(d, axis=-1)
        return mx.broadcast_to(mx.sum(e), e.shape) if whole else e

    best_s = init.scales
    best_b = init.offsets().astype(dtype) if init.biases is None else init.biases
    best_e = error(best_s, best_b)
    for m in grid:
        for t in shifts:
            if m == 1.0 and t == 0.0:
                continue
            s = (m * s0).astype(dtype)
            sf = s.astype(mx.float32)
            if spec.symmetric:
                b = symmetric_offsets(s, spec.levels)
            else:
                b = (centre - k * sf + t * sf).astype(dtype)
            e = error(s, b)
            better = e < best_e
            best_s = mx.where(better, s, best_s)
            best_b = mx.where(better, b, best_b)
            best_e = mx.where(better, e, best_e)
            mx.eval(best_s, best_b, best_e)
    return QTensor(
        codes=codes_for(w, best_s, best_b, spec),
        scales=best_s,
        biases=None if spec.symmetric else best_b,
        spec=spec,
    )
