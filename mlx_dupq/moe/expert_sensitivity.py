"""Expert sensitivity (docs/moe.md, F6.2): the seed's score and measured ablation importance.

score(e) = 0.5 * output relative error + 0.3 * gradient norm + 0.2 * frequency, each term divided by
its maximum over the layer's experts (so the three are on [0, 1] and the weights mean what they say):

- output relative error: ``||f_q(x) - f(x)|| / ||f(x)||`` of expert e alone, quantized at ``spec``,
  on the tokens routed to it;
- gradient norm: ``||dL/dW_e||`` (all its projections) of the next-token loss on the calibration text;
- frequency: its routing share.

Ablation importance: the loss increase when expert e's contribution is dropped (its routing weight
set to 0, :mod:`mlx_dupq.moe.routing`) -- the measured ground truth the score is compared to
(Spearman rank correlation per layer).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..metrics import spearman  # noqa: F401  (re-exported for the studies)
from ..specs import QuantSpec
from .experts import PROJS, fake_quant
from .routing import MoEBlock, Routing, find_blocks, install
from .stats import frequency, record_routing

WEIGHTS = (0.5, 0.3, 0.2)


def lm_loss(model: nn.Module, batches: mx.array) -> mx.array:
    """Mean next-token cross-entropy over (n, T) token batches."""
    logits = model(batches[:, :-1]).astype(mx.float32)
    return nn.losses.cross_entropy(logits, batches[:, 1:], reduction="mean")


def mean_loss(model: nn.Module, batches: mx.array, chunk: int = 4) -> float:
    tot = 0.0
    for s in range(0, batches.shape[0], chunk):
        b = batches[s : s + chunk]
        tot += lm_loss(model, b).item() * b.shape[0]
    return tot / batches.shape[0]


def _expert_out(ws: dict[str, mx.array], x: mx.array) -> mx.array:
    """One SwiGLU expert: (N, hidden) -> (N, hidden)."""
    return (nn.silu(x @ ws["gate_proj"].T) * (x @ ws["up_proj"].T)) @ ws["down_proj"].T


def output_errors(block: MoEBlock, x: np.ndarray, inds: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """(E,) relative output error of each expert quantized alone at ``spec`` on its routed tokens."""
    sw = block.switch
    errs = np.zeros(block.num_experts)
    for e in range(block.num_experts):
        rows = np.flatnonzero((inds == e).any(-1))
        if rows.size == 0:
            continue
        xe = mx.array(x[rows])
        w = {p: sw[p]["weight"][e].astype(mx.float32) for p in PROJS}
        y = _expert_out(w, xe)
        yq = _expert_out({p: fake_quant(v, spec) for p, v in w.items()}, xe)
        errs[e] = (mx.linalg.norm(yq - y) / mx.maximum(mx.linalg.norm(y), 1e-12)).item()
    return errs


def gradient_norms(model: nn.Module, batches: mx.array, blocks: list[MoEBlock]) -> dict[int, np.ndarray]:
    """{layer: (E,) ||dL/dW_e||} of the next-token loss, over the experts' projections."""
    model.freeze()
    for b in blocks:
        b.switch.unfreeze()
    try:
        grads = nn.value_and_grad(model, lm_loss)(model, batches)[1]
    finally:
        model.unfreeze()
    from mlx.utils import tree_flatten

    flat = dict(tree_flatten(grads))
    out = {}
    for b in blocks:
        sq = 0.0
        for p in PROJS:
            g = flat.get(f"{b.path}.switch_mlp.{p}.weight")
            if g is not None:
                sq = sq + (g.astype(mx.float32) ** 2).sum(axis=(1, 2))
        out[b.layer] = np.sqrt(np.asarray(sq))
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    m = float(np.max(v)) if len(v) else 0.0
    return v / m if m > 0 else np.zeros_like(v)


def combine(out_err: np.ndarray, grad: np.ndarray, freq: np.ndarray, weights=WEIGHTS) -> np.ndarray:
    """The seed's score from the three (E,) terms, each normalised by its layer maximum."""
    a, b, c = weights
    return a * _unit(out_err) + b * _unit(grad) + c * _unit(freq)


def expert_sensitivity(model: nn.Module, batches: mx.array, spec: QuantSpec) -> dict[int, dict]:
    """{layer: {"out_err", "grad_norm", "freq", "score"}} (lists over experts) on ``batches``."""
    blocks = find_blocks(model)
    routes = record_routing(model, batches, inputs=True)
    grads = gradient_norms(model, batches, blocks)
    out = {}
    for b in blocks:
        r = routes[b.layer]
        f = frequency(r["inds"], b.num_experts)
        e = output_errors(b, r["x"], r["inds"], spec)
        g = grads[b.layer]
        out[b.layer] = {"out_err": e.tolist(), "grad_norm": g.tolist(), "freq": f.tolist(),
                        "score": combine(e, g, f).tolist()}
    return out


def ablation_importance(model: nn.Module, batches: mx.array, layers: list[int] | None = None) -> dict[int, list[float]]:
    """{layer: (E,) loss increase when that expert's contribution is dropped}; one forward per expert."""
    blocks = [b for b in find_blocks(model) if layers is None or b.layer in layers]
    install(model, Routing())
    base = mean_loss(model, batches)
    out = {}
    try:
        for b in blocks:
            row = []
            for e in range(b.num_experts):
                install(model, Routing(ablate={b.layer: e}))
                row.append(mean_loss(model, batches) - base)
            out[b.layer] = row
    finally:
        install(model, Routing())
    return out
