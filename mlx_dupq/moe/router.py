"""Router studies (docs/moe.md, F6.3) and routing agreement (F6.7).

- :func:`router_quant_layer`: one layer's router quantized at b bits, everything else float, on
  that layer's recorded float inputs: selection change rate (share of the k selected experts that
  differ), top-1 change rate, relative error of the MoE block output.
- :func:`agreement`: routing of a (quantized) model against the float model on the same tokens:
  top-1 consistency, top-2 set consistency, top-k overlap, mean top-1 probability change.
- :func:`degradation_bias`: router bias recalibration from expert degradation,
  ``b_e = -lambda * (d_e - mean d)`` where ``d_e`` is expert e's relative output error after
  quantization: experts that got worse are routed to a bit less.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .experts import fake_quantize_router, restore, snapshot
from .routing import MoEBlock, Routing, install


def selection_change(inds_a: np.ndarray, inds_b: np.ndarray) -> float:
    """(N, k) x (N, k) -> mean share of selected experts of ``a`` missing from ``b``."""
    k = inds_a.shape[-1]
    same = (inds_a[:, :, None] == inds_b[:, None, :]).any(-1).sum(-1)
    return float(1.0 - same.mean() / k)


def _block_out(block: MoEBlock, x: mx.array) -> tuple[mx.array, np.ndarray]:
    rec: list = []
    install_one(block, Routing(record=rec))
    y = block.block(x)
    mx.eval(y)
    install_one(block, Routing())
    return y, np.asarray(rec[-1]["inds"]).reshape(-1, rec[-1]["inds"].shape[-1])


def install_one(block: MoEBlock, routing: Routing) -> None:
    object.__setattr__(block.block, "_dupq_routing", routing)


def router_quant_layer(model, block: MoEBlock, x: np.ndarray, bits_list=(8, 4, 2), group_size: int = 64,
                       chunk: int = 2048) -> list[dict]:
    """Per bit width: {"bits", "selection_change", "top1_change", "output_rel_err"} for one layer."""
    install(model, Routing())
    x = mx.array(x[:chunk])
    y0, i0 = _block_out(block, x)
    out = []
    for bits in bits_list:
        snap = snapshot(model)
        fake_quantize_router(block, bits, group_size)
        y1, i1 = _block_out(block, x)
        restore(model, snap)
        out.append({
            "bits": bits,
            "selection_change": selection_change(i0, i1),
            "top1_change": float((i0[:, 0] != i1[:, 0]).mean()),
            "output_rel_err": float((mx.linalg.norm(y1 - y0) / mx.linalg.norm(y0)).item()),
        })
    return out


def agreement(ref: dict[int, dict], other: dict[int, dict]) -> dict:
    """Routing agreement per layer and overall from two :func:`record_routing` results.

    Top-1 / top-2 are taken from the sorted router probabilities (inds are sorted by probability).
    """
    layers = {}
    for l in sorted(ref):
        a, b = ref[l], other[l]
        ia, ib = a["inds"], b["inds"]
        k = ia.shape[-1]
        t1 = float((ia[:, 0] == ib[:, 0]).mean())
        t2 = float((np.sort(ia[:, :2], -1) == np.sort(ib[:, :2], -1)).all(-1).mean()) if k >= 2 else None
        conf_a, conf_b = float(a["probs"].max(-1).mean()), float(b["probs"].max(-1).mean())
        layers[l] = {
            "top1": t1,
            "top2_set": t2,
            "topk_overlap": 1.0 - selection_change(ia, ib),
            "confidence_ref": conf_a,
            "confidence": conf_b,
            "confidence_change": conf_b / conf_a - 1.0,
        }
    mean = {k: float(np.mean([v[k] for v in layers.values() if v[k] is not None]))
            for k in ("top1", "topk_overlap", "confidence_change")}
    t2s = [v["top2_set"] for v in layers.values() if v["top2_set"] is not None]
    mean["top2_set"] = float(np.mean(t2s)) if t2s else None
    return {"layers": layers, "mean": mean}


def degradation_bias(degradation: dict[int, np.ndarray], lam: float) -> dict[int, mx.array]:
    """{layer: (E,) logit bias} = -lam * (d - mean d) per layer."""
    return {l: mx.array(-lam * (np.asarray(d) - np.mean(d)), dtype=mx.float32) for l, d in degradation.items()}
