"""CPU prefill for mlx's own quantized layers.

mlx's CPU ``quantized_matmul`` costs about one GEMV per input row (Qwen2.5-0.5B MLP shape,
2-bit: ~5 ms per row), so a 512-token perplexity window through ``nn.QuantizedLinear`` is ~10x
slower than the float model. Dequantizing once per call and using BLAS is flat (~20-40 ms).
:func:`use_dense_prefill` re-classes every ``nn.QuantizedLinear`` / ``nn.QuantizedEmbedding`` of a
model to a subclass that does that for inputs of at least ``CPU_DENSE_MIN_ROWS`` rows on the CPU
and keeps the packed kernel for decode. Parameters are untouched (same arrays, same bytes), so
the pack, its bits per weight and ``mlx_lm`` compatibility do not change; results agree with the
packed kernel to float rounding.

MoE blocks (mlx-lm's ``SwitchGLU``) get :class:`DensePrefillSwitchGLU`: on the CPU, with at least
``CPU_DENSE_MIN_ROWS`` token-expert pairs and when a token picks at least 1 in
``DENSE_EXPERTS_MAX_RATIO`` of the experts, every expert runs on every token as three batched BLAS
matmuls over its dense ``(E, out, in)`` weights, and each token takes the rows of the experts it
picked. That computes ``E / k`` times the picked pairs' FLOPs, but mlx's CPU ``gather_qmm`` /
``gather_mm`` cost about one GEMV per pair: on smollm2-135m-moe (12 experts, top-10, 96 x 576
experts, 2-bit g32/g64, 256 tokens, fp32, OpenBLAS) forward + backward of one block's scales is
107 against 492 ms, a whole forward 2.1 against 12.6 s (``bench/moe_dense_experts.py``). Each projection gives its weight through ``dense_weight(dtype)``
(float and mlx-quantized switch linears here, ``DupqSwitchLinear``, ``MixedSwitchLinear``'s
effective weight, the codes-unpacked classes of :mod:`mlx_dupq.refine.train_codes`, block
reconstruction's ``FakeQuantSwitchLinear``); a block with a projection that has none keeps mlx-lm's path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear

from .quant_linear import CPU_DENSE_MIN_ROWS

#: compute every expert densely while that is at most this many times the picked pairs' FLOPs
DENSE_EXPERTS_MAX_RATIO = 4


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


class DensePrefillSwitchLinear(SwitchLinear):
    def dense_weight(self, dtype: mx.Dtype) -> mx.array:
        return self["weight"].astype(dtype)


class DensePrefillQuantizedSwitchLinear(QuantizedSwitchLinear):
    def dense_weight(self, dtype: mx.Dtype) -> mx.array | None:
        return _weight(self, dtype) if self.mode == "affine" else None


class DensePrefillSwitchGLU(SwitchGLU):
    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        projs = (self.up_proj, self.gate_proj, self.down_proj)
        E, k = projs[0].num_experts, indices.shape[-1]
        if mx.default_device() != mx.cpu or indices.size < CPU_DENSE_MIN_ROWS or E > DENSE_EXPERTS_MAX_RATIO * k:
            return super().__call__(x, indices)
        ws = [getattr(p, "dense_weight", lambda dtype: None)(x.dtype) for p in projs]
        if any(w is None for w in ws):
            return super().__call__(x, indices)
        ys = []
        h = x.reshape(-1, x.shape[-1])  # (N, in): every expert on every token, (E, N, .) below
        for p, w in zip(projs[:2], ws[:2]):
            y = h @ w.swapaxes(-1, -2)
            ys.append(y + mx.expand_dims(p["bias"], -2) if "bias" in p else y)
        y = self.activation(*ys) @ ws[2].swapaxes(-1, -2)
        if "bias" in self.down_proj:
            y = y + mx.expand_dims(self.down_proj["bias"], -2)
        idx = mx.stop_gradient(indices).reshape(-1, k, 1)
        y = mx.take_along_axis(y.swapaxes(0, 1), idx, axis=1)  # (N, k, out): the picked experts' rows
        return y.reshape(*indices.shape, y.shape[-1])


_PREFILL = {nn.QuantizedLinear: DensePrefillQuantizedLinear, nn.QuantizedEmbedding: DensePrefillQuantizedEmbedding,
            SwitchLinear: DensePrefillSwitchLinear, QuantizedSwitchLinear: DensePrefillQuantizedSwitchLinear,
            SwitchGLU: DensePrefillSwitchGLU}


def _switch(model: nn.Module) -> list[tuple[nn.Module, type]]:
    done = []
    for _, m in model.named_modules():
        cls = _PREFILL.get(type(m))
        if cls is not None:
            done.append((m, type(m)))
            m.__class__ = cls
    return done


def use_dense_prefill(model: nn.Module) -> int:
    """Switch mlx quantized layers and MoE blocks of ``model`` to the CPU prefill subclasses;
    returns how many modules it switched."""
    return len(_switch(model))


@contextmanager
def dense_prefill(model: nn.Module) -> Iterator[None]:
    """:func:`use_dense_prefill` for the body of a ``with`` block; the classes are put back after."""
    done = _switch(model)
    try:
        yield
    finally:
        for m, cls in done:
            m.__class__ = cls
