"""Static activation ranges, measured on the finished pack (recipe ``[activations] mode = "static"``).

The pack is loaded without activation quantizers (its quantized weights, float inputs), the
calibration windows run through it, and the ranges go into config.json (``act_ranges``), where
:func:`mlx_dupq.io.pack.load_pack` reads them. See docs/architecture.md ("Features").
"""

from __future__ import annotations

from mlx_lm.utils import load_tokenizer

from ..eval.data import calibration_batches, load_text
from ..io.pack import load_pack, record_act_ranges
from ..layers.act_quant import calibrate_static_ranges
from .protocol import ConvertContext, Feature


def calibrate_pack_ranges(root, recipe) -> dict[str, float]:
    """Static ranges of a written pack at ``root`` from ``recipe.quantizer``'s calibration text.

    The pack is loaded without activation quantizers (its quantized weights, float inputs), the
    calibration windows run through it, and the ranges go into config.json (``act_ranges``).
    """
    q = recipe.quantizer
    model, _ = load_pack(root, activations=False)
    tokens = calibration_batches(load_tokenizer(root), load_text(q.calib_data), q.calib_samples, q.calib_seq_len,
                                 q.seed)
    ranges = calibrate_static_ranges(model, tokens, recipe.activations, seed=q.seed)
    record_act_ranges(root, ranges)
    return ranges


class ActRangesFeature(Feature):
    """The recipe's ``[activations]`` with ``mode = "static"``: the ranges are measured on the finished
    pack and recorded in its config.json (dynamic ranges need nothing at convert time)."""

    section = "activations"

    @classmethod
    def plan(cls, ctx: ConvertContext) -> "ActRangesFeature | None":
        act = ctx.recipe.activations
        return cls() if act is not None and act.mode == "static" and not act.passthrough else None

    def finish(self, ctx: ConvertContext, pack_dir) -> None:
        ctx.say("calibrating static activation ranges", ctx.n_groups)
        calibrate_pack_ranges(pack_dir, ctx.recipe)  # the finished pack's inputs -> config.json act_ranges
