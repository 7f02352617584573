"""Which decoder layers deserve copies: the layer score (F5.2) and the measured truth.

For decoder layer ``k``, from calibration tokens:

- ``error``       ``||W - Q(W)||_F / ||W||_F`` over all of the layer's quantized weights together
                  (linears and expert stacks; routers stay float), RTN at the given spec;
- ``sensitivity`` ``std(h) / mean(|h|)`` of the hidden states entering the layer (all tokens and
                  channels of the float model);
- ``massive``     share of entries with ``|h| > 100 * mean(|h|)``;
- ``score``       ``error * sensitivity * (1 + 10 * massive)``.

The truth (:func:`measured_truth`) quantizes ONLY layer k (its weights replaced by their RTN
dequantization, restored afterwards) and measures the end-to-end damage on the same tokens: mean
KL(p_float || p_q) of the next-token distributions and the perplexity increase. Layer inputs are
cached from one float pass, so layer k re-runs only layers k.. (:class:`mlx_dupq.adapter.LayerTail`). :func:`spearman` gives the rank correlation score vs truth.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..adapter import LayerTail, layer_owner
from ..errors import DupqError
from ..metrics import mean_kl, spearman  # noqa: F401  (spearman re-exported)
from ..metrics import mean_nll as _nll
from ..quant.methods import fake_quantize
from ..specs import ROUTER_PATTERN, QuantSpec

MASSIVE_FACTOR = 100.0


@dataclass
class LayerScore:
    layer: int
    error: float
    sensitivity: float
    massive: float
    score: float

    def to_dict(self) -> dict:
        return asdict(self)


def layer_weights(layer: nn.Module) -> dict[str, nn.Module]:
    """{path: module} of the weights of a decoder layer that quantization touches (2-D/3-D, no routers)."""
    return {
        p: m for p, m in layer.named_modules()
        if p and "weight" in m and isinstance(m["weight"], mx.array) and m["weight"].ndim >= 2
        and re.search(ROUTER_PATTERN, p) is None
    }


def weight_error(layer: nn.Module, spec: QuantSpec, dtype: mx.Dtype = mx.float16) -> float:
    """``||W - Q(W)||_F / ||W||_F`` over all quantized weights of ``layer`` together."""
    num = den = 0.0
    for m in layer_weights(layer).values():
        w = m.weight.astype(mx.float32)
        wq, _ = fake_quantize(w, spec, dtype)
        num += float(mx.sum(mx.square(wq - w)).item())
        den += float(mx.sum(mx.square(w)).item())
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def activation_stats(h: mx.array) -> tuple[float, float]:
    """(sensitivity std/mean|h|, massive share |h| > 100 mean|h|) of hidden states (..., d)."""
    h = h.astype(mx.float32)
    a = mx.abs(h)
    mean_abs = float(mx.mean(a).item())
    if mean_abs == 0:
        return 0.0, 0.0
    std = float(mx.std(h).item())
    massive = float(mx.mean(a > MASSIVE_FACTOR * mean_abs).item())
    return std / mean_abs, massive


def layer_inputs(model: nn.Module, tokens: mx.array) -> list[mx.array]:
    """Hidden states entering each decoder layer of the float model, tokens (n, L) -> [(n, L, d)]."""
    from mlx_lm.models.base import create_attention_mask

    owner = layer_owner(model)
    h = owner.embed_tokens(tokens)
    mask = create_attention_mask(h, None)
    out = []
    for layer in owner.layers:
        out.append(h)
        h = layer(h, mask, None)
        mx.eval(h)
    return out


def layer_scores(model: nn.Module, tokens: mx.array, spec: QuantSpec, dtype: mx.Dtype = mx.float16) -> list[LayerScore]:
    """The F5.2 score of every decoder layer of the float ``model`` on calibration ``tokens`` (n, L)."""
    if tokens.ndim != 2:
        raise DupqError(f"calibration tokens must be (n, L), got shape {tuple(tokens.shape)}")
    owner = layer_owner(model)
    hidden = layer_inputs(model, tokens)
    out = []
    for k, (layer, h) in enumerate(zip(owner.layers, hidden)):
        e = weight_error(layer, spec, dtype)
        s, m = activation_stats(h)
        out.append(LayerScore(k, e, s, m, e * s * (1.0 + 10.0 * m)))
    return out


def measured_truth(model: nn.Module, tokens: mx.array, spec: QuantSpec, dtype: mx.Dtype = mx.float16) -> list[dict]:
    """Per layer k: ``{"layer", "kl", "ppl", "ppl_increase"}`` when only layer k is RTN-quantized at ``spec``."""
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise DupqError(f"truth tokens must be (n, L) with L >= 2, got shape {tuple(tokens.shape)}")
    model.eval()
    ref = model(tokens)
    mx.eval(ref)
    ref_logp = ref.astype(mx.float32) - mx.logsumexp(ref.astype(mx.float32), axis=-1, keepdims=True)
    base_ppl = float(np.exp(_nll(ref, tokens)))
    tail = LayerTail(model, tokens, ref)
    owner = layer_owner(model)
    out = []
    for k, layer in enumerate(owner.layers):
        mods = layer_weights(layer)
        saved = {p: m.weight for p, m in mods.items()}
        try:
            for p, m in mods.items():
                m.weight = fake_quantize(saved[p], spec, dtype)[0]
            logits = tail.logits_from(k)
            mx.eval(logits)
            kl = mean_kl(ref_logp, logits)
            ppl = float(np.exp(_nll(logits, tokens)))
        finally:
            for p, m in mods.items():
                m.weight = saved[p]
        out.append({"layer": k, "kl": kl, "ppl": ppl, "ppl_increase": ppl - base_ppl})
    return out
