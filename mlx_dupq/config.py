"""Recipes: which module gets which quantization, and which features run (docs/architecture.md).

A :class:`Recipe` *decides* (which module gets which :class:`~mlx_dupq.specs.QuantSpec`); layers and
quantizers *convert and run*. Every config object round-trips through a plain dict
(``to_dict`` / ``from_dict``) so that a pack's ``config.json`` records every choice.

The option dataclasses themselves live one layer down, in :mod:`mlx_dupq.specs` (quantization,
rotation, quantizer, activations), :mod:`mlx_dupq.dup.specs` (duplication) and
:mod:`mlx_dupq.moe.spec` (MoE); their names are re-exported here for existing imports. This module
imports no feature: a feature reads its recipe section in :mod:`mlx_dupq.features`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dup.specs import DupPlan
from .errors import DupqError, UsageError
from .moe.spec import MoESpec
from .refine.spec import RefineSpec
from .specs import (  # noqa: F401  (re-exported: the option types were defined here before)
    ACT_BITS,
    ACT_CLIPS,
    ACT_MODES,
    ActSpec,
    CALIBRATED_METHODS,
    EMBED_PATTERN,
    LM_HEAD_PATTERN,
    MASSIVE_RULE,
    MLX_BITS,
    MLX_GROUPS,
    QUANT_METHODS,
    QuantSpec,
    QuantizerSpec,
    ROTATION_KINDS,
    ROUTER_PATTERN,
    RotationSpec,
    Rule,
    STORAGE_DTYPES,
    SUPPORTED_BITS,
    SUPPORTED_GROUPS,
    TERNARY,
    check_fields,
    parse_bits,
    parse_group_size,
)

RECIPE_VERSION = 1
# package data: the product recipes, then the study variants, then recipes written by a command
# (`allocate`, `search-dup`) for one model; every one loads by name
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
RECIPE_DIRS = (RECIPES_DIR, RECIPES_DIR / "studies", RECIPES_DIR / "generated")


@dataclass(frozen=True)
class Recipe:
    """A named, versioned set of per-module quantization decisions.

    Resolution order for a module path: explicit ``rules`` (first match wins), then the
    router / embedding / lm_head roles, then ``default``.
    """

    name: str = "rtn"
    description: str = ""
    version: int = RECIPE_VERSION
    default: QuantSpec = field(default_factory=QuantSpec)
    embed: QuantSpec | None = field(default_factory=lambda: QuantSpec(bits=8, group_size=64))
    lm_head: QuantSpec | None = field(default_factory=lambda: QuantSpec(bits=8, group_size=64))
    rules: tuple[Rule, ...] = ()
    router_full_precision: bool = True
    dtype: str = "float16"  # storage dtype of scales and unquantized tensors
    rotation: RotationSpec | None = None  # fold a rotation into the weights before quantizing
    quantizer: QuantizerSpec = field(default_factory=QuantizerSpec)
    activations: ActSpec | None = None  # fake-quantize linear inputs at run time (docs/quality.md, F3)
    duplication: DupPlan | None = None  # parallel / residual copies of decoder layers' linears (docs/duplication.md, F5)
    moe: MoESpec | None = None  # expert-wise mixed precision of MoE switch layers (docs/moe.md, F6.4)
    refine: RefineSpec | None = None  # training stages: [refine.block] per layer, [refine.e2e] after (docs/learned.md)

    def __post_init__(self):
        if self.dtype not in STORAGE_DTYPES:
            raise UsageError(f"storage dtype {self.dtype!r} is not supported; use one of {', '.join(STORAGE_DTYPES)}")
        if self.version > RECIPE_VERSION:
            raise DupqError(
                f"recipe {self.name!r} has version {self.version}, newer than this mlx-dupq "
                f"understands ({RECIPE_VERSION}); upgrade mlx-dupq"
            )
        object.__setattr__(self, "rules", tuple(self.rules))
        if isinstance(self.rotation, dict):
            object.__setattr__(self, "rotation", RotationSpec.from_dict(self.rotation))
        if isinstance(self.quantizer, dict):
            object.__setattr__(self, "quantizer", QuantizerSpec.from_dict(self.quantizer))
        if isinstance(self.activations, dict):
            object.__setattr__(self, "activations", ActSpec.from_dict(self.activations))
        if self.duplication is not None:
            if isinstance(self.duplication, dict):
                object.__setattr__(self, "duplication", DupPlan.from_dict(self.duplication))
            if not isinstance(self.duplication, DupPlan):
                raise DupqError(f"recipe duplication {self.duplication!r} is not a DupPlan or a dict")
        if isinstance(self.refine, dict):
            object.__setattr__(self, "refine", RefineSpec.from_dict(self.refine))
        if self.moe is not None:
            if isinstance(self.moe, dict):
                object.__setattr__(self, "moe", MoESpec.from_dict(self.moe))
            if not isinstance(self.moe, MoESpec):
                raise DupqError(f"recipe moe {self.moe!r} is not a MoESpec or a dict")

    def spec_for(self, path: str) -> QuantSpec | None:
        """The spec for the module at ``path`` (None = keep full precision)."""
        for rule in self.rules:
            if rule.matches(path):
                return rule.spec
        if self.router_full_precision and re.search(ROUTER_PATTERN, path):
            return None
        if re.search(EMBED_PATTERN, path):
            return self.embed
        if re.search(LM_HEAD_PATTERN, path):
            return self.lm_head
        return self.default

    def with_overrides(self, **kw: Any) -> "Recipe":
        """A copy with ``default`` fields (bits, group_size, symmetric) or recipe fields replaced."""
        spec_kw = {k: kw.pop(k) for k in ("bits", "group_size", "symmetric") if kw.get(k) is not None}
        kw = {k: v for k, v in kw.items() if v is not None}
        out = self
        if spec_kw:
            out = dataclasses.replace(out, default=dataclasses.replace(out.default, **spec_kw))
        if kw:
            out = dataclasses.replace(out, **kw)
        return out

    def to_dict(self) -> dict:
        d = {
            "name": self.name,
            "description": self.description,
            "version": self.version,
            "default": self.default.to_dict(),
            "embed": None if self.embed is None else self.embed.to_dict(),
            "lm_head": None if self.lm_head is None else self.lm_head.to_dict(),
            "rules": [r.to_dict() for r in self.rules],
            "router_full_precision": self.router_full_precision,
            "dtype": self.dtype,
            "rotation": None if self.rotation is None else self.rotation.to_dict(),
            "quantizer": self.quantizer.to_dict(),
        }
        if self.activations is not None:  # omitted when unset: recipes without it keep their old dict
            d["activations"] = self.activations.to_dict()
        if self.duplication is not None:  # likewise
            d["duplication"] = self.duplication.to_dict()
        if self.moe is not None:  # likewise
            d["moe"] = self.moe.to_dict()
        if self.refine is not None:  # likewise
            d["refine"] = self.refine.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        d = dict(d)
        check_fields(cls, d, "recipe field(s)")

        def spec(v):
            if v is None or v is False or (isinstance(v, dict) and v.get("keep")):
                return None
            return QuantSpec.from_dict(v)

        for key in ("embed", "lm_head"):
            if key in d:
                d[key] = spec(d[key])
        if "default" in d:
            d["default"] = QuantSpec.from_dict(d["default"])
        if "rules" in d:
            d["rules"] = tuple(Rule.from_dict(r) for r in d["rules"])
        if d.get("rotation") is not None:
            d["rotation"] = RotationSpec.from_dict(d["rotation"])
        if d.get("quantizer") is not None:
            d["quantizer"] = QuantizerSpec.from_dict(d["quantizer"])
        else:
            d.pop("quantizer", None)
        if d.get("activations") is not None:
            d["activations"] = ActSpec.from_dict(d["activations"])
        return cls(**d)


def list_recipes(kind: str = "all") -> list[str]:
    """Names of the shipped recipes: ``"product"`` (mlx_dupq/recipes/), ``"studies"``, ``"generated"`` or all."""
    dirs = {"product": RECIPE_DIRS[:1], "studies": RECIPE_DIRS[1:2], "generated": RECIPE_DIRS[2:]}.get(kind, RECIPE_DIRS)
    return sorted(p.stem for d in dirs for p in d.glob("*.toml"))


def recipe_path(name: str) -> Path | None:
    """The shipped file of recipe ``name`` (product, then studies, then generated), or None."""
    return next((d / f"{name}.toml" for d in RECIPE_DIRS if (d / f"{name}.toml").is_file()), None)


def load_recipe(name_or_path: str | Path | None) -> Recipe:
    """A recipe from a shipped name (see ``mlx-dupq recipes list --all``), a TOML/JSON file, or the default.

    Every error here (no such recipe, a file that does not parse, a bad value in it) is a
    :class:`UsageError`: the CLI prints one line and exits 2."""
    if name_or_path is None:
        return Recipe()
    p = Path(name_or_path)
    if not p.is_file():
        p = recipe_path(str(name_or_path)) or p
    if not p.is_file():
        shipped = ", ".join(list_recipes("product")) or "none"
        raise UsageError(f"recipe {str(name_or_path)!r} not found (recipes: {shipped}; "
                         "`mlx-dupq recipes list --all` shows the studies too; or pass a .toml file)")
    try:
        if p.suffix == ".json":
            data = json.loads(p.read_text())
        else:
            data = tomllib.loads(p.read_text())
    except (ValueError, OSError) as e:
        raise UsageError(f"recipe file {p} could not be read ({e}); fix its syntax") from None
    data.setdefault("name", p.stem)
    try:
        return Recipe.from_dict(data)
    except DupqError as e:  # a bad value in the user's recipe: a usage error (exit 2), as a bad flag is
        raise UsageError(str(e)) from None
