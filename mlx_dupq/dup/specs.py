"""What a duplicated layer is made of: :class:`CopySpec` (one copy) and :class:`DupPlan` (the model).

Both are frozen, validated on construction and round-trip through plain dicts (``to_dict`` /
``from_dict``), so a pack's ``config.json`` can record every copy's parameters.

Copy counts are *total* copies: a layer listed with one CopySpec runs once (it is quantized
with that copy's parameters, not duplicated); with two it runs twice; a layer not in the plan
runs once with the base spec. Plans name decoder layers by index only, so the embedding and
lm_head can never be duplicated (docs/duplication.md, F5.6).

Shared codes (``CopySpec.shared_codes``): the copy reuses the packed codes of the plan's first
copy of that weight (copy 0, which must own its codes) and stores only its own scales/biases.
Its scale multiplier and grid offset then change the dequantisation parameters, not the codes:
``w_k = s_k * q_0 + b_k``. When does such a copy collapse into one layer?

- parallel aggregation of a linear with per-copy (or per-output-channel) weights ``a_k``:
  ``sum_k a_k x (s_k q + b_k)^T = x (S q + B)^T`` with ``S = sum_k a_k s_k``, ``B = sum_k a_k b_k``
  -- always ONE layer with combined scales/biases (:func:`mlx_dupq.dup.copies.collapse_shared`),
  unless the copies quantize their *inputs* differently (activation clip/bits), which is not
  linear in ``x``. In particular a scale multiplier on shared codes is just another scale.
- identical dequantisation parameters (multiplier 1, offset 0, same activation settings): the
  copies are the same function; parallel mean equals one copy.
- serial copies of a decoder layer and residual copies never collapse: the decoder layer is
  non-linear, and residual copies need their own codes (copy k quantizes ``W - sum_{j<k} W_j``),
  so ``shared_codes`` is rejected in residual mode.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..specs import ACT_BITS, QuantSpec
from ..errors import DupqError

MODES = ("serial", "parallel", "residual")
AGGREGATIONS = ("mean", "variance_weighted", "learned", "selective")
DUP_PLAN_VERSION = 1


def check_fields(cls, d: dict, what: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise DupqError(f"unknown {what} option(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")


def _number(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise DupqError(f"copy {name} {value!r} is out of range; use a number in [{lo:g}, {hi:g}]")
    return float(value)


def _seed(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise DupqError(f"copy {name} {value!r} is not an integer (or null)")
    return value


@dataclass(frozen=True)
class CopySpec:
    """One copy of a quantized weight / decoder layer and how it differs from the others (F5.4).

    quant:           QuantSpec override (bits, group size, symmetric); None = the base spec
    rotation:        rotation dict as :func:`mlx_dupq.rotation.make_rotation` takes (e.g.
                     ``{"kind": "perturbed", "seed": 1, "eps": 0.05}``); the weight is stored as
                     ``Q(W R)`` and the input is rotated at run time; None = no rotation
    scale_mult:      the RTN grid is scaled by this about its centre (``s <- m s``), e.g. 1.05 / 0.95
    grid_offset:     levels shifted by this fraction of a step (0 / 0.25 / 0.5; asymmetric only)
    stochastic_seed: seeded stochastic rounding instead of nearest; None = nearest
    noise:           uniform noise of at most ``noise`` steps added before rounding (0..0.5)
    noise_seed:      seed of that noise
    act_clip:        activation clip ratio of this copy's linear inputs (e.g. 0.9); None = none
    act_bits:        activation bits of this copy's linear inputs (e.g. 8 / 6 / 10); None = float.
                     Applied through :class:`mlx_dupq.layers.act_quant.ActQuantInput` (dynamic,
                     per-token) when set; ``act_clip`` alone means 8-bit with that clip.
    shared_codes:    reuse copy 0's packed codes, store only own scales/biases (see module doc)
    quantile:        quantile scales: each group's range is its [1-q, q] quantiles instead of its
                     min / max (q in [0.8, 1]; 1 = min/max), values outside clip to the end levels
    """

    quant: QuantSpec | None = None
    rotation: dict | None = None
    scale_mult: float = 1.0
    grid_offset: float = 0.0
    stochastic_seed: int | None = None
    noise: float = 0.0
    noise_seed: int = 0
    act_clip: float | None = None
    act_bits: int | None = None
    shared_codes: bool = False
    quantile: float = 1.0

    def __post_init__(self):
        if self.quant is not None and not isinstance(self.quant, QuantSpec):
            raise DupqError(f"copy quant {self.quant!r} is not a QuantSpec (use QuantSpec.from_dict)")
        if self.rotation is not None:
            if not isinstance(self.rotation, dict) or "kind" not in self.rotation:
                raise DupqError(f"copy rotation {self.rotation!r} must be a dict with a 'kind' (or null)")
            object.__setattr__(self, "rotation", dict(self.rotation))
        object.__setattr__(self, "scale_mult", _number("scale_mult", self.scale_mult, 0.5, 2.0))
        object.__setattr__(self, "grid_offset", _number("grid_offset", self.grid_offset, 0.0, 0.5))
        object.__setattr__(self, "noise", _number("noise", self.noise, 0.0, 0.5))
        object.__setattr__(self, "stochastic_seed", _seed("stochastic_seed", self.stochastic_seed))
        object.__setattr__(self, "noise_seed", _seed("noise_seed", self.noise_seed) or 0)
        if self.act_clip is not None:
            object.__setattr__(self, "act_clip", _number("act_clip", self.act_clip, 0.01, 1.0))
        if self.act_bits is not None and (isinstance(self.act_bits, bool) or self.act_bits not in ACT_BITS):
            raise DupqError(f"copy act_bits {self.act_bits!r} is not supported; use one of {', '.join(map(str, ACT_BITS))}")
        object.__setattr__(self, "shared_codes", bool(self.shared_codes))
        object.__setattr__(self, "quantile", _number("quantile", self.quantile, 0.8, 1.0))
        if self.shared_codes:
            if self.stochastic_seed is not None or self.noise > 0:
                raise DupqError("a shared-codes copy reuses copy 0's codes, so stochastic rounding / noise "
                                "cannot apply to it; drop them or set shared_codes = false")

    @property
    def act_quantized(self) -> bool:
        return self.act_bits is not None or self.act_clip is not None

    def spec(self, base: QuantSpec) -> QuantSpec:
        """The QuantSpec this copy uses given the base one."""
        return self.quant or base

    def dequant_key(self) -> tuple:
        """What distinguishes a shared-codes copy's function: equal keys = identical copies."""
        return (self.scale_mult, self.grid_offset, self.act_bits, self.act_clip, self.quantile)

    def label(self) -> str:
        parts = []
        if self.quant is not None:
            parts.append(self.quant.label())
        if self.rotation is not None:
            parts.append(self.rotation["kind"] + (f"{self.rotation.get('eps')}" if "eps" in self.rotation else ""))
        if self.scale_mult != 1.0:
            parts.append(f"x{self.scale_mult:g}")
        if self.grid_offset:
            parts.append(f"off{self.grid_offset:g}")
        if self.stochastic_seed is not None:
            parts.append(f"sr{self.stochastic_seed}")
        if self.noise:
            parts.append(f"noise{self.noise:g}")
        if self.act_quantized:
            parts.append(f"a{self.act_bits or 8}c{self.act_clip or 1:g}")
        if self.quantile != 1.0:
            parts.append(f"q{self.quantile:g}")
        if self.shared_codes:
            parts.append("shared")
        return "+".join(parts) or "rtn"

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["quant"] = None if self.quant is None else self.quant.to_dict()
        if self.quantile == 1.0:
            del d["quantile"]  # the default: dicts (and the packs / results that hold them) stay as before
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CopySpec":
        check_fields(cls, d, "copy")
        d = dict(d)
        if d.get("quant") is not None:
            d["quant"] = QuantSpec.from_dict(d["quant"])
        return cls(**d)


def _copies_tuple(k: Any, copies: Any) -> tuple[int, tuple[CopySpec, ...]]:
    if isinstance(k, str) and k.isdigit():
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise DupqError(f"duplication plan layer {k!r} is not a decoder layer index (0, 1, ...)")
    if isinstance(copies, int) and not isinstance(copies, bool):
        copies = [CopySpec()] * copies
    copies = tuple(c if isinstance(c, CopySpec) else CopySpec.from_dict(c) for c in copies)
    if not copies:
        raise DupqError(f"duplication plan layer {k} has no copies; give at least one or leave the layer out")
    return k, copies


@dataclass(frozen=True)
class DupPlan:
    """Which decoder layers run as several copies, and how the copies combine (F5.1, F5.3).

    mode:        serial (x -> copy 1 -> copy 2 ..., each a whole decoder layer with its own KV
                 cache slot) | parallel (every linear of the layer runs all copies on the same
                 input, outputs aggregated) | residual (copy k quantizes W - sum of the previous
                 dequantized copies; outputs add)
    aggregation: for parallel: mean | variance_weighted | learned | selective
    copies:      {layer index: (CopySpec, ...)}; an int n in the constructor means n default copies
    early_stop:  dynamic duplication (parallel / residual): stop running copies once the output
                 changes by less than this relative amount; None = always run every copy
    max_copies:  compute budget: at most this many copies per call (None = all)
    last_n:      also duplicate the last ``last_n`` decoder layers, ``n_copies`` default copies each
    last_fraction: the same for the last share of the layers (``round(f * n_layers)``, at least 1),
                 for recipes that cannot know the layer count. Both are expanded by
                 :meth:`resolve` once the model is known (the converter does it); layers listed
                 in ``copies`` keep their explicit copies.
    n_copies:    total copies of each ``last_n`` / ``last_fraction`` layer
    """

    mode: str = "parallel"
    aggregation: str = "mean"
    copies: dict = field(default_factory=dict)
    early_stop: float | None = None
    max_copies: int | None = None
    last_n: int | None = None
    last_fraction: float | None = None
    n_copies: int = 2

    def __post_init__(self):
        if self.mode not in MODES:
            raise DupqError(f"unknown duplication mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.aggregation not in AGGREGATIONS:
            raise DupqError(f"unknown aggregation {self.aggregation!r}; use one of {', '.join(AGGREGATIONS)}")
        copies = dict(sorted(_copies_tuple(k, v) for k, v in dict(self.copies).items()))
        for k, cs in copies.items():
            if cs[0].shared_codes:
                raise DupqError(f"layer {k}: the first copy must own its codes (shared_codes = false)")
            if self.mode == "residual" and any(c.shared_codes for c in cs):
                raise DupqError(f"layer {k}: residual copies quantize the previous copies' error and need "
                                "their own codes; set shared_codes = false or use mode parallel")
        object.__setattr__(self, "copies", copies)
        if self.early_stop is not None:
            object.__setattr__(self, "early_stop", _number("early_stop", self.early_stop, 0.0, 1.0))
            if self.mode == "serial":
                raise DupqError("early stop applies to parallel or residual copies; serial copies always run")
        if self.max_copies is not None and (isinstance(self.max_copies, bool) or not isinstance(self.max_copies, int)
                                            or self.max_copies < 1):
            raise DupqError(f"max_copies {self.max_copies!r} is not a positive integer (or null)")
        if self.last_n is not None and (isinstance(self.last_n, bool) or not isinstance(self.last_n, int)
                                        or self.last_n < 1):
            raise DupqError(f"last_n {self.last_n!r} is not a positive number of layers (or null)")
        if self.last_fraction is not None:
            object.__setattr__(self, "last_fraction", _number("last_fraction", self.last_fraction, 1e-9, 1.0))
        if self.last_n is not None and self.last_fraction is not None:
            raise DupqError("give last_n or last_fraction, not both")
        if isinstance(self.n_copies, bool) or not isinstance(self.n_copies, int) or not 1 <= self.n_copies <= 8:
            raise DupqError(f"n_copies {self.n_copies!r} is out of range; use 1..8 total copies per layer")

    @property
    def resolved(self) -> bool:
        """True when the plan names its layers explicitly (no ``last_n`` / ``last_fraction`` left)."""
        return self.last_n is None and self.last_fraction is None

    def resolve(self, n_layers: int) -> "DupPlan":
        """This plan for a model of ``n_layers`` decoder layers: ``last_n`` / ``last_fraction`` expanded
        into explicit ``copies`` (explicit entries win), then :meth:`check` ed. Default copies are
        identical for residual plans and differ by scale multiplier (1.0, 1.05, 0.95, ...) for
        parallel ones."""
        if self.resolved:
            return self.check(n_layers)
        n = self.last_n if self.last_n is not None else max(1, round(self.last_fraction * n_layers))
        if n > n_layers:
            raise DupqError(f"last_n = {n} but the model has {n_layers} decoder layers; use at most {n_layers}")
        if self.mode == "parallel":  # identical parallel copies would be one layer: differ by scale
            default = diversify(self.n_copies, "scale")
        else:  # residual copies differ by construction; serial copies repeat the layer
            default = [CopySpec()] * self.n_copies
        copies = {k: list(default) for k in range(n_layers - n, n_layers)}
        copies.update(self.copies)
        return dataclasses.replace(self, copies=copies, last_n=None, last_fraction=None).check(n_layers)

    @property
    def layers(self) -> list[int]:
        """Layers with more than one copy (the duplicated ones)."""
        return [k for k, cs in self.copies.items() if len(cs) > 1]

    def count(self, k: int) -> int:
        """Copies layer ``k`` runs (1 when not in the plan)."""
        return len(self.copies.get(k, (None,)))

    def check(self, n_layers: int) -> "DupPlan":
        """DupqError unless every planned layer exists in a model of ``n_layers`` decoder layers."""
        bad = [k for k in self.copies if k >= n_layers]
        if bad:
            raise DupqError(f"duplication plan names layer(s) {bad} but the model has {n_layers} decoder layers "
                            f"(0..{n_layers - 1}); the embedding and lm_head cannot be duplicated")
        return self

    def to_dict(self) -> dict:
        d = {
            "version": DUP_PLAN_VERSION,
            "mode": self.mode,
            "aggregation": self.aggregation,
            "copies": {str(k): [c.to_dict() for c in cs] for k, cs in self.copies.items()},
            "early_stop": self.early_stop,
            "max_copies": self.max_copies,
        }
        if not self.resolved:  # omitted when unset: explicit plans keep their old dict
            d.update(last_n=self.last_n, last_fraction=self.last_fraction, n_copies=self.n_copies)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DupPlan":
        d = dict(d)
        version = d.pop("version", DUP_PLAN_VERSION)
        if version != DUP_PLAN_VERSION:
            raise DupqError(f"duplication plan version {version} is not supported (expected {DUP_PLAN_VERSION}); "
                            "re-convert with this mlx-dupq")
        check_fields(cls, d, "duplication plan")
        return cls(**d)


GRID_OFFSETS = (0.0, 0.25, 0.5)
DIVERSITY = ("scale", "offset", "rotation", "stochastic", "same")


def diversify(n: int, by: str = "scale", eps: float = 0.05, seed: int = 0) -> list[CopySpec]:
    """n differentiated copies: ``scale`` (multipliers 1.0/1.05/0.95/1.10/0.90...), ``offset``
    (grid offsets 0/0.25/0.5, cycled), ``rotation`` (perturbed H.P, a new seed per copy),
    ``stochastic`` (copy 0 nearest, the rest stochastic with seeds), ``same`` (identical copies)."""
    if n < 1:
        raise DupqError(f"a layer needs at least one copy, got {n}")
    if by == "scale":
        mults = [1.0]
        i = 1
        while len(mults) < n:
            mults += [1.0 + 0.05 * i, 1.0 - 0.05 * i]
            i += 1
        return [CopySpec(scale_mult=round(m, 4)) for m in mults[:n]]
    if by == "offset":
        return [CopySpec(grid_offset=GRID_OFFSETS[i % 3]) for i in range(n)]
    if by == "rotation":
        return [CopySpec(rotation={"kind": "perturbed", "seed": seed, "eps": eps if i else 0.0}) for i in range(n)]
    if by == "stochastic":
        return [CopySpec(stochastic_seed=None if i == 0 else seed + i) for i in range(n)]
    if by == "same":
        return [CopySpec()] * n
    raise DupqError(f"unknown copy diversity {by!r}; use one of {', '.join(DIVERSITY)}")
