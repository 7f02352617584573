"""Top-k reduction and dynamic k (docs/moe.md, F6.6): what fewer active experts cost and save.

The knobs live in :class:`mlx_dupq.moe.routing.Routing` (``k``, ``dynamic``, ``fallback``); this
module prices them. Cost per token is counted as *active weights* (every weight a token's forward
pass multiplies with: attention, dense and shared MLPs, the k routed experts, routers, lm_head; the
embedding is a lookup and not counted) and as *weight bytes moved* = active weights x bits per
weight, which puts fewer experts and fewer bits on one axis.
"""

from __future__ import annotations

import math

import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .routing import find_blocks


def active_weights(model: nn.Module, k: float | None = None) -> dict:
    """{"total", "embedding", "routed_experts", "active"} weight counts per token at top-``k``
    (None: the model's k; a float = a mean k, for dynamic k)."""
    blocks = find_blocks(model)
    total = emb = routed = 0
    active_routed = 0.0
    switch_prefix = {f"{b.path}.switch_mlp.": b for b in blocks}
    for key, v in tree_flatten(model.parameters()):
        n = math.prod(v.shape)
        total += n
        if "embed_tokens" in key:
            emb += n
            continue
        for pre, b in switch_prefix.items():
            if key.startswith(pre):
                routed += n
                active_routed += n * min(k or b.k, b.num_experts) / b.num_experts
                break
    return {"total": total, "embedding": emb, "routed_experts": routed,
            "active": total - emb - routed + active_routed}


def entropy_thresholds(probs: np.ndarray, quantiles=(0.25, 0.5)) -> tuple[float, float]:
    """(lo, hi) normalised router-entropy thresholds at the given quantiles of (N, E) probabilities."""
    E = probs.shape[-1]
    ent = -(probs * np.log(np.maximum(probs, 1e-12))).sum(-1) / math.log(E)
    lo, hi = np.quantile(ent, quantiles)
    return float(lo), float(hi)


def mean_dynamic_k(probs: np.ndarray, k: int, lo: float, hi: float) -> float:
    """Mean experts per token of the dynamic-k rule (see :mod:`mlx_dupq.moe.routing`)."""
    E = probs.shape[-1]
    ent = -(probs * np.log(np.maximum(probs, 1e-12))).sum(-1) / math.log(E)
    kt = np.where(ent < lo, k - 2, np.where(ent < hi, k - 1, k))
    return float(np.maximum(kt, 1).mean())
