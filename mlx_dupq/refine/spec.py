"""Recipe options of the refinement stages: ``[refine.block]`` (and a place for ``[refine.e2e]``).

Frozen dataclasses that validate on construction (one-line :class:`DupqError`) and round-trip
through plain dicts, like every other recipe option (:mod:`mlx_dupq.config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import DupqError
from ..specs import check_fields

TRAINABLE = ("scales", "biases", "weights", "norms")
TARGETS = ("float", "quantized")


def _positive_int(name: str, v: Any, allow_none: bool = False) -> None:
    if allow_none and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise DupqError(f"refine.block {name} {v!r} must be a positive integer")


def _positive_float(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise DupqError(f"refine.block {name} {v!r} must be a number > 0 (e.g. 1e-4)")
    return float(v)


@dataclass(frozen=True)
class BlockSpec:
    """Block-wise reconstruction of each decoder layer after it is quantized (:mod:`mlx_dupq.refine.block`).

    epochs:     passes over the training windows (each window = one calibration sequence)
    steps:      optimizer steps in all, overriding ``epochs`` (None: epochs x windows / batch)
    batch:      calibration sequences per optimizer step
    lr:         Adam learning rate of scales, biases and norms (scales and biases train relative to
                the initial scale, :class:`~mlx_dupq.refine.fakequant.FakeQuantLinear`)
    lr_weights: Adam learning rate of the latent weights (``trainable`` "weights"), in grid steps
    samples:    calibration sequences trained on (None: all but the held-out ones); with
                ``holdout`` at most the quantizer's ``calib_samples``
    seq_len:    train on the first ``seq_len`` tokens of each sequence (None: all of them)
    trainable:  any of scales, biases, weights (latent weights, codes re-rounded), norms
    target:     "float": reproduce the float model's own hidden states (the float stream, run
                alongside); "quantized": the float layer applied to the quantized stream's input
    holdout:    calibration sequences held out to choose between initialisation and trained result
    seed:       shuffling of the training windows
    min_gain:   stop after an epoch (or ``check_every`` steps) that lowered the held-out error by less
                than this fraction of its value before it (0: run every step); needs ``holdout`` >= 1
    check_every: steps between the held-out checks of ``min_gain`` (None: one epoch)
    experts:    train the switch (MoE expert) layers too, as every other quantized linear (False:
                hold them at their quantized values; per-expert-width layers are always held)
    """

    epochs: int = 2
    steps: int | None = None
    batch: int = 1
    lr: float = 1e-4
    lr_weights: float = 1e-3
    samples: int | None = 4
    seq_len: int | None = 256
    trainable: tuple[str, ...] = ("scales", "biases", "norms")
    target: str = "float"
    holdout: int = 2
    seed: int = 0
    min_gain: float = 0.0
    check_every: int | None = None
    experts: bool = True

    def __post_init__(self):
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise DupqError(f"refine.block epochs {self.epochs!r} must be an integer >= 0")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 0):
            raise DupqError(f"refine.block steps {self.steps!r} must be an integer >= 0")
        _positive_int("batch", self.batch)
        _positive_int("samples", self.samples, allow_none=True)
        _positive_int("seq_len", self.seq_len, allow_none=True)
        _positive_int("check_every", self.check_every, allow_none=True)
        object.__setattr__(self, "lr", _positive_float("lr", self.lr))
        object.__setattr__(self, "lr_weights", _positive_float("lr_weights", self.lr_weights))
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, int) or self.holdout < 0:
            raise DupqError(f"refine.block holdout {self.holdout!r} must be an integer >= 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise DupqError(f"refine.block seed {self.seed!r} must be an integer")
        trainable = (self.trainable,) if isinstance(self.trainable, str) else tuple(self.trainable)
        unknown = [t for t in trainable if t not in TRAINABLE]
        if unknown or not trainable:
            raise DupqError(f"refine.block trainable {list(trainable)} is not a non-empty list of "
                            f"{', '.join(TRAINABLE)}")
        object.__setattr__(self, "trainable", tuple(t for t in TRAINABLE if t in trainable))
        if isinstance(self.min_gain, bool) or not isinstance(self.min_gain, (int, float)) \
                or not 0 <= self.min_gain < 1:
            raise DupqError(f"refine.block min_gain {self.min_gain!r} must be a fraction in [0, 1) (e.g. 0.01)")
        object.__setattr__(self, "min_gain", float(self.min_gain))
        if self.min_gain > 0 and self.holdout < 1:
            raise DupqError("refine.block min_gain needs held-out sequences to measure the gain; set holdout >= 1")
        if self.target not in TARGETS:
            raise DupqError(f"refine.block target {self.target!r} is unknown; use float or quantized")
        if not isinstance(self.experts, bool):
            raise DupqError(f"refine.block experts {self.experts!r} must be true or false")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["trainable"] = list(self.trainable)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BlockSpec":
        check_fields(cls, d, "refine.block option(s)")
        return cls(**d)


@dataclass(frozen=True)
class RefineSpec:
    """The ``[refine]`` table: ``block`` (per layer, during convert) and ``e2e`` (after it).

    ``e2e`` is kept as the plain dict of ``[refine.e2e]``; the end-to-end stage validates it.
    """

    block: BlockSpec | None = None
    e2e: dict | None = None

    def __post_init__(self):
        if isinstance(self.block, dict):
            object.__setattr__(self, "block", BlockSpec.from_dict(self.block))
        if self.e2e is not None and not isinstance(self.e2e, dict):
            raise DupqError(f"refine.e2e {self.e2e!r} must be a table")

    def to_dict(self) -> dict:
        d: dict[str, Any] = {}
        if self.block is not None:
            d["block"] = self.block.to_dict()
        if self.e2e is not None:
            d["e2e"] = dict(self.e2e)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RefineSpec":
        if not isinstance(d, dict):
            raise DupqError(f"recipe refine {d!r} must be a table with block and/or e2e")
        unknown = set(d) - {"block", "e2e"}
        if unknown:
            raise DupqError(f"unknown refine stage(s) {sorted(unknown)}; known: block, e2e")
        return cls(block=d.get("block"), e2e=d.get("e2e"))
