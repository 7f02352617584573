"""CPU prefill for mlx's own quantized layers.

mlx's CPU ``quantized_matmul`` costs about one GEMV per input row (Qwen2.5-0.5B MLP shape,
2-bit: ~5 ms per row), so a 512-token perplexity window through ``nn.QuantizedLinear`` is ~10x
slower than the float model. Dequantizing once per call and using BLAS is flat (~20-40 ms).
:func:`use_dense_prefill` re-classes every ``nn.QuantizedLinear`` / ``nn.QuantizedEmbedding`` of a
model to a subclass that does that for inputs of at least ``CPU_DENSE_MIN_ROWS`` rows on the CPU
and keeps the packed kernel for decode. Parameters are untouched (same arrays, same bytes), so
the pack, its bits per weight and ``mlx_lm`` compatibility do not change; results agree with the
packed kernel to float rounding.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .quant_linear import CPU_DENSE_MIN_ROWS


def _dense(x: mx.array, m) -> bool:
    return x.size >= CPU_DENSE_MIN_ROWS * x.shape[-1] and mx.default_device() == mx.cpu


def _weight(m, dtype) -> mx.array:
    return mx.dequantize(m.weight, m.scales.astype(dtype), None if m.biases is None else m.biases.astype(dtype),
                         group_size=m.group_size, bits=m.bits, mode=m.mode)


class DensePrefillQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        if self.mode != "affine" or not _dense(x, self):
            return super().__call__(x)
        y = x @ _weight(self, x.dtype).T
        return y + self["bias"] if "bias" in self else y


class DensePrefillQuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        if self.mode != "affine" or not _dense(x, self):
            return super().as_linear(x)
        return x @ _weight(self, x.dtype).T


def use_dense_prefill(model: nn.Module) -> int:
    """Switch mlx quantized layers of ``model`` to the CPU prefill subclasses; returns how many."""
    n = 0
    for _, m in model.named_modules():
        if type(m) is nn.QuantizedLinear:
            m.__class__ = DensePrefillQuantizedLinear
            n += 1
        elif type(m) is nn.QuantizedEmbedding:
            m.__class__ = DensePrefillQuantizedEmbedding
            n += 1
    return n
