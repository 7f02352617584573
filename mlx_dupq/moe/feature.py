"""MoE expert-wise precision as a convert feature (:class:`MoEFeature`, recipe section ``[moe]``).

Planning scores the experts on calibration text streamed from the already-opened source
(:func:`~mlx_dupq.moe.precision.plan_for_convert`) and gives each routed expert its bit width,
residual copies and input rotation; the feature then quantizes the switch layers it planned
(``format: "moe_mixed"``, :class:`~mlx_dupq.layers.moe_linear.MixedSwitchLinear`) and the shared
experts' linears with copies (``format: "dup"``). See docs/moe.md; the protocol:
:mod:`mlx_dupq.features.protocol`.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx

from ..config import Recipe
from ..dup.feature import quantize_dup_linear
from ..features.protocol import ConvertContext, Feature
from ..layers.moe_linear import quantize_experts
from ..layers.quant_linear import build_module
from ..quant.methods import quantize_weight
from ..quant.bitpack import pack
from ..quant.qtensor import QTensor
from .duplication import shared_dup_plan
from .precision import ExpertPlan, plan_for_convert, scoring_message


class MoEFeature(Feature):
    """The recipe's ``[moe]``: per-expert widths, copies and rotation of switch layers, and the shared
    experts' spec and residual copies."""

    section = "moe"
    switch_stats = True  # a calibrated quantizer needs each expert's own statistics

    def __init__(self, experts: ExpertPlan):
        self.experts = experts

    @classmethod
    def plan(cls, ctx: ConvertContext) -> "MoEFeature | None":
        ctx.say(scoring_message(ctx.recipe))
        experts = plan_for_convert(ctx.recipe, ctx.source, ctx.skeleton)
        return None if experts is None else cls(experts)

    def spec_for(self, path, spec):
        return self.experts.linear_specs.get(path, spec)  # the shared experts' spec

    def claims(self, path: str, kind: str) -> bool:
        if kind == "switch_linear":
            return path in self.experts.expert_bits
        return kind == "linear" and path in self.experts.linear_copies

    def quantize(self, ctx, path, kind, w, spec, stats, keep):
        if kind == "switch_linear":
            arrays, entry, wq = _quantize_switch(w, path, self.experts.expert_specs(path, spec), self.experts,
                                                 ctx.recipe, ctx.storage, stats, keep)
            return arrays, entry, wq, spec  # the entry records each group's own spec
        fitted = spec.fit(w.shape[-1])  # a shared expert's linear as residual copies (docs/moe.md)
        dplan, copy_specs = shared_dup_plan(self.experts.linear_copies[path])
        arrays, entry, wq = quantize_dup_linear(w, fitted, copy_specs, dplan, ctx.storage, stats, keep,
                                                ctx.recipe.quantizer)
        return arrays, entry, wq, fitted


def _quantize_switch(w: mx.array, path: str, expert_specs, moe, rec: Recipe, storage, stats=None,
                     keep: bool = False) -> tuple[dict, dict, mx.array | None]:
    """A switch layer (E, out, in) with the expert plan's widths, copies and rotation
    -> (arrays, moe_mixed entry, when ``keep`` the dequantized (E, out, in) float32 weight).

    A calibrated quantizer (gptq, awq) with the layer's :class:`~mlx_dupq.input_stats.SwitchStats` quantizes
    each expert's first copy on its own against that expert's statistics (:func:`_expert_quantizer`);
    without statistics (or for residual copies >= 2) it falls back to ``mse`` like any stacked weight.
    """
    rotation = moe.rotation_for(w.shape[-1])
    quantize = (None if rec.quantizer.method == "rtn"
                else lambda wg, s: pack(quantize_weight(wg.astype(mx.float32), s, storage, rec.quantizer, None)))
    first, fallback = None, []
    if rec.quantizer.calibrated and stats is not None:
        first = _expert_quantizer(stats, rec.quantizer, storage, rotation, fallback)
    arrays, entry = quantize_experts(w, [s.fit(w.shape[-1]) for s in expert_specs], storage, quantize=quantize,
                                     copies=moe.copies_for(path), rotation=rotation, first_copy=first)
    if first is not None:  # experts no calibration row reached (quantized with mse)
        entry["calib_fallback_experts"] = sorted(fallback)
    wq = None
    if keep:
        m = build_module("switch_linear", tuple(w.shape), entry)
        m.load_weights(list(arrays.items()))
        wq = m.dequantized()  # in the input's basis: Q(W R) R^T
    return arrays, entry, wq


def _expert_quantizer(stats, quantizer, storage, rotation, fallback: list[int]):
    """``first_copy(w_group (n_g, out, in), spec, ids) -> (arrays, entry)`` for
    :func:`~mlx_dupq.layers.moe_linear.quantize_experts`: expert ``ids[i]`` is quantized alone,
    (out, in), with ``quantize_weight`` and its own :class:`~mlx_dupq.input_stats.LinearStats`
    (``stats.expert(e)``; in the rotated basis ``R^T H R`` when the experts are rotated), and the
    QTensors are stacked and packed. An expert without statistics gets ``mse`` and its id is
    appended to ``fallback``. Per-tensor specs (one scale for the whole stack) stay stacked ``mse``.
    """
    import dataclasses

    R = None if rotation is None else rotation.matrix()

    def first_copy(wg: mx.array, spec, ids: list[int]):
        if spec.group_size == -1:
            fallback.extend(ids)
            return pack(quantize_weight(wg.astype(mx.float32), spec, storage, quantizer, None))
        qts = []
        for i, e in enumerate(ids):
            st = stats.expert(e)
            if st is None:
                fallback.append(e)
            elif R is not None:  # x R is what the stored W R sees; E|x R| is not kept, its RMS stands in
                h = R.T @ st.hessian @ R
                st = dataclasses.replace(st, hessian=h, mean_abs=mx.sqrt(mx.maximum(mx.diagonal(h), 0.0)))
            qt = quantize_weight(wg[i].astype(mx.float32), spec, storage, quantizer, st)
            mx.eval(qt.codes, qt.scales, *([] if qt.biases is None else [qt.biases]))
            qts.append(qt)
        return pack(QTensor(codes=mx.stack([q.codes for q in qts]), scales=mx.stack([q.scales for q in qts]),
                            biases=None if qts[0].biases is None else mx.stack([q.biases for q in qts]),
                            spec=qts[0].spec))

    return first_copy
