"""The ``[moe]`` table of a recipe: expert-wise mixed precision (docs/moe.md, F6.4).

```toml
[moe]
budget = 3.0          # all-in bits per weight of the whole pack (what ``convert`` reports)
low_bits = 2          # every routed expert starts here
high_bits = 4         # the highest-scoring experts are raised to this while the budget allows
shared_bits = 4       # shared experts (always active: DeepSeek ``shared_experts``, Qwen2-MoE ``shared_expert``)
score = "frequency"   # how experts are ranked: "frequency" (routing share on the calibration text)
                      # or "sensitivity" (0.5 output error + 0.3 gradient norm + 0.2 frequency, F6.2)
max_high_fraction = 1.0  # at most this share of each layer's experts is raised
dup_budget = 0.0      # residual expert copies (F6.5): extra routed-expert copies as a share of the
                      # routed experts (0.3 = +30 % routed-expert bits at low_bits); 0 = off
shared_copies = 1     # residual copies of each shared-expert linear (1 = no copy)
rotation = "none"     # expert input rotation stored in the pack: "none" | "hadamard" | "block_hadamard"
calib_data = "brown:calib"
calib_samples = 8
calib_seq_len = 256
seed = 0
```

Group size and symmetry of the experts follow the recipe's ``default`` spec.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..specs import QuantSpec, check_fields, parse_bits
from ..errors import DupqError

SCORES = ("frequency", "sensitivity")
ROTATIONS = ("none", "hadamard", "block_hadamard")
MAX_DUP_BUDGET = 2.0  # the group policy gives at most 3 copies: 2 extra per expert
MAX_COPIES = 8
SHARED_PATTERN = r"\.(shared_experts|shared_expert)\."


@dataclass(frozen=True)
class MoESpec:
    budget: float = 3.0
    low_bits: float = 2
    high_bits: float = 4
    shared_bits: float = 4
    score: str = "frequency"
    max_high_fraction: float = 1.0
    dup_budget: float = 0.0
    shared_copies: int = 1
    rotation: str = "none"
    calib_data: str = "brown:calib"
    calib_samples: int = 8
    calib_seq_len: int = 256
    seed: int = 0

    def __post_init__(self):
        for name in ("low_bits", "high_bits", "shared_bits"):
            object.__setattr__(self, name, parse_bits(getattr(self, name)))
        if float(self.high_bits) < float(self.low_bits):
            raise DupqError(f"moe high_bits {self.high_bits} is below low_bits {self.low_bits}; swap them")
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 1.0 <= self.budget <= 16:
            raise DupqError(f"moe budget {self.budget!r} is not an all-in bits-per-weight target in [1, 16], e.g. 3.0")
        object.__setattr__(self, "budget", float(self.budget))
        if self.score not in SCORES:
            raise DupqError(f"moe score {self.score!r} is unknown; use one of {', '.join(SCORES)}")
        if not 0.0 <= float(self.max_high_fraction) <= 1.0:
            raise DupqError(f"moe max_high_fraction {self.max_high_fraction!r} must be in [0, 1]")
        object.__setattr__(self, "max_high_fraction", float(self.max_high_fraction))
        self._check_copies_rotation()
        for name in ("calib_samples", "calib_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DupqError(f"moe {name} {v!r} must be a positive integer")

    def _check_copies_rotation(self) -> None:
        d = self.dup_budget
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= MAX_DUP_BUDGET:
            raise DupqError(f"moe dup_budget {d!r} must be a share of the routed-expert bits in [0, {MAX_DUP_BUDGET:g}], "
                            "e.g. 0.3 (0 = no expert copies)")
        object.__setattr__(self, "dup_budget", float(d))
        c = self.shared_copies
        if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= MAX_COPIES:
            raise DupqError(f"moe shared_copies {c!r} must be an integer in 1..{MAX_COPIES} (1 = no copy)")
        if self.rotation not in ROTATIONS:
            raise DupqError(f"moe rotation {self.rotation!r} is unknown; use one of {', '.join(ROTATIONS)}")

    @property
    def rotated(self) -> bool:
        return self.rotation != "none"

    def spec(self, bits: float, default: QuantSpec) -> QuantSpec:
        """``default`` (group size, symmetry) with ``bits``."""
        return dataclasses.replace(default, bits=bits)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MoESpec":
        check_fields(cls, d, "moe option(s)")
        return cls(**d)
