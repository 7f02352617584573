"""Quantization options: frozen, validated dataclasses that round-trip through dicts.

The bottom of the options layer (docs/architecture.md): :class:`QuantSpec` (one tensor's format),
:class:`Rule`, :class:`RotationSpec`, :class:`QuantizerSpec`, :class:`ActSpec` and the module-name
patterns. The :class:`~mlx_dupq.config.Recipe` that combines them lives in :mod:`mlx_dupq.config`.

Conventions
-----------
- ``bits``: 1 (binary, sign x scale when symmetric), 1.58 (ternary {-1, 0, +1} x scale),
  2, 3, 4, 5, 6, 8.
- ``group_size``: 32, 64, 128, 256 or 512 weights share a scale (and zero point);
  ``0`` means per output channel (one group per row), ``-1`` per tensor.
- ``symmetric``: levels are centred on zero, ``w = s * (q - (L-1)/2)`` with ``L`` levels, so only
  the scale is free; asymmetric (affine) has a free offset ``w = s * q + b``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import DupqError, UsageError

TERNARY = 1.58
SUPPORTED_BITS = (1, TERNARY, 2, 3, 4, 5, 6, 8)
SUPPORTED_GROUPS = (32, 64, 128, 256, 512, 0, -1)
# group sizes mlx's own affine format (mx.quantize / nn.QuantizedLinear) can express
MLX_GROUPS = (32, 64, 128)
MLX_BITS = (1, 2, 3, 4, 5, 6, 8)
STORAGE_DTYPES = ("float16", "bfloat16", "float32")


def parse_bits(value: Any) -> float:
    """Normalise a bit width (``"1.58"``, ``"ternary"``, ``2``) to an element of SUPPORTED_BITS."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("ternary", "t", "1.58", "1.6"):
            return TERNARY
        try:
            value = float(v)
        except ValueError:
            raise UsageError(
                f"bit width {value!r} is not a number; use one of 1, 1.58 (ternary), 2, 3, 4, 5, 6, 8"
            ) from None
    value = float(value)
    if abs(value - TERNARY) < 0.05:
        return TERNARY
    if value.is_integer() and int(value) in SUPPORTED_BITS:
        return int(value)
    raise UsageError(
        f"bit width {value:g} is not supported; use one of 1, 1.58 (ternary), 2, 3, 4, 5, 6, 8"
    )


def parse_group_size(value: Any) -> int:
    """Normalise a group size; accepts ints and the words ``channel`` / ``tensor``."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("channel", "per-channel", "row"):
            return 0
        if v in ("tensor", "per-tensor"):
            return -1
        try:
            value = int(v)
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, int) or value not in SUPPORTED_GROUPS:
        raise UsageError(
            f"group size {value!r} is not supported; use 32, 64, 128, 256, 512, "
            "0 (per channel) or -1 (per tensor)"
        )
    return value


def check_fields(cls, d: dict, what: str) -> None:
    """Refuse keys that are not fields of dataclass ``cls`` (one line naming the known ones)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise UsageError(f"unknown {what} {sorted(unknown)}; known: {', '.join(sorted(known))}")


@dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix is quantized (round-to-nearest unless a recipe says more)."""

    bits: float = 2
    group_size: int = 64
    symmetric: bool = False

    def __post_init__(self):
        object.__setattr__(self, "bits", parse_bits(self.bits))
        object.__setattr__(self, "group_size", parse_group_size(self.group_size))
        object.__setattr__(self, "symmetric", bool(self.symmetric))

    @property
    def ternary(self) -> bool:
        return self.bits == TERNARY

    @property
    def levels(self) -> int:
        """Number of quantization levels (3 for ternary)."""
        return 3 if self.ternary else 2 ** int(self.bits)

    @property
    def mlx_native(self) -> bool:
        """True when mlx's own affine format stores this exactly (nn.QuantizedLinear)."""
        return (not self.ternary) and self.bits in MLX_BITS and self.group_size in MLX_GROUPS

    def group_for(self, in_features: int) -> int:
        """Actual number of weights per group for a row of ``in_features`` weights."""
        if self.group_size in (0, -1):
            return in_features
        return self.group_size

    def fit(self, in_features: int) -> "QuantSpec":
        """The spec adjusted so that groups tile a row of ``in_features`` weights.

        A group size that does not divide the row falls back to the largest supported
        smaller one that does (e.g. 128 -> 64 for SmolLM2's 576-wide rows). The caller
        records the adjusted spec, so the fallback is visible in the pack.
        """
        if self.group_size in (0, -1) or in_features % self.group_size == 0:
            return self
        for g in (512, 256, 128, 64, 32):
            if g < self.group_size and in_features % g == 0:
                return dataclasses.replace(self, group_size=g)
        return dataclasses.replace(self, group_size=0)

    def label(self) -> str:
        b = "t" if self.ternary else f"{int(self.bits)}"
        g = {0: "ch", -1: "tensor"}.get(self.group_size, str(self.group_size))
        return f"w{b}g{g}{'s' if self.symmetric else ''}"

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise DupqError(f"unknown quantization option(s) {sorted(unknown)}; known: bits, group_size, symmetric")
        return cls(**d)


@dataclass(frozen=True)
class Rule:
    """``pattern`` (a regular expression searched in the module path) -> spec, or full precision."""

    pattern: str
    spec: QuantSpec | None  # None keeps the module in full precision

    def matches(self, path: str) -> bool:
        return re.search(self.pattern, path) is not None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"pattern": self.pattern}
        d.update({"keep": True} if self.spec is None else self.spec.to_dict())
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Rule":
        d = dict(d)
        if "pattern" not in d:
            raise DupqError(f"recipe rule {d} has no 'pattern'")
        pattern = d.pop("pattern")
        try:
            re.compile(pattern)
        except re.error as e:
            raise DupqError(f"recipe rule pattern {pattern!r} is not a valid regular expression ({e})") from None
        if d.pop("keep", False):
            return cls(pattern, None)
        return cls(pattern, QuantSpec.from_dict(d))


ROTATION_KINDS = ("block_hadamard", "hadamard", "randomized_hadamard", "random_orthogonal", "perturbed", "identity")


@dataclass(frozen=True)
class RotationSpec:
    """QuaRot-style rotation folded into the weights before quantizing (docs/quality.md, F4).

    kind:        residual-stream rotation (see :mod:`mlx_dupq.rotation.rotations`)
    seed:        random signs / Gaussian draws
    eps:         perturbation strength of kind ``perturbed`` (0..0.5)
    block:       Hadamard block size of kind ``block_hadamard`` (None: the largest that fits)
    head:        head-wise Hadamard on v_proj outputs / o_proj inputs (folded offline)
    online_down: Hadamard on down_proj's input, applied at run time (recorded in config.json)
    layers:      partial rotation: only these decoder layers, each through run-time rotations of
                 its linears' inputs (the residual stream stays unrotated); None = the whole model
    """

    kind: str = "block_hadamard"
    seed: int = 0
    eps: float = 0.05
    block: int | None = None
    head: bool = False
    online_down: bool = False
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.kind not in ROTATION_KINDS:
            raise DupqError(f"unknown rotation kind {self.kind!r}; use one of {', '.join(ROTATION_KINDS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise DupqError(f"rotation seed {self.seed!r} is not an integer")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0.0 <= self.eps <= 0.5:
            raise DupqError(f"rotation eps {self.eps!r} is out of range; use a number in [0.01, 0.5]")
        object.__setattr__(self, "eps", float(self.eps))
        if self.block is not None:
            if self.kind != "block_hadamard":
                raise DupqError(f"rotation block applies only to kind block_hadamard, not {self.kind}; drop 'block'")
            if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
                raise DupqError(f"rotation block {self.block!r} is not a positive integer (e.g. 64, 128, 256)")
        object.__setattr__(self, "head", bool(self.head))
        object.__setattr__(self, "online_down", bool(self.online_down))
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise DupqError(
                    f"rotation layers {list(layers)} must be a non-empty list of layer indices (0, 1, ...); "
                    "omit it to rotate the whole model"
                )
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))

    def residual(self) -> dict:
        """The residual rotation as the dict :func:`mlx_dupq.rotation.make_rotation` takes."""
        d: dict[str, Any] = {"kind": self.kind, "seed": self.seed}
        if self.kind == "perturbed":
            d["eps"] = self.eps
        if self.block is not None:
            d["block"] = self.block
        return d

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "seed": self.seed,
            "eps": self.eps,
            "block": self.block,
            "head": self.head,
            "online_down": self.online_down,
            "layers": None if self.layers is None else list(self.layers),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "RotationSpec":
        check_fields(cls, d, "rotation option(s)")
        return cls(**d)


QUANT_METHODS = ("rtn", "mse", "awq", "gptq")
CALIBRATED_METHODS = ("awq", "gptq")


@dataclass(frozen=True)
class QuantizerSpec:
    """How weights are rounded (docs/quality.md, F2.2-F2.3) and, when needed, the calibration behind it.

    method:         rtn (round to nearest, range init) | mse (per-group scale/clip search on the
                    weight error) | awq (scale search weighted by E[x^2] of the layer's inputs) |
                    gptq (Hessian error compensation, Frantar et al.)
    damp, act_order, block_size:  GPTQ options
    cd_sweeps:      GPTQ only: coordinate-descent sweeps over the codes after the GPTQ pass, on the
                    same grid and objective (QuantEase / CDQuant; mlx_dupq/quant/gptq.py); 0 = plain GPTQ
    calib_data:     text for awq/gptq (``brown:calib`` is disjoint from every ``:eval`` split)
    calib_samples, calib_seq_len, seed: random calibration windows
    calib_head:     also calibrate a separate ``lm_head``: its group is quantized last, with the
                    Hessian of the final normed hidden states of the already-quantized model (a
                    tied embedding keeps ``mse``). Otherwise embedding and lm_head use ``mse`` when
                    the method is calibrated (their inputs are tokens / the final state).
    """

    method: str = "rtn"
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    calib_data: str = "brown:calib"
    calib_samples: int = 32
    calib_seq_len: int = 512
    seed: int = 0
    calib_head: bool = False
    cd_sweeps: int = 0

    def __post_init__(self):
        if self.method not in QUANT_METHODS:
            raise DupqError(f"unknown quantizer method {self.method!r}; use one of {', '.join(QUANT_METHODS)}")
        if not 0 <= float(self.damp) < 1:
            raise DupqError(f"GPTQ damp {self.damp!r} is out of range; use a value in [0, 1), e.g. 0.01")
        for name in ("block_size", "calib_samples", "calib_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DupqError(f"quantizer {name} {v!r} must be a positive integer")
        if not isinstance(self.calib_head, bool):
            raise DupqError(f"quantizer calib_head {self.calib_head!r} must be true or false")
        if isinstance(self.cd_sweeps, bool) or not isinstance(self.cd_sweeps, int) or self.cd_sweeps < 0:
            raise DupqError(f"quantizer cd_sweeps {self.cd_sweeps!r} must be an integer >= 0 (0 = plain GPTQ)")

    @property
    def calibrated(self) -> bool:
        return self.method in CALIBRATED_METHODS

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantizerSpec":
        check_fields(cls, d, "quantizer option(s)")
        return cls(**d)


ACT_BITS = (2, 3, 4, 5, 6, 8, 10, 12, 16)
ACT_MODES = ("dynamic", "static")
ACT_CLIPS = ("none", "percentile", "kl")
MASSIVE_RULE = re.compile(r"^(sigma|mean)(\d+(?:\.\d+)?)$")


@dataclass(frozen=True)
class ActSpec:
    """Simulated (fake) quantization of every linear layer's input (docs/quality.md, F3), applied at run time.

    bits:         symmetric INT-b levels, ``[-(2^(b-1)-1), 2^(b-1)-1] x scale``; 16 = passthrough
    mode:         dynamic (one scale per token, from the token itself) | static (one calibrated
                  range per linear, ``mlx_dupq.layers.act_quant.calibrate_static_ranges``)
    clip:         none (range = max |x|) | percentile (range = that percentile of |x|) |
                  kl (TensorRT histogram search; static mode only)
    percentile:   99.0 .. 99.99, for clip "percentile"
    clip_ratio:   the range is multiplied by this (0 < r <= 1)
    keep_massive: entries flagged by ``massive_rule`` stay in float; the rest is quantized
    massive_rule: ``sigma<k>`` (|x| > k x the row's std) or ``mean<k>`` (|x| > k x the row's mean |x|),
                  e.g. sigma3, mean100
    """

    bits: int = 16
    mode: str = "dynamic"
    clip: str = "none"
    percentile: float = 99.9
    clip_ratio: float = 1.0
    keep_massive: bool = False
    massive_rule: str = "sigma3"

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, float)) or self.bits not in ACT_BITS:
            raise DupqError(f"activation bits {self.bits!r} are not supported; use one of {', '.join(map(str, ACT_BITS))}")
        object.__setattr__(self, "bits", int(self.bits))
        if self.mode not in ACT_MODES:
            raise DupqError(f"activation mode {self.mode!r} is unknown; use dynamic or static")
        if self.clip not in ACT_CLIPS:
            raise DupqError(f"activation clip {self.clip!r} is unknown; use none, percentile or kl")
        if self.clip == "kl" and self.mode != "static":
            raise DupqError("activation clip 'kl' needs calibrated ranges; set mode = \"static\" or use percentile")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 99.0 <= self.percentile <= 99.99:
            raise DupqError(f"activation percentile {self.percentile!r} is out of range; use 99.0 .. 99.99")
        object.__setattr__(self, "percentile", float(self.percentile))
        if isinstance(self.clip_ratio, bool) or not isinstance(self.clip_ratio, (int, float)) \
                or not 0.0 < self.clip_ratio <= 1.0:
            raise DupqError(f"activation clip_ratio {self.clip_ratio!r} is out of range; use a number in (0, 1]")
        object.__setattr__(self, "clip_ratio", float(self.clip_ratio))
        object.__setattr__(self, "keep_massive", bool(self.keep_massive))
        if not isinstance(self.massive_rule, str) or not MASSIVE_RULE.match(self.massive_rule):
            raise DupqError(f"massive_rule {self.massive_rule!r} is unknown; use sigma<k> or mean<k>, e.g. sigma3, mean100")

    @property
    def passthrough(self) -> bool:
        return self.bits >= 16

    def massive_threshold(self) -> tuple[str, float]:
        """(``"sigma"`` | ``"mean"``, factor) of ``massive_rule``."""
        kind, k = MASSIVE_RULE.match(self.massive_rule).groups()
        return kind, float(k)

    def label(self) -> str:
        return f"a{self.bits}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ActSpec":
        check_fields(cls, d, "activation option(s)")
        return cls(**d)


ROUTER_PATTERN = r"(^|\.)(router|gate|shared_expert_gate)$"
EMBED_PATTERN = r"(^|\.)(embed_tokens|wte|tok_embeddings)$"
LM_HEAD_PATTERN = r"(^|\.)(lm_head|output)$"
