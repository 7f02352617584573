"""One entry point for every weight quantizer: ``quantize_weight(w, spec, dtype, quantizer, stats)``.

The recipe's :class:`~mlx_dupq.config.QuantizerSpec` picks the method; calibration statistics
(:class:`~mlx_dupq.input_stats.LinearStats`) feed the calibrated ones. A weight without statistics
(embedding, lm_head, stacked experts) falls back from a calibrated method to ``mse``.
"""

from __future__ import annotations

import mlx.core as mx

from ..specs import QuantizerSpec, QuantSpec
from .bpw import tensor_bits
from .gptq import gptq_quantize
from .bitpack import pack
from .qtensor import QTensor, dequantize
from .rtn import rtn_quantize
from .scales import activation_weighted_search, mse_scale_search


def quantize_weight(w: mx.array, spec: QuantSpec, dtype: mx.Dtype, quantizer: QuantizerSpec, stats=None) -> QTensor:
    """w (..., in) float -> QTensor with ``spec`` fitted to the row length."""
    method = quantizer.method
    if method in ("awq", "gptq") and (stats is None or w.ndim != 2):
        method = "mse"
    if method == "rtn":
        return rtn_quantize(w, spec, dtype)
    if method == "mse":
        return mse_scale_search(w, spec, dtype=dtype)
    if method == "awq":
        return activation_weighted_search(w, mx.diagonal(stats.hessian), spec, dtype=dtype)
    return gptq_quantize(w, stats.hessian, spec, dtype, damp=quantizer.damp, act_order=quantizer.act_order,
                         block_size=quantizer.block_size)


def fake_quantize(w: mx.array, spec: QuantSpec, dtype: mx.Dtype = mx.float16) -> tuple[mx.array, int]:
    """(..., in) weight -> (dequantized weight in ``w``'s dtype, stored bits of its packed form)."""
    qt = rtn_quantize(w.astype(mx.float32), spec, dtype)
    arrays, _ = pack(qt)
    return dequantize(qt).astype(w.dtype), tensor_bits(arrays)
