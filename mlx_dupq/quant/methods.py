"""One entry point for every weight quantizer: ``quantize_weight(w, spec, dtype, quantizer, stats)``.

The recipe's :class:`~mlx_dupq.config.QuantizerSpec` picks the method; calibration statistics
(:class:`~mlx_dupq.calib.LinearStats`) feed the calibrated ones. A weight without statistics
(embedding, lm_head, stacked experts) falls back from a calibrated method to ``mse``.
"""

from __future__ import annotations

import mlx.core as mx

from ..config import QuantizerSpec, QuantSpec
from .qtensor import QTensor
from .rtn import rtn_quantize
from .search import activation_weighted_search, mse_scale_search


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
    from .gptq import gptq_quantize

    return gptq_quantize(w, stats.hessian, spec, dtype, damp=quantizer.damp, act_order=quantizer.act_order,
                         block_size=quantizer.block_size)
