"""Refinement as a convert feature (:mod:`mlx_dupq.features.protocol`): the ``[refine]`` recipe section.

- ``[refine.block]``: :meth:`RefineFeature.on_layer` runs block-wise reconstruction
  (:class:`~mlx_dupq.refine.stage.BlockStage`) on every decoder layer after it is quantized and
  before the calibration states advance through it; :meth:`config_entries` records the options and
  each layer's held-out errors before / after in config.json (``mlx_dupq.refine.block``).
- ``[refine.e2e]``: :meth:`finish` distills the finished (still partial) pack end to end against
  the float source (:func:`mlx_dupq.refine.e2e.distill_pack`, the same stage as ``mlx-dupq refine``),
  in place, the teacher streamed from the source one decoder layer at a time (never the whole float
  model); its work directory (teacher targets, checkpoint) lives inside ``OUT.partial/``, so
  ``convert --resume`` continues an interrupted e2e stage and a fresh convert starts it over. The
  options are validated in :meth:`plan`, before anything is written; config.json records them and
  the validation KL before / after (``mlx_dupq.refine.e2e``).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import DupqError
from ..features.protocol import ConvertContext, Feature, LayerStep
from . import e2e as e2e_stage
from .e2e_spec import E2ESpec
from .spec import RefineSpec
from .stage import BlockStage, check_calibration

E2E_WORK = "e2e-work"  # inside OUT.partial/


class RefineFeature(Feature):
    section = "refine"
    calibrates = True  # the block stage trains on the calibration states, also after RTN

    def __init__(self, spec: RefineSpec, e2e: E2ESpec | None = None):
        self.spec = spec
        self.e2e = e2e
        self.calibrates = spec.block is not None  # e2e alone needs no calibration states
        self.block: BlockStage | None = None

    @classmethod
    def plan(cls, ctx: ConvertContext) -> "RefineFeature | None":
        spec: RefineSpec = ctx.recipe.refine
        e2e = E2ESpec.from_dict(spec.e2e) if spec.e2e is not None else None  # bad options: one line, nothing written
        if spec.block is None and e2e is None:
            return None
        if spec.block is not None:
            if ctx.recipe.duplication is not None or ctx.recipe.moe is not None:
                raise DupqError("refine.block does not support duplication or [moe] recipes yet; drop [refine.block]")
            check_calibration(ctx.recipe.quantizer, spec.block)
        if e2e is not None and ctx.recipe.activations is not None:
            raise DupqError("[refine.e2e] cannot train a pack with [activations] (fake-quant has no gradient); "
                            "drop one of them")
        return cls(spec, e2e)

    def on_layer(self, ctx: ConvertContext, step: LayerStep) -> None:
        if self.spec.block is None or step.layer is None or step.calib is None:
            return  # (a calibrated quantizer gives every layer calibration states, [refine.e2e] alone uses none)
        if self.block is None:  # its report file lives beside the calibration states (resumed with them)
            self.block = BlockStage(self.spec.block, Path(step.calib.root), resume=True)
        wrapped = {p[len(step.prefix) + 1:] for p in ctx.online if p.startswith(step.prefix + ".")}
        step.arrays, step.dequantized = self.block(step.layer, step.prefix, step.arrays, step.entries, step.calib,
                                                   wrapped, ctx.storage, lambda m: ctx.say(m, step.index),
                                                   dequantized=step.dequantized)

    def config_entries(self) -> dict:
        return {} if self.block is None else {"refine": {"block": self.block.record()}}

    def finish(self, ctx: ConvertContext, pack_dir: Path) -> None:
        if self.block is not None:
            self.block.cleanup()
        if self.e2e is not None:
            self._distill(ctx, Path(pack_dir))

    def _distill(self, ctx: ConvertContext, pack_dir: Path) -> None:
        spec, work = self.e2e, pack_dir / E2E_WORK
        chat = f" (+ {spec.chat_samples} windows of chat, {spec.chat_data})" if spec.chat_samples else ""
        ctx.progress(f"e2e distillation: {spec.steps} steps x {spec.batch} x {spec.seq_len} tokens of "
                     f"{spec.data}{chat}, lr {spec.lr:g}, temperature {spec.temperature:g}", 0, spec.steps)
        t0, first = time.time(), {}

        def progress(phase: str, done: int, total: int, info: dict) -> None:
            if phase == "chat":
                ctx.progress(f"e2e distillation: the teacher's answers for the chat data: {done}/{total}",
                             done, total)
                return
            if phase == "targets":
                ctx.progress(f"e2e distillation: teacher targets of {info['windows']} windows: {done}/{total} "
                             f"{info['unit']}", done, total)
                return
            if phase == "train":
                first.setdefault("step", (done - 1, time.time()))
                s0, t1 = first["step"]
                eta = (time.time() - t1) / max(done - s0, 1) * (total - done)
                ctx.progress(f"e2e distillation: step {done}/{total}, loss {info['loss']:.4f}, "
                             f"ETA {eta / 60:.1f} min", done, total)
            else:
                ctx.progress(f"e2e distillation: validation KL {info['kl']:.4f} at step {done}", done, total)

        res = e2e_stage.distill_pack(pack_dir, ctx.source, spec, progress=progress,
                                     resume=(work / e2e_stage.STATE_FILE).exists(),
                                     teacher_name=ctx.source.name, work=work)
        ctx.progress(f"e2e distillation: validation KL {res.valid_kl_before:.4f} -> {res.valid_kl_after:.4f} "
                     f"({res.kept}, best step {res.best_step}/{res.steps_run}, {time.time() - t0:.0f}s)",
                     spec.steps, spec.steps)
