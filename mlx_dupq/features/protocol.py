"""The convert feature protocol: how duplication, MoE precision, static activation ranges and
(learned) refinement plug into the streaming converter without the converter naming them.

The converter (:func:`mlx_dupq.pipeline.convert`) is a small core::

    open the source -> plan the rotation -> build the skeleton -> plan the features
    -> for each streamed group (a decoder layer, or the non-layer tensors):
           fold + sanitize -> [passes] -> calibrate -> quantize every module -> on_layer -> write
    -> write config.json (+ the features' config entries) -> finish hooks -> rename into place

A feature is a class with a recipe section. :data:`mlx_dupq.features.table.FEATURES` maps the
section (the :class:`~mlx_dupq.config.Recipe` attribute, e.g. ``"duplication"``) to the class;
for each section the recipe sets, the core calls ``cls.plan(ctx)`` once, before any group is
quantized, and keeps the instance it returns (None: nothing to do for this model). Everything
else is an optional hook with a do-nothing default here, so a feature overrides only what it
needs. To add a feature:

1. put its options in a frozen dataclass with ``to_dict`` / ``from_dict`` (the "specs" layer,
   e.g. ``mlx_dupq/refine/spec.py``) and a field on ``Recipe``;
2. write ``class MyFeature(Feature)`` in its own package (the "features" layer, e.g.
   ``mlx_dupq/refine/``), overriding the hooks below;
3. add ``"<section>": MyFeature`` to :data:`~mlx_dupq.features.table.FEATURES`;
4. test it on a tiny model (``mlx_dupq.testing``) through :func:`mlx_dupq.convert`.

Hooks, in the order the core calls them:

- ``plan(ctx)`` (classmethod): read ``ctx.recipe``, inspect ``ctx.skeleton`` / ``ctx.source``, validate
  (raise :class:`~mlx_dupq.errors.DupqError` with a one-line fix), return an instance or None.
- ``passes(keys)``: split one streamed group into several quantization passes (serial copies of a
  decoder layer): ``[(feature for the pass or None, rename of the pass's keys)]``. At most one
  feature of a recipe may split.
- ``spec_for(path, spec)``: change the recipe's :class:`~mlx_dupq.specs.QuantSpec` of a module.
- ``claims(path, kind)`` / ``quantize(...)``: the first feature that claims a module quantizes it
  (``kind``: "linear" | "embedding" | "switch_linear"); unclaimed modules get the recipe's quantizer.
- ``on_layer(ctx, step)``: after a decoder layer (one pass) is quantized, before it is written and
  before the calibration state advances through it: ``step`` holds the float weights, the packed
  arrays and entries (a hook may replace them, e.g. block reconstruction), and the calibration state.
- ``config_entries()``: keys added to config.json's ``mlx_dupq`` section (what the loader needs).
- ``finish(ctx, pack_dir)``: after config.json is written into the (still partial) pack directory,
  e.g. measure static activation ranges on the finished pack, or distill it end to end.

Pack formats that features write are read back by :func:`mlx_dupq.io.pack.load_pack` through its
table of module formats (docs/architecture.md, "Pack formats"); loading never imports a feature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..config import Recipe
from ..io.base import Source
from ..rotation.plan import RotationPlan
from ..specs import QuantSpec

Progress = Callable[[str, int, int], None]  # (message, done, total)


@dataclass
class ConvertContext:
    """What the converter knows when features plan and run.

    recipe:   the recipe, with the command line's overrides applied
    source:   the opened float source (read tensors with ``source.get``; never re-open the model)
    skeleton: the mlx-lm model of the (rotated) config, lazy random weights
    rotation: the rotation plan, or None
    storage:  the storage dtype of scales and float tensors (``mx.float16`` ...)
    n_groups: how many streamed groups the conversion has (for progress messages)
    progress: ``progress(message, done, total)``
    """

    recipe: Recipe
    source: Source
    skeleton: nn.Module
    rotation: RotationPlan | None = None
    storage: mx.Dtype = mx.float16
    n_groups: int = 0
    progress: Progress = field(default=lambda *a: None)

    @property
    def online(self) -> dict:
        """``{module path: rotation dict}`` of the rotations that run at load time (may be empty)."""
        return self.rotation.online if self.rotation is not None else {}

    def say(self, message: str, done: int = 0) -> None:
        self.progress(message, done, self.n_groups)


@dataclass
class LayerStep:
    """One quantized pass of a decoder layer, handed to :meth:`Feature.on_layer`.

    index:          the streamed group's position (0-based, in conversion order)
    prefix:         the decoder layer's module path (``model.layers.3``)
    float_weights:  {tensor name: float weight} of the layer, folded and sanitized
    arrays:         {tensor name: array} to be written (packed codes, scales, float norms, ...)
    entries:        {module path: pack entry} to be written
    dequantized:    {weight name: float32 weight} the calibration state advances through (only when
                    the recipe is calibrated); a hook that changes ``arrays`` updates it too
    layer:          the skeleton's decoder layer, holding the float weights (when calibrated)
    calib:          the :class:`~mlx_dupq.calibration.Calibration` (``calib.h``: this layer's inputs),
                    or None when the recipe's quantizer is not calibrated
    """

    index: int
    prefix: str
    float_weights: dict[str, mx.array]
    arrays: dict[str, mx.array]
    entries: dict[str, dict]
    dequantized: dict[str, mx.array]
    layer: nn.Module | None = None
    calib: object | None = None


class Feature:
    """Base class of a convert feature; see the module docstring for the protocol."""

    #: the Recipe attribute this feature is configured by (its key in FEATURES)
    section: str = ""
    #: calibration should record per-expert statistics of switch layers (MoE)
    switch_stats: bool = False
    #: the feature needs the calibration states (``LayerStep.calib``) even when the quantizer is not
    #: calibrated (block reconstruction after round to nearest)
    calibrates: bool = False

    @classmethod
    def plan(cls, ctx: ConvertContext) -> "Feature | None":
        raise NotImplementedError

    def passes(self, keys: Sequence[str]) -> list[tuple["Feature | None", Callable[[str], str]]]:
        return [(self, lambda key: key)]

    def spec_for(self, path: str, spec: QuantSpec) -> QuantSpec:
        return spec

    def claims(self, path: str, kind: str) -> bool:
        return False

    def quantize(self, ctx: ConvertContext, path: str, kind: str, w: mx.array, spec: QuantSpec, stats,
                 keep: bool) -> tuple[dict[str, mx.array], dict, mx.array | None, QuantSpec]:
        """Quantize the claimed module's weight ``w`` (the recipe's ``spec``, after :meth:`spec_for`;
        ``stats``: its calibration statistics or None) -> (arrays under suffixes ``weight`` /
        ``scales`` / ..., the pack entry without ``kind`` and ``shape`` (the core adds them), the
        dequantized float32 weight when ``keep`` else None, the spec actually used: when its group
        size differs from ``spec``'s, the core records ``requested_group_size``)."""
        raise NotImplementedError

    def on_layer(self, ctx: ConvertContext, step: LayerStep) -> None:
        return None

    def config_entries(self) -> dict:
        return {}

    def finish(self, ctx: ConvertContext, pack_dir: Path) -> None:
        return None
