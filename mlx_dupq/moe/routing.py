"""One routing forward for every MoE family mlx-lm knows, with knobs for the studies (docs/moe.md, F6).

mlx-lm's MoE blocks (DeepSeek ``DeepseekMoE``, Qwen2-MoE / Qwen3-MoE / OLMoE ``*SparseMoeBlock``,
Mixtral ``MixtralSparseMoeBlock``) all compute ``probs = softmax(router(x))``, take the top-k,
optionally renormalise the k scores, run ``switch_mlp`` and add shared experts. :func:`install`
swaps each block's class for a subclass whose ``__call__`` does exactly that, generically, and
reads a :class:`Routing` of knobs:

- ``k``: experts per token (None: the model's); ``temperature``: ``softmax(logits / T)``;
- ``bias`` {layer: (E,)}: added to the router logits (router bias recalibration, F6.3);
- ``dynamic`` (lo, hi): per-token k from the normalised router entropy H/log(E): H < lo -> k-2,
  H < hi -> k-1, else k (at least 1); the dropped slots get weight 0 (same output as running fewer);
- ``fallback`` (alpha, {layer: expert}): when the top probability is below alpha, the weakest
  selected slot is replaced by the layer's fallback expert (unless already selected);
- ``ablate`` {layer: expert}: that expert's contribution is dropped (ablation importance, F6.2);
- ``record``: a list that receives one dict per block call (layer, probs, inds, weights, x).

Module paths do not change (the class is swapped in place), so packs and weight names stay valid;
:func:`uninstall` restores the original classes. With default knobs the output equals mlx-lm's.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from ..errors import DupqError


@dataclass
class Routing:
    k: int | None = None
    temperature: float = 1.0
    bias: dict[int, mx.array] = field(default_factory=dict)
    dynamic: tuple[float, float] | None = None
    fallback: tuple[float, dict[int, int]] | None = None
    ablate: dict[int, int] = field(default_factory=dict)
    drop_routed: bool = False  # the routed experts' sum left out (shared experts only)
    drop_shared: bool = False  # the shared experts left out (routed experts only)
    random_experts: int | None = None  # seed: k distinct experts drawn at random per token, router scores kept
    record: list | None = None
    record_inputs: bool = False


@dataclass
class MoEBlock:
    """One MoE block of a model: where it is and how its family routes."""

    layer: int
    path: str
    block: nn.Module
    num_experts: int
    k: int
    normalize: bool  # renormalise the k selected probabilities
    shared: str | None  # attribute name of the shared expert MLP
    shared_gate: str | None  # Qwen2-MoE: sigmoid(shared_expert_gate(x)) scales the shared expert

    @property
    def gate(self) -> nn.Module:
        return self.block.gate

    @property
    def switch(self) -> nn.Module:
        return self.block.switch_mlp

    def router_logits(self, x: mx.array) -> mx.array:
        g = self.gate
        if isinstance(g, nn.Linear) or hasattr(g, "scales") or not hasattr(g, "weight"):
            return g(x)
        return x @ g.weight.T  # DeepSeek's MoEGate: a bare (E, hidden) weight


def _family(block: nn.Module) -> tuple[int, int, bool, str | None, str | None]:
    """(num_experts, k, normalize, shared attr, shared gate attr) of an mlx-lm MoE block."""
    name = type(block).__name__
    name = name.removeprefix("Routed")
    sw = block.switch_mlp
    E = sw.gate_proj.num_experts if hasattr(sw, "gate_proj") else sw.fc1.num_experts
    if name == "DeepseekMoE":
        return E, int(block.gate.top_k), False, ("shared_experts" if "shared_experts" in block else None), None
    if name == "Qwen2MoeSparseMoeBlock":
        return E, int(block.top_k), False, "shared_expert", "shared_expert_gate"
    if name in ("Qwen3MoeSparseMoeBlock", "OlmoeSparseMoeBlock"):
        return E, int(block.top_k), bool(block.norm_topk_prob), None, None
    if name == "MixtralSparseMoeBlock":
        return E, int(block.num_experts_per_tok), True, None, None  # softmax over the k logits
    raise DupqError(
        f"MoE block {name} is not supported by the MoE studies; use a deepseek, qwen2_moe, qwen3_moe, mixtral "
        "or olmoe model"
    )


def layers_of(model: nn.Module) -> list[nn.Module]:
    inner = getattr(model, "model", model)
    return list(getattr(inner, "layers", []))


def find_blocks(model: nn.Module) -> list[MoEBlock]:
    """The MoE blocks of an mlx-lm model, in layer order (dense layers skipped)."""
    prefix = "model.layers" if hasattr(model, "model") else "layers"
    out = []
    for i, layer in enumerate(layers_of(model)):
        for attr in ("mlp", "block_sparse_moe"):
            blk = getattr(layer, attr, None) if attr in layer else None
            if blk is not None and "switch_mlp" in blk:
                E, k, norm, shared, sgate = _family(blk)
                out.append(MoEBlock(i, f"{prefix}.{i}.{attr}", blk, E, k, norm, shared, sgate))
    if not out:
        raise DupqError("the model has no MoE layers (no switch_mlp); use a DeepSeek / Qwen-MoE / Mixtral / OLMoE model")
    return out


_ROUTED: dict[type, type] = {}


def _routed_call(self, x: mx.array) -> mx.array:
    info: MoEBlock = self._dupq_moe
    r: Routing = self._dupq_routing
    logits = info.router_logits(x).astype(mx.float32)
    if info.layer in r.bias:
        logits = logits + r.bias[info.layer]
    probs = mx.softmax(logits / r.temperature, axis=-1, precise=True)
    k = min(r.k or info.k, info.num_experts)
    if k < 1:
        raise DupqError(f"top-k must be at least 1, got {k}")
    order = mx.argsort(-probs, axis=-1)
    inds = mx.stop_gradient(order[..., :k])
    scores = mx.take_along_axis(probs, inds, axis=-1)
    if r.random_experts is not None:  # same weights, experts chosen blindly: what the router's choice is worth
        key = mx.random.key(r.random_experts * 1000 + info.layer)
        inds = mx.argsort(mx.random.uniform(shape=probs.shape, key=key), axis=-1)[..., :k].astype(inds.dtype)
    if r.fallback is not None and info.layer in r.fallback[1]:
        alpha, experts = r.fallback
        fb = experts[info.layer]
        unsure = probs.max(axis=-1, keepdims=True) < alpha
        present = (inds == fb).any(axis=-1, keepdims=True)
        swap = unsure & ~present
        last = mx.arange(k) == k - 1
        inds = mx.where(swap & last, fb, inds)
        scores = mx.where(swap & last, probs[..., fb : fb + 1], scores)
    if r.dynamic is not None:
        lo, hi = r.dynamic
        ent = -(probs * mx.log(mx.maximum(probs, 1e-12))).sum(axis=-1, keepdims=True) / math.log(info.num_experts)
        k_tok = mx.where(ent < lo, k - 2, mx.where(ent < hi, k - 1, k))
        k_tok = mx.maximum(k_tok, 1)
        scores = mx.where(mx.arange(k) < k_tok, scores, 0.0)
    if info.layer in r.ablate:
        scores = mx.where(inds == r.ablate[info.layer], 0.0, scores)
    if info.normalize:
        scores = scores / mx.maximum(scores.sum(axis=-1, keepdims=True), 1e-20)
    y = info.switch(x, inds)
    y = (y * scores[..., None].astype(y.dtype)).sum(axis=-2)
    if r.drop_routed:
        y = mx.zeros_like(y)
    if info.shared is not None and not r.drop_shared:
        s = self[info.shared](x)
        if info.shared_gate is not None:
            s = mx.sigmoid(self[info.shared_gate](x)) * s
        y = y + s
    if r.record is not None:
        rec = {"layer": info.layer, "probs": probs, "inds": inds, "weights": scores}
        if r.record_inputs:
            rec["x"] = x
        r.record.append(rec)
    return y.astype(x.dtype)


def install(model: nn.Module, routing: Routing | None = None) -> list[MoEBlock]:
    """Route every MoE block of ``model`` through :func:`_routed_call` with ``routing``; returns the blocks."""
    blocks = find_blocks(model)
    routing = routing or Routing()
    for b in blocks:
        cls = type(b.block)
        if cls not in _ROUTED.values():
            new = _ROUTED.setdefault(cls, type(f"Routed{cls.__name__}", (cls,), {"__call__": _routed_call}))
            b.block.__class__ = new
        object.__setattr__(b.block, "_dupq_moe", b)
        object.__setattr__(b.block, "_dupq_routing", routing)
    return blocks


def uninstall(model: nn.Module) -> None:
    """Give every MoE block its original class back."""
    originals = {v: k for k, v in _ROUTED.items()}
    for b in find_blocks(model):
        if type(b.block) in originals:
            b.block.__class__ = originals[type(b.block)]


@contextmanager
def routing(model: nn.Module, **knobs):
    """``with routing(model, k=1, temperature=2.0): ...`` -- knobs of :class:`Routing` for the block."""
    install(model, Routing(**knobs))
    try:
        yield
    finally:
        install(model, Routing())
