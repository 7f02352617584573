"""Refinement as a convert feature (:mod:`mlx_dupq.features.protocol`): the ``[refine]`` recipe section.

- ``[refine.block]``: :meth:`RefineFeature.on_layer` runs block-wise reconstruction
  (:class:`~mlx_dupq.refine.stage.BlockStage`) on every decoder layer after it is quantized and
  before the calibration states advance through it; :meth:`config_entries` records the options and
  each layer's held-out errors before / after in config.json (``mlx_dupq.refine.block``).
- ``[refine.e2e]``: end-to-end distillation of the finished pack belongs in :meth:`finish`
  (``mlx_dupq.refine.e2e.distill_pack(pack_dir, teacher, spec)``, issue 14 item 2); until that
  stage is wired here, a recipe with ``[refine.e2e]`` is refused in one line that names
  ``mlx-dupq refine PACK``.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DupqError
from ..features.protocol import ConvertContext, Feature, LayerStep
from .spec import RefineSpec
from .stage import BlockStage, check_calibration


class RefineFeature(Feature):
    section = "refine"
    calibrates = True  # the block stage trains on the calibration states, also after RTN

    def __init__(self, spec: RefineSpec):
        self.spec = spec
        self.block: BlockStage | None = None

    @classmethod
    def plan(cls, ctx: ConvertContext) -> "RefineFeature | None":
        spec: RefineSpec = ctx.recipe.refine
        if spec.e2e is not None:  # the place of the e2e stage (see the module docstring)
            raise DupqError("[refine.e2e] is not a convert stage yet; convert without it, then run "
                            "`mlx-dupq refine PACK` on the pack")
        if spec.block is None:
            return None
        if ctx.recipe.duplication is not None or ctx.recipe.moe is not None:
            raise DupqError("refine.block does not support duplication or [moe] recipes yet; drop [refine.block]")
        check_calibration(ctx.recipe.quantizer, spec.block)
        return cls(spec)

    def on_layer(self, ctx: ConvertContext, step: LayerStep) -> None:
        if step.layer is None or step.calib is None:
            return
        if self.block is None:  # its report file lives beside the calibration states (resumed with them)
            self.block = BlockStage(self.spec.block, Path(step.calib.root), resume=True)
        wrapped = {p[len(step.prefix) + 1:] for p in ctx.online if p.startswith(step.prefix + ".")}
        step.arrays, step.dequantized = self.block(step.layer, step.prefix, step.arrays, step.entries, step.calib,
                                                   wrapped, ctx.storage, lambda m: ctx.say(m, step.index))

    def config_entries(self) -> dict:
        return {} if self.block is None else {"refine": {"block": self.block.record()}}

    def finish(self, ctx: ConvertContext, pack_dir: Path) -> None:
        if self.block is not None:
            self.block.cleanup()
        # [refine.e2e] runs here, on the finished (still partial) pack, once it is wired (plan refuses it now)
