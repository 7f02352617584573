"""Trainable fake quantization for every stored format, and the way back to a :class:`QTensor`.

A quantized weight (:mod:`mlx_dupq.quant.qtensor`) is, per group of ``g`` weights along the last
axis, ``w_hat = s * q + b`` with codes ``q`` in ``[0, L-1]``. Every format we store is that form:
affine 1-8 bits (mlx's own layout or ours), symmetric (``b = -s (L-1)/2``, implied), ternary
(``L = 3``), binary (``L = 2``); per group, per channel (one group per row) or per tensor (one
``s``, ``b`` for the whole weight). Training moves ``s``, ``b`` and optionally a latent float weight
``w`` whose codes are re-rounded at every step::

    codes fixed:     w_hat = s * q0 + b
    latent weights:  q = clip(round_ste((w - b) / s), 0, L-1),   w_hat = s * q + b
    (the clip passes the gradient on the closed range [0, L-1], zero outside)
    round_ste(x) = x + stop_gradient(round(x) - x)     (straight-through: d round_ste / dx = 1)

With latent weights this is LSQ's estimator: ``d w_hat / d w = 1`` inside the grid, and
``d w_hat / d s = q - (w - b) / s`` (the rounding residual).

:class:`FakeQuantLinear` trains these values *relative to the initial scale* ``s0`` so that one
learning rate fits every layer (scales differ by orders of magnitude across a model)::

    s = s0 * exp(u)        b = b0 + |s0| * v        w = w0 + |s0| * d      (u, v, d start at 0)

so a scale keeps its sign (RTN may pick a negative scale with the offset at the upper edge: the
same grid, mirrored) and never reaches zero, ``v`` moves the offset in units of the grid step,
and ``d = 0.5`` moves a latent weight half a step, where its code flips.

:func:`FakeQuantLinear.to_qtensor` rounds the trained values to the storage dtype first and only
then forms the codes, so the stored grid is exactly the grid the codes were chosen on, and the
result packs with :func:`mlx_dupq.quant.bitpack.pack` into the very layouts a plain pack has.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..specs import QuantSpec
from ..quant.qtensor import QTensor, codes_for, dequantize, grouped, symmetric_offsets


def round_ste(x: mx.array) -> mx.array:
    """Round to nearest in the forward pass, identity in the backward pass."""
    return x + mx.stop_gradient(mx.round(x) - x)


def offsets(scales: mx.array, biases: mx.array | None, levels: int) -> mx.array:
    """Per-group offsets ``b``: the biases, or the symmetric ``-s (L-1)/2`` (float32, not rounded)."""
    if biases is not None:
        return biases
    return -scales * ((levels - 1) / 2)


def fake_quant(scales: mx.array, biases: mx.array | None, spec: QuantSpec, *, codes: mx.array | None = None,
               latent: mx.array | None = None) -> mx.array:
    """Differentiable dequantized weight (..., in) float32.

    scales, biases: (..., n_groups), or broadcastable to it (per tensor: (1, ..., 1));
    ``biases`` None for a symmetric spec. Exactly one of ``codes`` (..., in) (fixed) and ``latent``
    (..., in) float (re-rounded with :func:`round_ste`) is given.
    """
    if (codes is None) == (latent is None):
        raise ValueError("fake_quant: pass exactly one of codes and latent")
    shape = (codes if codes is not None else latent).shape
    g = spec.group_for(shape[-1])
    s = scales[..., None]
    b = offsets(scales, biases, spec.levels)[..., None]
    if codes is not None:
        q = grouped(codes.astype(mx.float32), g)
    else:
        safe = mx.where(mx.stop_gradient(s) == 0, 1.0, s)
        r = round_ste((grouped(latent, g) - b) / safe)
        # clip with the gradient passed on the grid's closed range (torch.clamp's rule): codes on
        # the edge of the grid still learn to move inwards
        inside = (mx.stop_gradient(r) >= 0) & (mx.stop_gradient(r) <= spec.levels - 1)
        q = mx.where(inside, r, mx.stop_gradient(mx.clip(r, 0, spec.levels - 1)))
    return (q * s + b).reshape(shape)


class FakeQuantLinear(nn.Module):
    """A linear layer that runs a trainable fake-quantized weight: ``x @ w_hat^T (+ bias)``.

    Built from the QTensor the pipeline produced. Trainable parameters (see the module docstring):
    ``scales`` (``u``, log of the scale's factor), ``biases`` (``v``, asymmetric only) and ``latent``
    (``d``, only with ``weights=True``; else the codes are fixed), all zero at the start; the float
    ``bias`` of the linear, if any, is a parameter too. Which of them train is the caller's choice
    (``freeze`` / ``unfreeze``).
    """

    def __init__(self, qt: QTensor, bias: mx.array | None = None, weights: bool = False):
        super().__init__()
        self.spec = qt.spec
        self.per_tensor = qt.spec.group_size == -1
        s = qt.scales.astype(mx.float32)
        b = None if qt.biases is None else qt.biases.astype(mx.float32)
        if self.per_tensor:  # one value for the whole tensor, broadcast over rows
            s = s.reshape(-1)[:1].reshape((1,) * s.ndim)
            b = None if b is None else b.reshape(-1)[:1].reshape((1,) * b.ndim)
        self._s0, self._b0 = s, b
        self._step = mx.abs(s)
        self.scales = mx.zeros_like(s)
        if b is not None:
            self.biases = mx.zeros_like(b)
        self._rows = qt.codes.shape[:-1]
        self._codes = None if weights else qt.codes
        if weights:
            self._w0 = dequantize(qt)
            g = qt.spec.group_for(self._w0.shape[-1])
            self._wstep = self._step if self.per_tensor else mx.repeat(self._step, g, axis=-1)
            self.latent = mx.zeros_like(self._w0)
        if bias is not None:
            self.bias = bias.astype(mx.float32)

    def values(self) -> tuple[mx.array, mx.array | None, mx.array | None]:
        """The trained (scales, biases or None, latent weights or None), float32."""
        s = self._s0 * mx.exp(self.scales)
        b = None if self._b0 is None else self._b0 + self._step * self.biases
        w = None if "latent" not in self else self._w0 + self._wstep * self.latent
        return s, b, w

    def weight_hat(self) -> mx.array:
        """The fake-quantized float32 weight (..., out, in)."""
        s, b, w = self.values()
        return fake_quant(s, b, self.spec, codes=self._codes, latent=w)

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self.weight_hat().T
        return y + self.bias if "bias" in self else y

    def to_qtensor(self, dtype: mx.Dtype) -> QTensor:
        """The trained values as the QTensor a pack stores: scales/biases in ``dtype``, nearest codes
        on that rounded grid (or the fixed codes), per-tensor values broadcast to (..., 1)."""
        s, b, w = self.values()
        s = s.astype(dtype)
        b = None if b is None else b.astype(dtype)
        if self.per_tensor:
            s = mx.broadcast_to(s, (*self._rows, 1))
            b = None if b is None else mx.broadcast_to(b, (*self._rows, 1))
        if w is None:
            codes = self._codes
        else:
            off = symmetric_offsets(s, self.spec.levels) if b is None else b
            codes = codes_for(w, s, off, self.spec)
        return QTensor(codes=codes, scales=s, biases=b, spec=self.spec)


class FakeQuantSwitchLinear(FakeQuantLinear):
    """Stacked experts (E, out, in) as :class:`FakeQuantLinear` trains them, called like mlx-lm's
    ``SwitchLinear``; in a :class:`~mlx_dupq.layers.cpu.DensePrefillSwitchGLU` on the CPU the block
    takes the whole fake-quantized stack (``dense_weight``) and runs every expert as one matmul."""

    @property
    def num_experts(self) -> int:
        return self._rows[0]

    def dense_weight(self, dtype: mx.Dtype) -> mx.array:
        return self.weight_hat().astype(dtype)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        w = self.weight_hat().astype(x.dtype).swapaxes(-1, -2)
        y = mx.gather_mm(x, w, rhs_indices=indices, sorted_indices=sorted_indices)
        return y + mx.expand_dims(self.bias[indices], -2) if "bias" in self else y
