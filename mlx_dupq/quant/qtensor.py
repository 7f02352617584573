"""The canonical quantized tensor every quantizer produces and every packer consumes.

A weight ``w`` of shape ``(..., in)`` is cut along its last axis into groups of ``g`` weights
(``g = spec.group_for(in)``). Each group has a scale ``s`` and, when asymmetric, an offset
``b``; each weight an integer code ``q`` in ``[0, L-1]`` (``L = spec.levels``)::

    asymmetric:  w_hat = s * q + b
    symmetric:   w_hat = s * q + b,  b = -s * (L - 1) / 2 rounded to the scales' dtype

The symmetric offset is implied (the dupq format does not store it; mlx's format must). It is
rounded to the storage dtype (:func:`symmetric_offsets`) because that is the exact bias mlx's
affine kernels (which always take a bias) run with, so the grid a quantizer optimises is the
grid that is executed.

Per-tensor quantization (group_size -1) stores one scale for the whole tensor, broadcast
over rows here as ``(..., 1)`` with identical values. Quantizers (RTN, GPTQ, scale search)
differ only in how they choose ``s``, ``b`` and ``q``; packing (mlx's format or ours) and
the layers that run packed weights are shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..specs import QuantSpec


@dataclass
class QTensor:
    """Codes + per-group parameters of one quantized weight.

    codes:  (..., in) uint8, values in [0, spec.levels - 1]
    scales: (..., in // g) float (storage dtype)
    biases: (..., in // g) float (storage dtype), or None when ``spec.symmetric``
    spec:   the QuantSpec *as applied* (group size already fitted to ``in``)
    """

    codes: mx.array
    scales: mx.array
    biases: mx.array | None
    spec: QuantSpec

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def group(self) -> int:
        return self.spec.group_for(self.codes.shape[-1])

    def offsets(self) -> mx.array:
        """Per-group offset ``b`` (..., n_groups), float32, for both symmetric and asymmetric."""
        if self.biases is not None:
            return self.biases.astype(mx.float32)
        return symmetric_offsets(self.scales, self.spec.levels).astype(mx.float32)


def symmetric_offsets(scales: mx.array, levels: int) -> mx.array:
    """Implied offset of a symmetric grid: ``-s * (L-1)/2`` in the dtype of ``scales``.

    (..., n) -> (..., n). The product is formed in float32 (exact for fp16/bf16 scales) and
    rounded once to the storage dtype, so every consumer (packer, kernels, quantizers) agrees
    bit for bit.
    """
    return (-(scales.astype(mx.float32) * ((levels - 1) / 2))).astype(scales.dtype)


def grouped(w: mx.array, group: int) -> mx.array:
    """(..., in) -> (..., in // group, group)."""
    return w.reshape(*w.shape[:-1], w.shape[-1] // group, group)


def dequantize(qt: QTensor) -> mx.array:
    """QTensor -> float32 weight of shape (..., in)."""
    g = qt.group
    q = grouped(qt.codes.astype(mx.float32), g)
    s = qt.scales.astype(mx.float32)[..., None]
    b = qt.offsets()[..., None]
    return (q * s + b).reshape(qt.shape)


def codes_for(w: mx.array, scales: mx.array, offsets: mx.array, spec: QuantSpec) -> mx.array:
    """Nearest codes for ``w`` given per-group ``scales`` and ``offsets`` (both (..., n_groups)).

    w: (..., in) float -> (..., in) uint8 in [0, L-1]. Zero scales map every weight to code 0
    (whose value is then the offset), so constant groups reproduce exactly.
    """
    g = spec.group_for(w.shape[-1])
    wg = grouped(w.astype(mx.float32), g)
    s = scales.astype(mx.float32)[..., None]
    b = offsets.astype(mx.float32)[..., None]
    safe = mx.where(s == 0, 1.0, s)
    q = mx.round((wg - b) / safe)
    q = mx.where(s == 0, 0.0, q)
    q = mx.clip(q, 0, spec.levels - 1)
    return q.reshape(w.shape).astype(mx.uint8)
