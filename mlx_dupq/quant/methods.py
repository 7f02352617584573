"""One entry point for every weight quantizer: ``quantize_weight(w, spec, dtype, quantizer, stats)``.

The recipe's :class:`~mlx_dupq.config.QuantizerSpec` picks the method; calibration statistics
(:class:`~mlx_dupq.input_stats.LinearStats`) feed the calibrated ones. A weight without statistics
(embedding, lm_head, stacked experts without per-expert statistics) falls back from a calibrated
method to ``mse``. A stack of experts (E, out, in) with per-expert statistics (an object with
``expert(e) -> LinearStats | None``, :class:`~mlx_dupq.input_stats.SwitchStats`) is quantized one
expert at a time against that expert's own statistics (``mse`` for an expert no calibration row reached).
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
    if method in ("awq", "gptq") and w.ndim == 3 and hasattr(stats, "expert") and spec.group_size != -1:
        return _per_expert(w, spec, dtype, quantizer, stats)
    if method in ("awq", "gptq") and (stats is None or w.ndim != 2 or hasattr(stats, "expert")):
        method = "mse"
    if method == "rtn":
        return rtn_quantize(w, spec, dtype)
    if method == "mse":
        return mse_scale_search(w, spec, dtype=dtype)
    if method == "awq":
        return activation_weighted_search(w, mx.diagonal(stats.hessian), spec, dtype=dtype)
    return gptq_quantize(w, stats.hessian, spec, dtype, damp=quantizer.damp, act_order=quantizer.act_order,
                         block_size=quantizer.block_size, cd_sweeps=quantizer.cd_sweeps)


def _per_expert(w: mx.array, spec: QuantSpec, dtype: mx.Dtype, quantizer: QuantizerSpec, stats) -> QTensor:
    """(E, out, in) experts, each quantized alone with its own statistics, stacked into one QTensor."""
    qts = []
    for e in range(w.shape[0]):
        qt = quantize_weight(w[e], spec, dtype, quantizer, stats.expert(e))
        mx.eval(qt.codes, qt.scales, *([] if qt.biases is None else [qt.biases]))
        qts.append(qt)
    return QTensor(codes=mx.stack([q.codes for q in qts]), scales=mx.stack([q.scales for q in qts]),
                   biases=None if qts[0].biases is None else mx.stack([q.biases for q in qts]), spec=qts[0].spec)


def fake_quantize(w: mx.array, spec: QuantSpec, dtype: mx.Dtype = mx.float16) -> tuple[mx.array, int]:
    """(..., in) weight -> (dequantized weight in ``w``'s dtype, stored bits of its packed form)."""
    qt = rtn_quantize(w.astype(mx.float32), spec, dtype)
    arrays, _ = pack(qt)
    return dequantize(qt).astype(w.dtype), tensor_bits(arrays)
