"""A switch (gather) layer whose experts have different bit widths (SPEC F6.4).

Storage: the experts of one ``(E, out, in)`` stack are grouped by their :class:`QuantSpec`; each
group is a smaller ``(n_g, out, in)`` stack packed exactly like any other switch layer
(:func:`mlx_dupq.layers.quant_linear.quantize_tensor`: mlx's format when mlx can express the spec,
ours otherwise) and stored as ``<path>.groups.<g>.{weight,scales,biases}``. The pack entry::

    {"kind": "switch_linear", "format": "moe_mixed", "shape": [E, out, in],
     "bits": <mean bits of the codes, weighted by experts>, "group_size": ..., "symmetric": ...,
     "expert_bits": [b_0, ..., b_{E-1}],
     "groups": [{"experts": [ids, ascending], "entry": <the group's packed entry>}, ...]}

Run time: every group runs ``gather_qmm`` over all token-expert pairs with the expert ids mapped to
its local ids, and the results are merged with a mask (a pair uses the group that holds its expert).
The local map is monotone in the global id, so ``sorted_indices`` stays valid. Cost: one gather
matmul per group (2-3 groups), each cheaper than a full-width one; memory: each expert's own bits.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import QuantSpec
from ..errors import DupqError
from .quant_linear import CPU_DENSE_MIN_ROWS, SwitchShape

FORMAT_MOE_MIXED = "moe_mixed"


def group_experts(specs: list[QuantSpec]) -> list[tuple[QuantSpec, list[int]]]:
    """Experts with the same spec together: [(spec, ascending expert ids)], ordered by bits then first id."""
    by: dict[QuantSpec, list[int]] = {}
    for e, s in enumerate(specs):
        by.setdefault(s, []).append(e)
    return sorted(by.items(), key=lambda kv: (float(kv[0].bits), kv[1][0]))


def quantize_experts(w: mx.array, specs: list[QuantSpec], dtype: mx.Dtype = mx.float16,
                     quantize=None) -> tuple[dict[str, mx.array], dict]:
    """Stacked experts (E, out, in) with one spec per expert -> (arrays, moe_mixed entry).

    ``quantize(w_group, spec) -> (arrays, entry)`` packs one group (default: round to nearest).
    Array names are ``groups.<g>.<param>``.
    """
    from .quant_linear import quantize_tensor

    if w.ndim != 3 or len(specs) != w.shape[0]:
        raise DupqError(f"expert bit widths: {len(specs)} specs for a stack of shape {tuple(w.shape)}; give one per expert")
    quantize = quantize or (lambda wg, s: quantize_tensor(wg.astype(mx.float32), s, dtype))
    arrays: dict[str, mx.array] = {}
    groups = []
    for g, (spec, ids) in enumerate(group_experts(specs)):
        a, entry = quantize(w[mx.array(ids)], spec)
        arrays.update({f"groups.{g}.{k}": v for k, v in a.items()})
        groups.append({"experts": ids, "entry": entry})
    bits = [float(s.bits) for s in specs]
    entry = {
        "format": FORMAT_MOE_MIXED,
        "kind": "switch_linear",
        "shape": list(w.shape),
        "bits": float(np.mean(bits)),
        "group_size": specs[0].group_size,
        "symmetric": specs[0].symmetric,
        "expert_bits": bits,
        "groups": groups,
    }
    return arrays, entry


def _local_maps(groups: list[dict], num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(group id per expert (E,), local id table (G, E)); row g is monotone in the expert id."""
    owner = np.full(num_experts, -1, dtype=np.int32)
    local = np.zeros((len(groups), num_experts), dtype=np.uint32)
    for g, grp in enumerate(groups):
        ids = sorted(int(i) for i in grp["experts"])
        for i in ids:
            if not 0 <= i < num_experts or owner[i] != -1:
                raise DupqError(f"expert {i} is listed twice or out of range in a moe_mixed entry; the pack is damaged")
            owner[i] = g
        # number of members below each id, clipped: the member's rank for members, monotone overall
        local[g] = np.minimum(np.searchsorted(np.array(ids), np.arange(num_experts)), len(ids) - 1)
    if (owner < 0).any():
        raise DupqError(f"experts {np.flatnonzero(owner < 0).tolist()} have no group in a moe_mixed entry; the pack is damaged")
    return owner, local


class MixedSwitchLinear(SwitchShape, nn.Module):
    """Stacked experts with per-expert bit widths; called like mlx-lm's ``SwitchLinear``."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, entry: dict, bias: bool = False):
        super().__init__()
        from .quant_linear import build_module

        if entry.get("format") != FORMAT_MOE_MIXED or not entry.get("groups"):
            raise DupqError(f"MixedSwitchLinear needs a {FORMAT_MOE_MIXED!r} entry with groups; the pack is damaged")
        object.__setattr__(self, "entry", dict(entry, shape=[num_experts, output_dims, input_dims]))
        owner, local = _local_maps(entry["groups"], num_experts)
        self.groups = [
            build_module("switch_linear", (len(g["experts"]), output_dims, input_dims), g["entry"], bias)
            for g in entry["groups"]
        ]
        object.__setattr__(self, "_owner", mx.array(owner))
        object.__setattr__(self, "_local", mx.array(local))
        self.freeze()

    @property
    def expert_bits(self) -> list[float]:
        return list(self.entry["expert_bits"])

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        if mx.default_device() == mx.cpu and indices.size >= CPU_DENSE_MIN_ROWS * self.num_experts:
            # CPU prefill: >= 16 rows per expert on average -> dequantize each expert once and use BLAS
            # (the dense-linear rule of quant_linear, per expert); decode keeps the packed kernels
            w = self.dequantized().astype(x.dtype).swapaxes(-1, -2)
            return mx.gather_mm(x, w, rhs_indices=indices, sorted_indices=sorted_indices)
        if len(self.groups) == 1:
            return self.groups[0](x, self._local[0][indices], sorted_indices=sorted_indices)
        owner = self._owner[indices]
        y = None
        for g, mod in enumerate(self.groups):
            yg = mod(x, self._local[g][indices], sorted_indices=sorted_indices)
            mask = mx.expand_dims(owner == g, (-1, -2))
            y = mx.where(mask, yg, 0.0) if y is None else mx.where(mask, yg, y)
        return y

    def dequantized(self) -> mx.array:
        """Float32 (E, out, in) weight (reference path, CPU prefill)."""
        parts = [dequantize_switch(mod) for mod in self.groups]
        order = np.argsort(np.concatenate([g["experts"] for g in self.entry["groups"]]))
        return mx.concatenate(parts)[mx.array(order)]

    def _extra_repr(self) -> str:
        return f"shape={tuple(self.entry['shape'])}, expert_bits={sorted(set(self.entry['expert_bits']))}"


def dequantize_switch(mod: nn.Module) -> mx.array:
    """Float32 weight of any switch module (float, mlx-quantized, dupq, mixed)."""
    if hasattr(mod, "dequantized"):
        return mod.dequantized().astype(mx.float32)
    if "scales" in mod:
        f32 = (lambda a: None if a is None else a.astype(mx.float32))
        return mx.dequantize(mod["weight"], f32(mod["scales"]), f32(mod.get("biases")), group_size=mod.group_size,
                             bits=mod.bits)
    return mod["weight"].astype(mx.float32)
