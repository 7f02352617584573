"""The canonical quantized tensor every quantizer produces and every packer consumes.

A weight ``w`` of shape ``(..., in)`` is cut along its last axis into groups of ``g`` weights
(``g = spec.group_for(in)``). Each group has a scale ``s`` and, when asymmetric, an offset
``b``; each weight an integer code ``q`` in ``[0, L-1]`` (``L = spec.levels``)::

    asymmetric:  w_hat = s * q + b
    symmetric:   w_hat = s * (q - (L - 1) / 2)        (b is implied: -s * (L-1)/2)

Per-tensor quantization (group_size -1) stores one scale for the whole tensor, broadcast
over rows here as ``(..., 1)`` with identical values. Quantizers (RTN, GPTQ, scale search)
differ only in how they choose ``s``, ``b`` and ``q``; packing (mlx's format or ours) and
the layers that run packed weights are shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..config import QuantSpec


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
        return -self.scales.astype(mx.float32) * ((self.spec.levels - 1) / 2)


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
