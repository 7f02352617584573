"""Selective expert duplication under a budget (docs/moe.md, F6.5): which experts get how many copies.

Group policy (the seed's): shared experts x3 (always, whatever the budget), then
always-active experts x3 (routed for at least ``ALWAYS_SHARE`` of tokens), hot experts x2 (top 20 %
by frequency), domain experts x2 (specialised to a genre), rare experts x1 (no copy). Within the
budget, candidates are taken in that order (by frequency inside a group); ``budget`` is the extra
*routed-expert* weight bits as a share of the undup'ed routed-expert bits (0.3 = +30 %). The
copies themselves are the duplication engine's residual copies (:mod:`mlx_dupq.moe.experts`).
Honest bits: :func:`copies_bits` counts every copy, shared ones included.

Packs (:func:`expert_copies`, used by the ``[moe] dup_budget`` option): the converter has only the
calibration routing, not per-genre routing, so the groups come from frequency alone
(:func:`frequency_groups`: always / hot / general / rare; no "domain" experts).
"""

from __future__ import annotations

import numpy as np

from .stats import RARE_SHARE, frequency_class
from ..dup.specs import CopySpec, DupPlan

ALWAYS_SHARE = 0.5  # routed for >= half of the tokens
POLICY = {"always": 3, "hot": 2, "domain": 2, "general": 1, "rare": 1}
SHARED_COPIES = 3


def expert_group(freq_share: float, k: int, cls: str, etype: str) -> str:
    """always / hot / domain / general / rare of one expert (share: of token-expert assignments)."""
    if freq_share * k >= ALWAYS_SHARE:  # share of tokens that pick it
        return "always"
    if etype == "rare":
        return "rare"
    if cls == "hot":
        return "hot"
    return "domain" if etype == "domain" else "general"


def plan_copies(freqs: dict[int, np.ndarray], groups: dict[int, list[str]], budget: float = 0.3) -> dict[int, dict[int, int]]:
    """{layer: {expert: copies}} (only experts with >= 2 copies listed) within ``budget``.

    Every routed expert of every layer costs the same, so the budget is a count of extra copies:
    ``floor(budget * total experts)``.
    """
    total = sum(len(f) for f in freqs.values())
    room = int(np.floor(budget * total + 1e-9))
    order = {"always": 0, "hot": 1, "domain": 2}
    cands = sorted(
        ((order[g], -float(freqs[l][e]), l, e) for l, gs in groups.items() for e, g in enumerate(gs) if g in order)
    )
    out: dict[int, dict[int, int]] = {l: {} for l in freqs}
    for _, _, l, e in cands:
        extra = POLICY[groups[l][e]] - 1
        if extra <= room:
            out[l][e] = POLICY[groups[l][e]]
            room -= extra
    return out


def copies_bits(plan: dict[int, dict[int, int]], n_experts: dict[int, int], expert_bits: float,
                shared_bits: float = 0.0, shared_copies: int = SHARED_COPIES) -> dict:
    """Expert bits with copies relative to none: {"routed_ratio", "extra_share"} (expert_bits: one expert)."""
    base = sum(n_experts.values()) * expert_bits
    routed = sum((n - len(plan[l])) * expert_bits + sum(plan[l].values()) * expert_bits for l, n in n_experts.items())
    return {
        "routed_ratio": routed / base,
        "extra_share": routed / base - 1.0,
        "shared_extra_bits": shared_bits * (shared_copies - 1) * len(n_experts),
    }


def frequency_groups(freq: np.ndarray, k: int) -> list[str]:
    """(E,) assignment shares of one layer -> its experts' groups from frequency alone: always /
    hot / general, or rare when the share is below ``RARE_SHARE`` of the uniform share."""
    E = len(freq)
    cls = frequency_class(freq)
    return [expert_group(float(f), k, c, "rare" if f < RARE_SHARE / E else "general") for f, c in zip(freq, cls)]


def expert_copies(freqs: dict[int, np.ndarray], ks: dict[int, int], budget: float) -> dict[int, np.ndarray]:
    """{layer: (E,) shares}, {layer: top-k} -> {layer: (E,) int copies per expert} (1 = no copy)
    under the group policy within ``budget`` extra copies per routed expert (:func:`plan_copies`)."""
    groups = {l: frequency_groups(f, ks[l]) for l, f in freqs.items()}
    plan = plan_copies(freqs, groups, budget)
    out = {}
    for l, f in freqs.items():
        c = np.ones(len(f), dtype=np.int64)
        for e, n in plan[l].items():
            c[e] = n
        out[l] = c
    return out


def shared_dup_plan(n: int):
    """(DupPlan, copy specs) that store a shared-expert linear as ``n`` residual copies: the dense
    duplication engine's ``DupLinear`` (:func:`mlx_dupq.dup.feature.quantize_dup_linear`)."""
    return DupPlan(mode="residual"), tuple(CopySpec() for _ in range(n))
