"""A switch (gather) layer whose experts have different bit widths (docs/moe.md, F6.4), optionally with
residual expert copies (F6.5) and an input rotation.

Storage: the experts of one ``(E, out, in)`` stack are grouped by (:class:`QuantSpec`, copies);
each group is a smaller ``(n_g, out, in)`` stack packed exactly like any other switch layer
(:func:`mlx_dupq.layers.quant_linear.quantize_tensor`: mlx's format when mlx can express the spec,
ours otherwise) and stored as ``<path>.groups.<g>.{weight,scales,biases}``; a group with ``n >= 2``
residual copies stores ``n`` such stacks as ``<path>.groups.<g>.copies.<c>.{...}`` (copy c
quantizes what copies < c left over, :func:`residual_copies`). The pack entry::

    {"kind": "switch_linear", "format": "moe_mixed", "shape": [E, out, in],
     "bits": <mean bits of the codes, weighted by experts>, "group_size": ..., "symmetric": ...,
     "expert_bits": [b_0, ..., b_{E-1}],
     "expert_copies": [n_0, ..., n_{E-1}],              # only when some expert has copies
     "rotation": {"kind": "hadamard", "size": in, ...},  # only when the experts are rotated
     "groups": [{"experts": [ids, ascending], "entry": <the group's packed entry>},          # 1 copy
                {"experts": [...], "copies": [<entry of copy 0>, <entry of copy 1>, ...]}]}  # n copies

Rotation ``R`` (:func:`mlx_dupq.rotation.make_rotation` of the recorded dict): the stored stacks
quantize ``W R`` (all copies in that basis) and the layer computes ``(x R) Q(W R)^T``.

Run time: on a custom-kernel backend, decode goes to :func:`mlx_dupq.kernels.route.switch` (one
launch for all widths; groups with copies or a rotation fall back). Otherwise every group runs
``gather_qmm`` over all token-expert pairs with the expert ids mapped to its local ids (a group
with copies: one per copy, summed), and the results are merged with a mask (a pair uses the group
that holds its expert). The local map is monotone in the global id, so ``sorted_indices`` stays
valid. Cost: one gather matmul per group and copy, each cheaper than a full-width one; memory: each
expert's own bits times its copies. A switch bias (E, out) is the layer's own float parameter.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import DupqError
from ..kernels import route
from ..quant.bitpack import unpack
from ..quant.qtensor import dequantize
from ..rotation.rotations import make_rotation
from ..specs import QuantSpec
from .quant_linear import CPU_DENSE_MIN_ROWS, FORMAT_BUILDERS, SwitchShape, build_module, quantize_tensor

FORMAT_MOE_MIXED = "moe_mixed"


def group_experts(specs: list[QuantSpec], copies: list[int] | None = None) -> list[tuple[QuantSpec, int, list[int]]]:
    """Experts with the same (spec, copies) together: [(spec, copies, ascending expert ids)],
    ordered by bits, then copies, then first id."""
    copies = copies or [1] * len(specs)
    by: dict[tuple[QuantSpec, int], list[int]] = {}
    for e, s in enumerate(specs):
        by.setdefault((s, int(copies[e])), []).append(e)
    return [(s, n, ids) for (s, n), ids in sorted(by.items(), key=lambda kv: (float(kv[0][0].bits), kv[0][1], kv[1][0]))]


def residual_copies(w: mx.array, spec: QuantSpec, n: int, quantize,
                    first=None) -> list[tuple[dict[str, mx.array], dict]]:
    """(n_g, out, in) float -> ``n`` packed stacks; copy c packs ``W - sum_{j<c} dequant(copy j)``.

    The duplication engine's residual arithmetic (:func:`mlx_dupq.dup.copies.make_copies`), with the
    recipe's per-stack quantizer ``quantize(w, spec) -> (arrays, entry)``; ``first`` (same signature),
    when given, packs copy 0 instead.
    """
    target = w.astype(mx.float32)
    out = []
    for c in range(n):
        arrays, entry = (first if c == 0 and first is not None else quantize)(target, spec)
        mx.eval(arrays)
        out.append((arrays, entry))
        if c < n - 1:
            target = target - dequantize(unpack(arrays, dict(entry, shape=list(target.shape))))
    return out


def _check_inputs(w: mx.array, specs: list, copies: list[int] | None, rotation) -> None:
    if w.ndim != 3 or len(specs) != w.shape[0]:
        raise DupqError(f"expert bit widths: {len(specs)} specs for a stack of shape {tuple(w.shape)}; give one per expert")
    if copies is not None and (len(copies) != w.shape[0] or any(int(c) < 1 for c in copies)):
        raise DupqError(f"expert copies {list(copies)} do not fit {w.shape[0]} experts; give one count >= 1 per expert")
    if rotation is not None and rotation.size != w.shape[-1]:
        raise DupqError(f"a rotation of width {rotation.size} cannot rotate experts with {w.shape[-1]} inputs")


def quantize_experts(w: mx.array, specs: list[QuantSpec], dtype: mx.Dtype = mx.float16, quantize=None,
                     copies: list[int] | None = None, rotation=None,
                     first_copy=None) -> tuple[dict[str, mx.array], dict]:
    """Stacked experts (E, out, in) with one spec per expert -> (arrays, moe_mixed entry).

    ``quantize(w_group, spec) -> (arrays, entry)`` packs one group (default: round to nearest);
    ``first_copy(w_group, spec, ids) -> (arrays, entry)``, when given, packs a group's first (or
    only) copy knowing its expert ids (ascending; a calibrated quantizer uses each expert's own
    statistics); later residual copies use ``quantize``;
    ``copies``: residual copies per expert (E,) ints, default all 1; ``rotation``: a
    :class:`~mlx_dupq.rotation.Rotation` of width ``in`` (the stacks store ``W R``).
    Array names are ``groups.<g>.<param>`` (one copy) or ``groups.<g>.copies.<c>.<param>``.
    """
    _check_inputs(w, specs, copies, rotation)
    quantize = quantize or (lambda wg, s: quantize_tensor(wg.astype(mx.float32), s, dtype))
    if rotation is not None:
        w = rotation.apply(w.astype(mx.float32))
    arrays: dict[str, mx.array] = {}
    groups = []
    for g, (spec, n, ids) in enumerate(group_experts(specs, copies)):
        first = None if first_copy is None else (lambda wg, s, ids=ids: first_copy(wg, s, ids))
        packed = residual_copies(w[mx.array(ids)], spec, n, quantize, first)
        if n == 1:
            arrays.update({f"groups.{g}.{k}": v for k, v in packed[0][0].items()})
            groups.append({"experts": ids, "entry": packed[0][1]})
            continue
        for c, (a, _) in enumerate(packed):
            arrays.update({f"groups.{g}.copies.{c}.{k}": v for k, v in a.items()})
        groups.append({"experts": ids, "copies": [e for _, e in packed]})
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
    if copies is not None and max(copies) > 1:
        entry["expert_copies"] = [int(c) for c in copies]
    if rotation is not None:
        entry["rotation"] = rotation.to_dict()
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


class ResidualSwitch(nn.Module):
    """One expert group stored as residual copies: ``y = sum_c copy_c(x, indices)``.

    copies: packed switch modules of one (n_g, out, in) stack each (parameters ``copies.<c>.*``).
    """

    def __init__(self, copies: list[nn.Module]):
        super().__init__()
        self.copies = list(copies)
        self.freeze()

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        ys = [c(x, indices, sorted_indices=sorted_indices) for c in self.copies]
        return sum(ys[1:], ys[0])

    def dequantized(self) -> mx.array:
        """Float32 (n_g, out, in): the sum of the copies' weights."""
        ws = [dequantize_switch(c) for c in self.copies]
        return sum(ws[1:], ws[0])


def _group_module(grp: dict, out: int, n: int) -> nn.Module:
    """The module of one moe_mixed group (see module doc), bias-free."""
    shape = (len(grp["experts"]), out, n)
    if "copies" in grp:
        if not grp["copies"]:
            raise DupqError("a moe_mixed group lists no copies; the pack is damaged, convert it again")
        return ResidualSwitch([build_module("switch_linear", shape, e) for e in grp["copies"]])
    if "entry" not in grp:
        raise DupqError("a moe_mixed group has neither 'entry' nor 'copies'; the pack is damaged, convert it again")
    return build_module("switch_linear", shape, grp["entry"])


class MixedSwitchLinear(SwitchShape, nn.Module):
    """Stacked experts with per-expert bit widths, copies and input rotation; called like mlx-lm's
    ``SwitchLinear``: x (..., 1 or k, 1, in), indices (..., k) -> (..., k, 1, out)."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, entry: dict, bias: bool = False):
        super().__init__()
        if entry.get("format") != FORMAT_MOE_MIXED or not entry.get("groups"):
            raise DupqError(f"MixedSwitchLinear needs a {FORMAT_MOE_MIXED!r} entry with groups; the pack is damaged")
        object.__setattr__(self, "entry", dict(entry, shape=[num_experts, output_dims, input_dims]))
        owner, local = _local_maps(entry["groups"], num_experts)
        self.groups = [_group_module(g, output_dims, input_dims) for g in entry["groups"]]
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))
        rot = None
        if entry.get("rotation"):
            rot = make_rotation(entry["rotation"], input_dims)
        object.__setattr__(self, "rotation", rot)
        object.__setattr__(self, "_owner", mx.array(owner))
        object.__setattr__(self, "_local", mx.array(local))
        self.freeze()

    @property
    def expert_bits(self) -> list[float]:
        return list(self.entry["expert_bits"])

    @property
    def expert_copies(self) -> list[int]:
        return list(self.entry.get("expert_copies") or [1] * self.num_experts)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        groups = route.mixed_groups(self)
        y = route.switch(self, groups, x, indices) if groups else None
        if y is None:
            y = self._grouped(x if self.rotation is None else self.rotation.apply(x), indices, sorted_indices)
        return y + mx.expand_dims(self["bias"][indices], -2) if "bias" in self else y

    def _grouped(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        """The mlx path on (rotated) x: one gather matmul per group (and copy), merged by mask."""
        if mx.default_device() == mx.cpu and indices.size >= CPU_DENSE_MIN_ROWS * self.num_experts:
            # CPU prefill: >= 16 rows per expert on average -> dequantize each expert once and use BLAS
            # (the dense-linear rule of quant_linear, per expert); decode keeps the packed kernels
            w = self.stored_dequantized().astype(x.dtype).swapaxes(-1, -2)
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

    def stored_dequantized(self) -> mx.array:
        """Float32 (E, out, in) weight in the stored (rotated) basis, copies summed."""
        parts = [dequantize_switch(mod) for mod in self.groups]
        order = np.argsort(np.concatenate([g["experts"] for g in self.entry["groups"]]))
        return mx.concatenate(parts)[mx.array(order)]

    def dense_weight(self, dtype: mx.Dtype) -> mx.array:
        """The effective (E, out, in) weight in ``dtype`` for :class:`mlx_dupq.layers.cpu.DensePrefillSwitchGLU`."""
        return self.dequantized().astype(dtype)

    def dequantized(self) -> mx.array:
        """Float32 (E, out, in) effective weight in the input's basis: ``Q(W R) R^T`` (reference path)."""
        w = self.stored_dequantized()
        return w if self.rotation is None else w @ self.rotation.matrix().T

    def _extra_repr(self) -> str:
        extra = ""
        if "expert_copies" in self.entry:
            extra += f", copies={sorted(set(self.entry['expert_copies']))}"
        if self.rotation is not None:
            extra += f", rotation={self.rotation.kind}"
        return f"shape={tuple(self.entry['shape'])}, expert_bits={sorted(set(self.entry['expert_bits']))}{extra}"


def dequantize_switch(mod: nn.Module) -> mx.array:
    """Float32 weight of any switch module (float, mlx-quantized, dupq, mixed: its effective weight)."""
    if hasattr(mod, "dequantized"):
        return mod.dequantized().astype(mx.float32)
    if "scales" in mod:
        f32 = (lambda a: None if a is None else a.astype(mx.float32))
        return mx.dequantize(mod["weight"], f32(mod["scales"]), f32(mod.get("biases")), group_size=mod.group_size,
                             bits=mod.bits)
    return mod["weight"].astype(mx.float32)


def _build_mixed(kind: str, shape: tuple[int, ...], entry: dict, bias: bool) -> nn.Module:
    """:func:`~mlx_dupq.layers.quant_linear.build_module` for ``format: "moe_mixed"`` (per-expert widths)."""
    if kind != "switch_linear":
        raise DupqError(f"a moe_mixed entry describes a switch layer, not a {kind}; the pack is damaged")
    return MixedSwitchLinear(shape[2], shape[1], shape[0], entry, bias=bias)


FORMAT_BUILDERS["moe_mixed"] = _build_mixed
