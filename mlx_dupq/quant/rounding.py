"""Rounding variants on the RTN grid: stochastic, shifted (grid offset) and noise-injected.

All three keep the RTN parameters of :func:`~mlx_dupq.quant.rtn.rtn_quantize` (stored in
``dtype``) except where stated, change only how codes are chosen, and return a ``QTensor`` that
the existing packers store unchanged. Codes are always clipped to ``[0, L-1]``.

- :func:`stochastic_round_quantize`: code ``floor(u + (w - b)/s)``, ``u ~ U[0, 1)`` seeded, so
  ``E[s*q + b] = w`` for every weight inside the grid's range (outside it the clip biases it;
  with RTN's range init that only happens for 1-bit / ternary grids, whose levels lie inside the
  range by design, and for the far end of mlx's edge-nudged affine grid).
- :func:`grid_offset_quantize`: levels shifted by ``offset`` of a step towards increasing codes,
  ``b' = b + offset*s``. The shift is folded into the stored bias, so the format is unchanged;
  that needs a stored bias, so symmetric specs accept only ``offset == 0`` (plain RTN).
- :func:`noise_quantize`: nearest code of ``w + n``, ``n ~ U[-noise, noise] * |s|`` seeded -- a
  random perturbation of at most ``noise`` steps before rounding (``noise == 0`` is RTN).
"""

from __future__ import annotations

import mlx.core as mx

from ..specs import QuantSpec
from ..errors import DupqError
from .qtensor import QTensor, codes_for, grouped
from .rtn import rtn_quantize


def stochastic_round_quantize(w: mx.array, spec: QuantSpec, seed: int, dtype: mx.Dtype = mx.float16) -> QTensor:
    """Seeded stochastic rounding on the RTN grid: w (..., in) -> QTensor (same seed, same codes)."""
    qt = rtn_quantize(w, spec, dtype)
    g = qt.group
    s = qt.scales.astype(mx.float32)[..., None]
    b = qt.offsets()[..., None]
    u = mx.random.uniform(shape=w.shape, key=mx.random.key(int(seed)))
    safe = mx.where(s == 0, 1.0, s)
    q = mx.floor((grouped(w.astype(mx.float32), g) - b) / safe + grouped(u, g))
    q = mx.clip(mx.where(s == 0, 0.0, q), 0, qt.spec.levels - 1)
    return QTensor(q.reshape(w.shape).astype(mx.uint8), qt.scales, qt.biases, qt.spec)


def grid_offset_quantize(w: mx.array, spec: QuantSpec, offset: float, dtype: mx.Dtype = mx.float16) -> QTensor:
    """RTN with levels shifted by ``offset`` (in [0, 0.5]) of a step: w (..., in) -> QTensor."""
    offset = float(offset)
    if not 0.0 <= offset <= 0.5:
        raise DupqError(f"grid offset {offset:g} is out of range; use a fraction of a step in [0, 0.5]")
    qt = rtn_quantize(w, spec, dtype)
    if offset == 0.0:
        return qt
    if qt.spec.symmetric:
        raise DupqError(f"a grid offset needs a stored bias, which {qt.spec.label()} lacks; use an asymmetric spec")
    biases = (qt.biases.astype(mx.float32) + offset * qt.scales.astype(mx.float32)).astype(dtype)
    return QTensor(codes_for(w, qt.scales, biases, qt.spec), qt.scales, biases, qt.spec)


def noise_quantize(w: mx.array, spec: QuantSpec, noise: float, seed: int, dtype: mx.Dtype = mx.float16) -> QTensor:
    """Nearest code of ``w`` plus seeded uniform noise of at most ``noise`` (in [0, 0.5]) steps."""
    noise = float(noise)
    if not 0.0 <= noise <= 0.5:
        raise DupqError(f"noise {noise:g} is out of range; use a fraction of a step in [0, 0.5]")
    qt = rtn_quantize(w, spec, dtype)
    if noise == 0.0:
        return qt
    g = qt.group
    u = mx.random.uniform(-1.0, 1.0, shape=w.shape, key=mx.random.key(int(seed)))
    step = mx.abs(qt.scales.astype(mx.float32))[..., None]
    noisy = (grouped(w.astype(mx.float32), g) + noise * step * grouped(u, g)).reshape(w.shape)
    return QTensor(codes_for(noisy, qt.scales, qt.offsets(), qt.spec), qt.scales, qt.biases, qt.spec)
