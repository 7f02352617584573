"""The block-reconstruction stage as the converter runs it, one decoder layer at a time.

:class:`BlockStage` is what the pipeline calls after a decoder layer is quantized (and before the
calibration hidden states advance through it): it computes the layer's targets, runs
:func:`~mlx_dupq.refine.block.refine_layer`, keeps the float stream, and records per-layer
before/after errors in ``OUT.partial/refine-block.json`` (so a resumed conversion keeps the
reports of finished layers) and finally in the pack's ``config.json`` (``mlx_dupq.refine.block``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from ..errors import DupqError
from ..io.pack import write_json_atomic
from ..specs import QuantizerSpec
from .block import block_targets, check_block_supported, refine_layer
from .spec import BlockSpec

REPORT_FILE = "refine-block.json"


def check_calibration(quantizer: QuantizerSpec, spec: BlockSpec) -> None:
    """Refuse, in one line, a block stage that asks for more calibration sequences than the recipe has."""
    need = (spec.samples or 1) + spec.holdout
    if need > quantizer.calib_samples:
        raise DupqError(f"refine.block trains on {spec.samples} and holds out {spec.holdout} calibration sequences, "
                        f"more than the quantizer's calib_samples {quantizer.calib_samples}; raise "
                        "[quantizer] calib_samples or lower refine.block samples")


class BlockStage:
    """Per-layer hook of ``[refine.block]`` (see the module docstring)."""

    def __init__(self, spec: BlockSpec, root: Path, resume: bool):
        self.spec = spec
        self.path = root / REPORT_FILE
        self.layers: dict[str, dict] = {}
        if resume and self.path.exists():
            self.layers = json.loads(self.path.read_text()).get("layers", {})

    def __call__(self, layer: nn.Module, prefix: str, arrays: dict[str, mx.array], entries: dict[str, dict],
                 calib, wrapped: set[str], storage: mx.Dtype,
                 say: Callable[[str], None], dequantized: dict[str, mx.array] | None = None
                 ) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
        """Refine one layer: (arrays to store, dequantized weights to advance ``calib.h`` with).
        ``dequantized``: the converter's dequantized weights of the layer; those of the switch (expert)
        layers it does not train are held fixed (:func:`~mlx_dupq.refine.block.refine_layer`)."""
        check_block_supported(entries)
        y, x_float = block_targets(layer, calib.h, calib.hf, self.spec)
        switch = {f"{p}.weight" for p, e in entries.items() if e.get("kind") == "switch_linear"}
        fixed = {k: v for k, v in (dequantized or {}).items() if k in switch}
        out, dequantized, report = refine_layer(layer, prefix, arrays, entries, calib.h, y, self.spec, storage,
                                                wrapped, say, fixed=fixed)
        calib.hf = x_float
        self.layers[prefix] = report.to_dict()
        write_json_atomic(self.path, {"layers": self.layers})
        say(f"refine {prefix}: held-out error {report.init_error:.4g} -> {report.trained_error:.4g} "
            f"(kept {report.kept}, {report.steps} steps, {report.seconds:.0f}s)")
        return out, dequantized

    def record(self) -> dict:
        """What config.json keeps: the options and each layer's held-out errors before and after."""
        kept = sum(1 for r in self.layers.values() if r["kept"] == "trained")
        return {"options": self.spec.to_dict(), "layers_trained": kept, "layers": dict(sorted(self.layers.items()))}

    def cleanup(self) -> None:
        self.path.unlink(missing_ok=True)
