"""Faster dense matmuls while a pack's scales / biases train (the codes fixed): the codes unpacked once.

A CPU training step runs every quantized linear on its dense path, ``x @ mx.dequantize(codes,
scales, biases).T`` (:mod:`mlx_dupq.layers.cpu`, ``_DupqBase._matmul``), so it rebuilds every weight
from its packed codes twice per step (forward, backward). mlx's CPU ``dequantize`` unpacks bits at
~9 ns per weight; with the codes already unpacked to one uint8 per weight the same weight is
``codes * scales + biases`` per group, ~6x faster (4.2 against 24 ms for a 4864 x 896 2-bit
matrix, one core), with the same float32 values bit for bit (``tests/test_refine_e2e.py``), and
so the same loss and gradients. The codes cost one byte per weight while training.

Evaluation that runs many short passes (``eval tasks``: one ~100-token pass per item; ``eval
agree``'s windows) has the same cost: at ~100 rows, dequantizing a weight costs 2-10x its matmul
(Qwen2.5-0.5B MLP shape: 18-87 ms to dequantize at 4 / 3 bits against ~9 ms for the matmul), so
:func:`codes_unpacked` holds the codes for the length of such an evaluation (same values, same scores).

:func:`unpack_codes` re-classes a model's quantized linears (and tied heads) to subclasses that
do this on their dense path only (inputs of at least ``CPU_DENSE_MIN_ROWS`` rows on the CPU);
decode-sized inputs and embeddings' row lookups (they gather the rows first) keep their own paths.
Switch (expert) layers give the dense-experts path of :class:`mlx_dupq.layers.cpu.DensePrefillSwitchGLU`
their weights from the codes the same way (``dense_weight``). It returns a function that puts the
classes back and drops the codes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

from ..layers.cpu import (DensePrefillQuantizedEmbedding, DensePrefillQuantizedLinear,
                          DensePrefillQuantizedSwitchLinear, _dense)
from ..layers.quant_linear import DupqEmbedding, DupqLinear, DupqSwitchLinear

CODES = "_train_codes"  # plain attribute (not a parameter): (rows, in) uint8


def codes_of(weight: mx.array, group_size: int, bits: int, n_groups: int) -> mx.array:
    """Packed mlx affine codes (rows, in*bits/32) -> unpacked codes (rows, in) uint8 (``bits <= 8``)."""
    shape = (*weight.shape[:-1], n_groups)
    ones, zeros = mx.ones(shape, dtype=mx.float32), mx.zeros(shape, dtype=mx.float32)
    return mx.dequantize(weight, ones, zeros, group_size=group_size, bits=bits).astype(mx.uint8)


def from_codes(codes: mx.array, scales: mx.array, biases: mx.array, dtype: mx.Dtype) -> mx.array:
    """``codes * s + b`` per group: equals ``mx.dequantize`` of the packed codes in ``dtype``."""
    *lead, n = codes.shape
    g = n // scales.shape[-1]
    s, b = scales.astype(dtype)[..., None], biases.astype(dtype)[..., None]
    return (codes.reshape(*lead, n // g, g) * s + b).reshape(*lead, n)


class _CodesQuantizedLinear(DensePrefillQuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        codes = getattr(self, CODES, None)
        if codes is None or not _dense(x, self):
            return super().__call__(x)
        y = x @ from_codes(codes, self["scales"], self["biases"], x.dtype).T
        return y + self["bias"] if "bias" in self else y


class _CodesQuantizedEmbedding(DensePrefillQuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        codes = getattr(self, CODES, None)
        if codes is None or not _dense(x, self):
            return super().as_linear(x)
        return x @ from_codes(codes, self["scales"], self["biases"], x.dtype).T


class _CodesQuantizedSwitchLinear(DensePrefillQuantizedSwitchLinear):
    def dense_weight(self, dtype: mx.Dtype) -> mx.array:
        return from_codes(getattr(self, CODES), self["scales"], self["biases"], dtype)


class _CodesDupqMixin:
    def dense_weight(self, dtype: mx.Dtype) -> mx.array:
        k = self._kernel()  # the kernel scales / offsets of the current stored arrays (codes kept)
        return from_codes(getattr(self, CODES), k.scales, k.biases, dtype)


class _CodesDupqLinear(_CodesDupqMixin, DupqLinear):
    pass


class _CodesDupqSwitchLinear(_CodesDupqMixin, DupqSwitchLinear):
    pass


class _CodesDupqEmbedding(_CodesDupqMixin, DupqEmbedding):
    pass


# only the classes whose dense path dequantizes (a bare nn.QuantizedLinear runs mx.quantized_matmul:
# other float rounding; the loader gives every mlx layer of a pack its dense prefill class)
_SWAP = {DensePrefillQuantizedLinear: _CodesQuantizedLinear, DensePrefillQuantizedEmbedding: _CodesQuantizedEmbedding,
         DensePrefillQuantizedSwitchLinear: _CodesQuantizedSwitchLinear,
         DupqLinear: _CodesDupqLinear, DupqEmbedding: _CodesDupqEmbedding, DupqSwitchLinear: _CodesDupqSwitchLinear}


def unpack_codes(model: nn.Module) -> Callable[[], None]:
    """Give each quantized linear / tied head of ``model`` its unpacked codes (see module doc);
    returns ``restore()``, which puts the original classes back and frees the codes."""
    swapped: list[tuple[nn.Module, type]] = []
    for _, m in model.named_modules():
        cls = type(m)
        if cls not in _SWAP:
            continue
        if isinstance(m, (DupqLinear, DupqEmbedding, DupqSwitchLinear)):
            k = m._kernel()
            if k is None or k.bits > 8:
                continue
            codes = codes_of(k.weight, k.group_size, k.bits, k.scales.shape[-1])
        else:
            if getattr(m, "mode", "affine") != "affine" or m.bits > 8:
                continue
            codes = codes_of(m["weight"], m.group_size, m.bits, m["scales"].shape[-1])
        mx.eval(codes)
        object.__setattr__(m, CODES, codes)
        m.__class__ = _SWAP[cls]
        swapped.append((m, cls))

    def restore() -> None:
        for m, cls in swapped:
            m.__class__ = cls
            object.__delattr__(m, CODES)

    return restore


@contextmanager
def codes_unpacked(*models: nn.Module) -> Iterator[None]:
    """:func:`unpack_codes` on each model for the body of a ``with`` block, then ``restore()``
    (on the CPU only: elsewhere no layer takes the dense path, so nothing is unpacked)."""
    if mx.default_device() != mx.cpu:
        yield
        return
    restores = []
    try:
        for m in models:
            restores.append(unpack_codes(m))
        yield
    finally:
        for restore in reversed(restores):
            restore()
