"""Duplication as a convert feature (:class:`DupFeature`): parallel / residual / serial copies inside
the converter and the pack (docs/duplication.md; the protocol: :mod:`mlx_dupq.features.protocol`).

Serial plans (:func:`group_passes`, :func:`expand_serial`): decoder layer ``k``'s group is
quantized once per copy and stored as consecutive entries ``layers.<serial_index(plan, k, i)>``
of an expanded layer list, which the loader rebuilds from the recorded plan; everything below
is about parallel / residual linears.

The recipe's ``[duplication]`` (a :class:`~mlx_dupq.dup.specs.DupPlan`) decides which decoder
layers get copies; :func:`check_dup_recipe` resolves it for the model (``last_n`` /
``last_fraction`` expanded) and rejects what the converter cannot do. Every ``nn.Linear`` of a
planned layer is then quantized by :func:`quantize_dup_linear` and stored as::

    <path>.copies.<k>.weight / .scales / .biases   copy k's packed arrays (pack_copies); a
                                                   shared-codes copy stores no weight
    <path>.mix                                     aggregation weights (K,) / (K, out) float32,
                                                   only when fitted (not the mean)
    <path>.bias                                    the float bias, once

with the module entry ``{"kind": "linear", "format": "dup", "shape", "mode", "aggregation",
"copies": [copy k's packer entry + CopySpec dict], "mix": bool, "early_stop", "max_copies"}``.
Every copy's bytes are in the pack's files, so they count in its all-in bpw. :func:`load_dup_linear`
rebuilds the :class:`~mlx_dupq.layers.dup_linear.DupLinear` (in :mod:`mlx_dupq.dup.runtime`, below the loader). No tensor is called ``<path>.weight``,
so ``mlx_lm.load`` (strict) refuses a duplicated pack instead of running a wrong model.

Copies are made by the copy engine (:func:`~mlx_dupq.dup.copies.make_copies`: RTN with the copy's
variants; GPTQ for plain-grid copies when the recipe's quantizer is gptq); other linears use the
recipe's method. When the
recipe is calibrated, parallel aggregations other than the mean are fitted from the layer input
Hessian (:func:`~mlx_dupq.dup.aggregate.fit_mix`), and the calibration hidden states advance through
the aggregated weight ``sum_k a_k W_k`` (residual: ``sum_k W_k``), which is exact except for
per-copy activation quantization.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..adapter import layer_index, layer_owner
from ..config import QuantSpec, Recipe
from ..errors import DupqError
from ..layers.dup_linear import DupLinear
from .aggregate import fit_mix
from .copies import copy_rotation, effective_weight, make_copies, pack_qtensors
from ..features.protocol import ConvertContext, Feature
from .runtime import FORMAT_DUP, expand_serial, load_dup_linear, serial_index  # noqa: F401  (re-exported)
from .specs import CopySpec, DupPlan



def check_dup_recipe(rec: Recipe, skeleton: nn.Module, online: dict | None = None) -> DupPlan | None:
    """The recipe's duplication plan resolved for ``skeleton`` (None when the recipe has none)."""
    plan = rec.duplication
    if plan is None:
        return None
    plan = plan.resolve(len(layer_owner(skeleton).layers))
    if plan.mode == "parallel" and plan.aggregation != "mean" and not rec.quantizer.calibrated:
        raise DupqError(f"aggregation {plan.aggregation!r} is fitted on calibration data, but quantizer "
                        f"{rec.quantizer.method!r} is not calibrated; use a calibrated quantizer (gptq, awq) "
                        "or aggregation = \"mean\"")
    if plan.mode == "serial" and online:
        raise DupqError("serial copies renumber the decoder layers, which online rotations cannot follow yet; "
                        "drop the rotation's online part or use mode parallel / residual")
    clash = sorted(p for p in (online or {}) if layer_index(p) in plan.copies)
    if clash:
        raise DupqError(f"duplicated layers have online rotations ({', '.join(clash[:3])}); copies with a "
                        "run-time rotation are not supported yet: drop the rotation's online part or the layers")
    return plan


def planned_copies(plan: DupPlan | None, path: str) -> tuple[CopySpec, ...] | None:
    """The copies the plan gives the linear at ``path`` (None: not duplicated)."""
    if plan is None:
        return None
    k = layer_index(path)
    return None if k is None else plan.copies.get(k)


def group_passes(plan: DupPlan | None, keys: Sequence[str]) -> list[tuple[DupPlan | None, Callable[[str], str]]]:
    """How the converter quantizes one source group: ``[(plan for _quantize_group, rename of its keys)]``.

    Parallel / residual plans (or none): one pass with the plan itself. A serial plan quantizes the
    group of decoder layer ``k`` once per copy; pass i stores copy i's variant as a one-copy ``dup``
    linear (None when the copy is the plain quantizer's, so GPTQ / AWQ apply) and renames
    ``layers.k.`` to its entry :func:`serial_index` in the expanded layer list.
    """
    if plan is None or plan.mode != "serial":
        return [(plan, lambda key: key)]
    ks = {layer_index(key) for key in keys} - {None}
    if len(ks) != 1:
        return [(None, lambda key: key)]
    k = ks.pop()
    passes = []
    for i, c in enumerate(plan.copies.get(k, (CopySpec(),))):
        sub = None if c == CopySpec() else DupPlan(mode="parallel", copies={k: (c,)})
        j = serial_index(plan, k, i)
        passes.append((sub, lambda key, k=k, j=j: re.sub(rf"(^|\.)layers\.{k}\.", rf"\g<1>layers.{j}.", key, count=1)))
    return passes


def aggregate_weight(ws: Sequence[mx.array], mode: str, mix: mx.array | None) -> mx.array:
    """Copies' effective weights [(out, in)] -> the one float weight the DupLinear computes."""
    if mode == "residual":
        return sum(ws[1:], ws[0])
    if mix is None:
        return sum(ws[1:], ws[0]) / len(ws)
    a = mix if mix.ndim == 1 else mix[..., None]
    return sum(a[k] * ws[k] for k in range(len(ws)))


def quantize_dup_linear(w: mx.array, base: QuantSpec, copy_specs: Sequence[CopySpec], plan: DupPlan,
                        dtype: mx.Dtype, stats=None, keep: bool = False,
                        quantizer=None) -> tuple[dict[str, mx.array], dict, mx.array | None]:
    """Float weight (out, in) of a planned linear -> (arrays under ``copies.<k>.*`` / ``mix``, entry,
    aggregated float weight (out, in) when ``keep``, else None).

    stats: the linear's calibration :class:`~mlx_dupq.input_stats.LinearStats` (its Hessian fits the mix,
    and GPTQs the copies when ``quantizer`` is the recipe's gptq :class:`~mlx_dupq.config.QuantizerSpec`).
    """
    if w.ndim != 2:
        raise DupqError(f"only 2-D linears can be duplicated, got a weight of shape {tuple(w.shape)}")
    w = w.astype(mx.float32)
    gptq = quantizer if quantizer is not None and quantizer.method == "gptq" and stats is not None else None
    qts = make_copies(w, base, copy_specs, dtype, residual=plan.mode == "residual",
                      hessian=None if gptq is None else stats.hessian, gptq=gptq)
    packed = pack_qtensors(qts, copy_specs)
    arrays: dict[str, mx.array] = {}
    copy_entries = []
    for k, (arrs, entry) in enumerate(packed):
        arrays.update({f"copies.{k}.{s}": a for s, a in arrs.items()})
        copy_entries.append(entry)
    ws = None
    mix = None
    fit = plan.mode == "parallel" and plan.aggregation != "mean" and len(copy_specs) > 1
    if fit or keep:
        ws = [effective_weight(qt, copy_rotation(c, w.shape[-1])) for qt, c in zip(qts, copy_specs)]
    if fit:
        if stats is None:
            raise DupqError(f"aggregation {plan.aggregation!r} needs the calibration Hessian of this linear; "
                            "use a calibrated quantizer (gptq, awq) or aggregation = \"mean\"")
        mix = fit_mix(ws, w, stats.hessian, plan.aggregation)
    if mix is not None:
        arrays["mix"] = mix.astype(mx.float32)
    entry = {
        "kind": "linear",
        "format": FORMAT_DUP,
        "shape": list(w.shape),
        "mode": plan.mode,
        "aggregation": plan.aggregation if mix is not None else "mean",
        "copies": copy_entries,
        "mix": mix is not None,
        "early_stop": plan.early_stop,
        "max_copies": plan.max_copies,
    }
    wq = aggregate_weight(ws, plan.mode, mix) if keep else None
    return arrays, entry, wq


class DupFeature(Feature):
    """The recipe's ``[duplication]``: every linear of a planned decoder layer is stored as copies
    (``format: "dup"``); serial plans quantize a layer's group once per copy (:func:`group_passes`)."""

    section = "duplication"

    def __init__(self, dup: DupPlan):
        self.dup = dup

    @classmethod
    def plan(cls, ctx: ConvertContext) -> "DupFeature | None":
        dup = check_dup_recipe(ctx.recipe, ctx.skeleton, ctx.online if ctx.rotation is not None else None)
        return None if dup is None else cls(dup)

    def passes(self, keys):
        return [(None if sub is None else DupFeature(sub), rename) for sub, rename in group_passes(self.dup, keys)]

    def claims(self, path: str, kind: str) -> bool:
        return kind == "linear" and planned_copies(self.dup, path) is not None

    def quantize(self, ctx, path, kind, w, spec, stats, keep):
        fitted = spec.fit(w.shape[-1])
        arrays, entry, wq = quantize_dup_linear(w, fitted, planned_copies(self.dup, path), self.dup, ctx.storage,
                                                stats, keep, ctx.recipe.quantizer)
        return arrays, entry, wq, fitted

    def config_entries(self) -> dict:
        return {"duplication": self.dup.to_dict()}
