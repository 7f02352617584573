"""Expert statistics (docs/moe.md, F6.1): activation frequency, hot / cold share, massive activations per
expert, expert types from routing on different text genres.

Routing is recorded through :mod:`mlx_dupq.moe.routing` (any MoE family). The numeric helpers are
pure numpy functions over the recorded arrays, with shapes in their docstrings.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .routing import MoEBlock, Routing, install

HOT_FRACTION = 0.2  # top 20 % of a layer's experts by frequency are "hot", bottom 20 % "cold"
MASSIVE_FACTOR = 10.0  # |h| > 10 x the layer's mean |h| counts as a massive activation
RARE_SHARE = 0.5  # an expert with less than half the uniform share is "rare"
DOMAIN_RATIO = 1.5  # ... else "domain" when its share in some genre is >= 1.5 x its overall share


def record_routing(model: nn.Module, batches: mx.array, inputs: bool = False, **knobs) -> dict[int, dict]:
    """Run ``batches`` (n, T) through ``model``; per MoE layer the concatenated routing.

    Returns {layer: {"probs": (N, E) float32, "inds": (N, k) int, "weights": (N, k), "x": (N, hidden)
    when ``inputs``}} with N = n * T tokens (numpy arrays).
    """
    rec: list = []
    install(model, Routing(record=rec, record_inputs=inputs, **knobs))
    out: dict[int, dict[str, list]] = {}
    try:
        for b in range(batches.shape[0]):
            rec.clear()
            mx.eval(getattr(model, "model", model)(batches[b : b + 1]))  # the layers only: no lm_head
            for r in rec:
                d = out.setdefault(r["layer"], {})
                for key in ("probs", "inds", "weights", "x"):
                    if key in r:
                        a = r[key]
                        d.setdefault(key, []).append(np.asarray(a.reshape(-1, a.shape[-1]).astype(
                            mx.float32 if key != "inds" else mx.int32)))
    finally:
        install(model, Routing())
    return {layer: {k: np.concatenate(v) for k, v in d.items()} for layer, d in sorted(out.items())}


def frequency(inds: np.ndarray, num_experts: int) -> np.ndarray:
    """(N, k) selected experts -> (E,) share of token-expert assignments per expert (sums to 1)."""
    counts = np.bincount(inds.reshape(-1), minlength=num_experts).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def hot_cold(freq: np.ndarray) -> dict:
    """Concentration of one layer's routing, (E,) shares -> seed-style numbers.

    top10_share: share of assignments handled by the top 10 % of experts (at least one expert);
    bottom50_share: by the bottom 50 %; hot / cold: the top / bottom 20 % expert ids.
    """
    E = len(freq)
    order = np.argsort(-freq, kind="stable")
    n10, n50, n20 = max(1, round(0.1 * E)), max(1, E // 2), max(1, round(HOT_FRACTION * E))
    return {
        "top10_share": float(freq[order[:n10]].sum()),
        "bottom50_share": float(freq[order[-n50:]].sum()),
        "hot": sorted(int(i) for i in order[:n20]),
        "cold": sorted(int(i) for i in order[-n20:]),
        "max_share": float(freq.max()),
        "min_share": float(freq.min()),
        "uniform_share": 1.0 / E,
    }


def frequency_class(freq: np.ndarray) -> list[str]:
    """(E,) shares -> "hot" (top 20 %), "cold" (bottom 20 %) or "mid" per expert."""
    E = len(freq)
    order = np.argsort(-freq, kind="stable")
    n20 = max(1, round(HOT_FRACTION * E))
    cls = ["mid"] * E
    for i in order[:n20]:
        cls[int(i)] = "hot"
    for i in order[-n20:]:
        cls[int(i)] = "cold"
    return cls


def expert_types(freq_by_genre: dict[str, np.ndarray], weights: dict[str, float] | None = None) -> dict:
    """Expert types of one layer from per-genre shares {genre: (E,)}.

    overall share = token-weighted mean over genres; "rare" when it is below RARE_SHARE / E;
    else "domain" when its share in some genre is >= DOMAIN_RATIO x its overall share;
    else "general". Returns {"types": [...], "specialisation": [max genre share / overall share],
    "top_genre": [...], "fractions": {type: share of experts}}.
    """
    genres = sorted(freq_by_genre)
    w = np.array([(weights or {}).get(g, 1.0) for g in genres], dtype=np.float64)
    F = np.stack([freq_by_genre[g] for g in genres])  # (G, E)
    overall = (F * w[:, None]).sum(0) / w.sum()
    E = F.shape[1]
    spec = F.max(0) / np.maximum(overall, 1e-12)
    types = []
    for e in range(E):
        if overall[e] < RARE_SHARE / E:
            types.append("rare")
        elif spec[e] >= DOMAIN_RATIO:
            types.append("domain")
        else:
            types.append("general")
    return {
        "types": types,
        "specialisation": [float(s) for s in spec],
        "top_genre": [genres[int(i)] for i in F.argmax(0)],
        "fractions": {t: types.count(t) / E for t in ("general", "domain", "rare")},
    }


def expert_hidden(block: MoEBlock, x: mx.array, inds: mx.array) -> mx.array:
    """Intermediate activations (down_proj inputs) of the selected experts.

    x (N, hidden), inds (N, k) -> (N, k, moe_intermediate).
    """
    sw = block.switch
    xe = mx.expand_dims(x, (-2, -3))
    if hasattr(sw, "gate_proj"):
        h = sw.activation(sw.up_proj(xe, inds), sw.gate_proj(xe, inds))
    else:
        h = sw.activation(sw.fc1(xe, inds))
    return h.squeeze(-2)


def shared_hidden(block: MoEBlock, x: mx.array) -> mx.array | None:
    """(N, hidden) -> (N, shared_intermediate) down_proj inputs of the shared expert, or None."""
    if block.shared is None:
        return None
    mlp = block.block[block.shared]
    return nn.silu(mlp.gate_proj(x)) * mlp.up_proj(x)


def massive_ratios(block: MoEBlock, x: np.ndarray, inds: np.ndarray, factor: float = MASSIVE_FACTOR,
                   chunk: int = 1024) -> dict:
    """Share of massive activations per expert of one layer (docs/moe.md, F6.1).

    x (N, hidden) the layer's MoE inputs, inds (N, k). An entry of an expert's intermediate
    activation is massive when |h| > ``factor`` x the mean |h| over all routed experts of the layer.
    Returns {"per_expert": (E,) ratios, "shared": ratio or None, "threshold": float, "factor": f}.
    """
    E = block.num_experts
    parts = []
    for s in range(0, len(x), chunk):
        h = expert_hidden(block, mx.array(x[s : s + chunk]), mx.array(inds[s : s + chunk]))
        parts.append(np.abs(np.asarray(h.astype(mx.float32))))
    H = np.concatenate(parts)  # (N, k, I)
    thr = factor * float(H.mean())
    counts = np.zeros(E)
    totals = np.zeros(E)
    big = (H > thr).sum(-1)  # (N, k)
    for e in range(E):
        m = inds == e
        counts[e] = big[m].sum()
        totals[e] = m.sum() * H.shape[-1]
    ratios = np.where(totals > 0, counts / np.maximum(totals, 1), 0.0)
    sh = None
    if block.shared is not None:
        hs = np.concatenate([np.abs(np.asarray(shared_hidden(block, mx.array(x[s : s + chunk])).astype(mx.float32)))
                             for s in range(0, len(x), chunk)])
        sh = float((hs > thr).mean())
    return {"per_expert": ratios.tolist(), "shared": sh, "threshold": thr, "factor": factor}


def massive_by_class(ratios: list[float], classes: list[str]) -> dict:
    """Mean massive ratio per frequency class ("hot" / "mid" / "cold")."""
    out = {}
    for c in ("hot", "mid", "cold"):
        v = [r for r, k in zip(ratios, classes) if k == c]
        out[c] = float(np.mean(v)) if v else None
    return out
