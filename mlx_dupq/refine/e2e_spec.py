"""``E2ESpec``: the options of end-to-end distillation (a recipe's ``[refine.e2e]`` table).

A frozen, validated dataclass with a dict round-trip, like :class:`mlx_dupq.config.QuantSpec`;
no model code here, so a recipe can be checked without loading anything.

Fields
------
steps          optimizer steps (0 = only measure the validation KL)
lr             Adam learning rate
samples        training windows of ``seq_len`` tokens drawn from the calibration text
valid_samples  validation windows, drawn from a held-out tail of the calibration text
seq_len        tokens per window
batch          windows per step (the global batch; data-parallel ranks split it)
trainable      what moves: any of ``scales``, ``biases``, ``norms``, ``routers`` (the float router of
               each MoE block: which experts a token picks and their weights); the codes never do
temperature    softmax temperature of teacher and student (mlx-lm's DWQ uses 2.0)
top_k          teacher logits kept per position (the cached target)
eval_every     steps between validations (also the checkpoint interval)
patience       validations without improvement before stopping early (0 = never stop early)
seed           windows and batch order
data           calibration text: a name ``mlx_dupq.eval.data.load_text`` knows (never ``:eval``)
               or a file; training and validation windows are disjoint windows of it
relative       scales and biases train in units of each group's initial |scale| (``lr`` is then
               a fraction of a quantization step per step); False: absolute units, as DWQ
lr_per_scale   ``lr`` is in units of the pack's median |scale| (over every trained ``scales``
               entry): Adam's absolute step is ``lr x median``, so one setting means the same on
               models whose weights differ in size (SmolLM2-135M's 3-bit pack: median 0.24,
               Qwen2.5-Coder-0.5B's w2-t3: 0.017, where absolute lr 1e-4 diverged)
grad_checkpoint  recompute each decoder layer in the backward pass (mlx-lm's ``grad_checkpoint``)
chat_samples   training windows of chat conversations (:mod:`mlx_dupq.refine.chat_data`) beside the
               ``samples`` windows of plain text, plus ``round(valid_samples x chat_samples / samples)``
               (at least 1) validation windows of them; 0 = plain text only
chat_data      ``self`` (the float teacher's own answers to prompts built from the calibration text,
               generated once and cached) or a JSON-lines file of conversations in mlx-lm's chat format
chat_max_tokens  the longest generated answer (tokens)
chat_temp      sampling temperature of the generated answers (top-p 0.95; 0 = greedy)
schedule       ``constant`` (``lr`` at every step, as DWQ) or ``cosine`` (``lr`` decayed along a half
               cosine to 0 at ``steps``, as EfficientQAT's end-to-end stage)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import UsageError
from ..specs import check_fields

E2E_VERSION = 1
TRAINABLE = ("scales", "biases", "norms", "routers")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class E2ESpec:
    steps: int = 100
    lr: float = 1e-4
    samples: int = 64
    valid_samples: int = 8
    seq_len: int = 256
    batch: int = 4
    trainable: tuple[str, ...] = ("scales", "biases")
    temperature: float = 1.0
    top_k: int = 256
    eval_every: int = 10
    patience: int = 3
    seed: int = 0
    data: str = "mix:calib"
    grad_checkpoint: bool = False
    relative: bool = False
    lr_per_scale: bool = False
    schedule: str = "constant"
    chat_samples: int = 0
    chat_data: str = "self"
    chat_max_tokens: int = 256
    chat_temp: float = 0.7
    version: int = E2E_VERSION

    def __post_init__(self):
        tr = self.trainable
        if isinstance(tr, str):
            tr = tuple(t.strip() for t in tr.split(",") if t.strip())
        tr = tuple(tr)
        bad = [t for t in tr if t not in TRAINABLE]
        if bad:
            raise UsageError(f"unknown trainable name(s) {bad}; use any of {', '.join(TRAINABLE)}")
        if not tr:
            raise UsageError(f"nothing to train; name at least one of {', '.join(TRAINABLE)}")
        object.__setattr__(self, "trainable", tuple(t for t in TRAINABLE if t in tr))
        for name in ("steps", "samples", "valid_samples", "seq_len", "batch", "top_k", "eval_every",
                     "patience", "seed", "chat_samples", "chat_max_tokens", "version"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise UsageError(f"e2e option {name} must be an integer, got {v!r}")
        if self.steps < 0:
            raise UsageError(f"e2e steps must be >= 0, got {self.steps}")
        for name in ("samples", "valid_samples", "seq_len", "batch", "top_k", "eval_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"e2e option {name} must be >= 1, got {getattr(self, name)}")
        if self.chat_samples < 0:
            raise UsageError(f"e2e chat_samples must be >= 0, got {self.chat_samples}")
        if self.chat_max_tokens < 1:
            raise UsageError(f"e2e chat_max_tokens must be >= 1, got {self.chat_max_tokens}")
        if not isinstance(self.chat_data, str) or not self.chat_data.strip():
            raise UsageError(f"e2e chat_data must be 'self' or a .jsonl file, got {self.chat_data!r}")
        if self.patience < 0:
            raise UsageError(f"e2e patience must be >= 0, got {self.patience}")
        object.__setattr__(self, "grad_checkpoint", bool(self.grad_checkpoint))
        object.__setattr__(self, "relative", bool(self.relative))
        object.__setattr__(self, "lr_per_scale", bool(self.lr_per_scale))
        if self.relative and self.lr_per_scale:
            raise UsageError("e2e options relative and lr_per_scale exclude each other (relative already "
                             "scales every group's step); set one")
        if self.lr_per_scale and "scales" not in self.trainable:
            raise UsageError("e2e option lr_per_scale needs scales among trainable; add it or drop lr_per_scale")
        for name in ("lr", "temperature", "chat_temp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise UsageError(f"e2e option {name} must be a number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if not self.lr > 0:
            raise UsageError(f"e2e lr must be > 0, got {self.lr}")
        if self.chat_temp < 0:
            raise UsageError(f"e2e chat_temp must be >= 0, got {self.chat_temp}")
        if not self.temperature > 0:
            raise UsageError(f"e2e temperature must be > 0, got {self.temperature}")
        if self.samples < self.batch:
            raise UsageError(f"e2e needs samples >= batch (got samples={self.samples}, batch={self.batch})")
        if ":eval" in str(self.data).lower():
            raise UsageError(f"e2e data {self.data!r} is an evaluation split; calibrate on a :calib set")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"e2e schedule {self.schedule!r} is unknown; use {' or '.join(SCHEDULES)}")
        if self.version > E2E_VERSION:
            raise UsageError(f"e2e options have version {self.version}, newer than this mlx-dupq ({E2E_VERSION}); upgrade")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["trainable"] = list(self.trainable)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "E2ESpec":
        check_fields(cls, d, "e2e option(s)")
        return cls(**d)

    @classmethod
    def from_recipe(cls, recipe: dict) -> "E2ESpec | None":
        """The ``[refine.e2e]`` table of a recipe dict (None when the recipe has none)."""
        table = (recipe.get("refine") or {}).get("e2e")
        if table is None:
            return None
        if not isinstance(table, dict):
            raise UsageError(f"recipe [refine.e2e] must be a table of options, got {table!r}")
        return cls.from_dict(table)

    def chat_valid(self) -> int:
        """Validation windows of chat data (0 without chat data)."""
        return max(1, round(self.valid_samples * self.chat_samples / self.samples)) if self.chat_samples else 0

    def replace(self, **kw) -> "E2ESpec":
        """A copy with the given (non-None) options changed, validated again."""
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})
