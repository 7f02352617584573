"""Which feature a recipe section turns on: ``FEATURES[section] -> Feature class``.

The converter plans, for each section the recipe sets (``getattr(recipe, section) is not None``),
the feature of that section, in this order; when two features claim the same module the earlier
one quantizes it (the MoE plan's shared experts before a ``[duplication]`` of their layer). A new
feature adds its line here (docs/architecture.md, "How to add a feature").
"""

from __future__ import annotations

from ..dup.feature import DupFeature
from ..moe.feature import MoEFeature
from ..refine.feature import RefineFeature
from .act_ranges import ActRangesFeature
from .protocol import ConvertContext, Feature

FEATURES: dict[str, type[Feature]] = {
    "moe": MoEFeature,
    "duplication": DupFeature,
    "activations": ActRangesFeature,
    "refine": RefineFeature,
}


def plan_features(ctx: ConvertContext) -> list[Feature]:
    """The planned features of ``ctx.recipe`` (those whose ``plan`` returned an instance)."""
    out = []
    for section, cls in FEATURES.items():
        if getattr(ctx.recipe, section, None) is not None:
            feature = cls.plan(ctx)
            if feature is not None:
                out.append(feature)
    return out
