"""Bit allocation to an all-in bits-per-weight budget (docs/quality.md, F2.5): a sensitivity table in, a Recipe out.

Problem (a multiple-choice knapsack): pick one spec label ``c_p`` per module ``p`` to minimise
``sum_p delta[p][c_p]`` subject to ``fixed_bits + sum_p bits[p][c_p] <= budget * n_params``, where
``bits`` are the real packed sizes and ``fixed_bits`` every other stored tensor (norms, biases,
float-kept modules) -- so embeddings and lm_head count, and are allocated like any module.

Solvers:

- ``dp`` (default): dynamic programming over the bits spent above each module's cheapest allowed
  spec, in units of the gcd of all those extra costs (packed sizes are multiples of whole rows
  of codes, so the gcd is large: tens of kbit for SmolLM2). That is exact whenever the extra
  budget is at most ``max_states`` units; otherwise the unit grows to a multiple of the gcd and
  costs are rounded UP to it, so the result still fits the budget and is optimal for the rounded
  costs. Cost: modules x options x states array operations (well under a second for 211 modules).
- ``greedy``: marginal gain: start at the cheapest specs and repeatedly take the upgrade with the
  largest sensitivity decrease per extra bit that still fits.

The output recipe is ``base_recipe`` with one rule per module pinning its spec (an escaped exact
path regex), placed before the base recipe's own rules. Modules left out of the table (``only``
in :func:`~mlx_dupq.search.sensitivity.measure_sensitivity`) keep the base recipe's spec.

:func:`allocate_model` measures the base recipe's model: with a ``[rotation]``, the rotated one
(:func:`~mlx_dupq.search.sensitivity.rotate_float_model`); always with round to nearest (a GPTQ
base recipe is ranked by its RTN error).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np

from ..errors import DupqError
from ..config import EMBED_PATTERN, LM_HEAD_PATTERN, load_recipe, QuantSpec, Recipe, Rule
from ..eval.data import calibration_batches, load_text
from ..io.loader import tokenizer_of, load_model
from .sensitivity import measure_sensitivity, rotate_float_model, Sensitivity

SOLVERS = ("dp", "greedy")
DP_MAX_STATES = 200_000
EMBED_HEAD_PATTERN = f"{EMBED_PATTERN}|{LM_HEAD_PATTERN}"


def _options(table: Sensitivity, deltas: dict[str, dict[str, float]], min_bits: dict[str, float]):
    """[(path, [(label, bits, delta), ...] sorted by bits)] with the minimum-bits rules applied."""
    out = []
    for path in sorted(table.bits):
        floor = max([b for pat, b in min_bits.items() if re.search(pat, path)], default=0)
        opts = [(lab, int(nb), float(deltas[path][lab])) for lab, nb in table.bits[path].items()
                if lab in deltas.get(path, {}) and table.specs[lab].bits >= floor]
        if not opts:
            raise DupqError(
                f"module {path} has no candidate spec with at least {floor:g} bits; lower its minimum bits or "
                "measure more bit widths"
            )
        out.append((path, sorted(opts, key=lambda o: (o[1], o[2]))))
    return out


def solve_dp(options, capacity: int, max_states: int = DP_MAX_STATES) -> list[int]:
    """Multiple-choice knapsack by dynamic programming (exact up to ``max_states`` units, see above).

    options: per module a list of (label, bits, delta); capacity: bits available for all modules.
    Returns the chosen option index per module. Raises DupqError when even the cheapest fails.
    """
    base = sum(o[0][1] for _, o in options)
    extra = capacity - base
    if extra < 0:
        raise DupqError("infeasible")
    g = 0
    for _, opts in options:
        for o in opts:
            g = math.gcd(g, o[1] - opts[0][1])
    g = max(g, 1)
    unit = g if extra // g <= max_states else g * math.ceil(extra / (max_states * g))
    size = extra // unit + 1
    best = np.zeros(size)  # best[s] = min delta with at most s units of extra bits
    choices = []
    for _, opts in options:
        nxt = np.full(size, np.inf)
        arg = np.zeros(size, dtype=np.int16)
        for j, (_, nb, d) in enumerate(opts):
            c = math.ceil((nb - opts[0][1]) / unit)
            if c >= size:
                continue
            cand = np.full(size, np.inf)
            cand[c:] = best[: size - c] + d
            better = cand < nxt
            nxt[better] = cand[better]
            arg[better] = j
        best = nxt
        choices.append((arg, opts, unit))
    # backtrack from the full extra budget
    s = size - 1
    picked = []
    for arg, opts, unit in reversed(choices):
        j = int(arg[s])
        picked.append(j)
        s -= math.ceil((opts[j][1] - opts[0][1]) / unit)
    return picked[::-1]


def solve_greedy(options, capacity: int) -> list[int]:
    """Marginal-gain greedy: cheapest specs first, then the best (decrease / extra bit) upgrade that fits."""
    picked = [0] * len(options)
    used = sum(o[0][1] for _, o in options)
    if used > capacity:
        raise DupqError("infeasible")
    while True:
        best, best_rate = None, 0.0
        for i, (_, opts) in enumerate(options):
            cur = opts[picked[i]]
            for j, o in enumerate(opts):
                gain, cost = cur[2] - o[2], o[1] - cur[1]
                if gain <= 0 or used + cost > capacity:
                    continue
                rate = gain / cost if cost > 0 else math.inf
                if best is None or rate > best_rate:
                    best, best_rate = (i, j), rate
        if best is None:
            return picked
        i, j = best
        used += options[i][1][j][1] - options[i][1][picked[i]][1]
        picked[i] = j


def allocate(
    table: Sensitivity,
    budget_bpw: float,
    base_recipe: Recipe | None = None,
    *,
    fixed_bits: int | None = None,
    measure: str = "kl",
    min_bits: dict[str, float] | None = None,
    embed_min_bits: float | None = None,
    solver: str = "dp",
    name: str | None = None,
) -> Recipe:
    """One spec per module minimising the summed sensitivity at ``<= budget_bpw`` all-in bits/weight.

    table:          :func:`~mlx_dupq.search.sensitivity.measure_sensitivity`'s result
    fixed_bits:     bits of the tensors not in the table (default: ``table.fixed_bits``)
    measure:        ``kl`` or ``proxy``
    min_bits:       {path regex: minimum bits} (e.g. keep some modules >= 4 bits)
    embed_min_bits: shorthand for a minimum on the embedding and lm_head (docs/quality.md: "kept higher")
    solver:         ``dp`` (exact on a fine bit grid) or ``greedy``
    """
    if solver not in SOLVERS:
        raise DupqError(f"unknown allocation solver {solver!r}; use one of {', '.join(SOLVERS)}")
    if not budget_bpw > 0:
        raise DupqError(f"budget {budget_bpw!r} bits/weight must be positive, e.g. 2.5")
    base_recipe = base_recipe or Recipe()
    rules = dict(min_bits or {})
    if embed_min_bits is not None:
        rules[EMBED_HEAD_PATTERN] = float(embed_min_bits)
    fixed = table.fixed_bits if fixed_bits is None else int(fixed_bits)
    options = _options(table, table.table(measure), rules)
    capacity = math.floor(budget_bpw * table.n_params) - fixed
    lowest = (fixed + sum(o[0][1] for _, o in options)) / table.n_params
    if capacity < sum(o[0][1] for _, o in options):
        raise DupqError(
            f"budget {budget_bpw:g} bits/weight is below the smallest reachable {lowest:.4f} with these candidate "
            "specs and minimums; raise the budget or add lower bit widths"
        )
    picked = solve_dp(options, capacity) if solver == "dp" else solve_greedy(options, capacity)
    choice = {path: opts[j][0] for (path, opts), j in zip(options, picked)}
    total = fixed + sum(opts[j][1] for (_, opts), j in zip(options, picked))
    score = sum(opts[j][2] for (_, opts), j in zip(options, picked))
    pinned = tuple(Rule("^" + re.escape(p) + "$", table.specs[choice[p]]) for p in sorted(choice))
    counts: dict[str, int] = {}  # by what the pack holds (the pack records the requested group size too)
    for p, lab in choice.items():
        stored = table.stored_spec(p, lab).label()
        counts[stored] = counts.get(stored, 0) + 1
    mix = ", ".join(f"{n} x {lab}" for lab, n in sorted(counts.items()))
    desc = (f"mixed precision at <= {budget_bpw:g} bits/weight all-in ({total / table.n_params:.4f} planned), "
            f"{measure} sensitivity {score:.4g}, solver {solver}; {mix}")
    return dataclasses.replace(
        base_recipe,
        name=name or f"{base_recipe.name}-mix{budget_bpw:g}",
        description=desc,
        rules=pinned + tuple(base_recipe.rules),
    )


def uniform_choice(table: Sensitivity, label: str) -> dict[str, str]:
    """Every module at spec ``label`` (a baseline for comparisons)."""
    return {p: label for p in table.bits}


def recipe_choice(table: Sensitivity, recipe: Recipe) -> dict[str, str]:
    """{path: label} that ``recipe`` assigns to the table's modules."""
    out = {}
    for p in table.bits:
        spec = recipe.spec_for(p)
        out[p] = spec.label() if spec is not None else None
    return out


def total_delta(table: Sensitivity, choice: dict[str, str], measure: str = "kl") -> float:
    """Summed sensitivity of a choice."""
    t = table.table(measure)
    return sum(t[p][lab] for p, lab in choice.items())


# ------------------------------------------------------------------------------ TOML


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string (JSON escapes are a subset)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise DupqError(f"cannot write {v!r} to TOML")


def _toml_table(d: dict) -> list[str]:
    return [f"{k} = {toml_value(v)}" for k, v in d.items() if v is not None]


def recipe_toml(recipe: Recipe) -> str:
    """``recipe`` as a TOML file that :func:`~mlx_dupq.config.load_recipe` reads back equal."""
    d = recipe.to_dict()
    lines = [f"# written by mlx-dupq allocate: {recipe.description}"]
    lines += _toml_table({k: d[k] for k in ("name", "description", "version", "dtype", "router_full_precision")})
    for key in ("default", "embed", "lm_head", "rotation", "quantizer"):
        if key in ("rotation",) and d[key] is None:
            continue
        lines += ["", f"[{key}]"]
        lines += ["keep = true"] if d[key] is None else _toml_table(d[key])
    for r in d["rules"]:
        lines += ["", "[[rules]]"] + _toml_table(r)
    return "\n".join(lines) + "\n"


def write_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write ``recipe`` as TOML to ``path``."""
    p = Path(path).expanduser()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(recipe_toml(recipe))
    except OSError as e:
        raise DupqError(f"could not write {p} ({e.strerror or e}); choose another -o path") from None
    return p


def allocate_model(
    model: str,
    budget_bpw: float,
    recipe: Recipe | str | None = None,
    *,
    data: str = "brown:calib",
    samples: int = 4,
    seq_len: int = 128,
    seed: int = 0,
    bits=(2, 3, 4, 8),
    measure: str = "kl",
    embed_min_bits: float | None = None,
    solver: str = "dp",
    only: str | None = None,
    progress=None,
) -> tuple[Recipe, Sensitivity]:
    """Load MODEL, measure its sensitivity on ``samples x seq_len`` tokens of ``data``, allocate.

    bits: candidate bit widths or (bits, group_size) pairs; only: allocate just the modules whose
    path matches this regex (the others keep the base recipe's spec). A base recipe with a
    ``[rotation]`` is measured on the rotated float model.
    """
    base = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    m, config, tok_dir = load_model(model)
    tok = tokenizer_of(tok_dir, config)
    tokens = calibration_batches(tok, load_text(data), samples, seq_len, seed)
    if base.rotation is not None:
        m = rotate_float_model(m, config, base.rotation, consume=True)
    table = measure_sensitivity(m, tokens, base, bits=bits, measures=(measure,), progress=progress, only=only)
    table.extra["rotated"] = base.rotation is not None
    rec = allocate(table, budget_bpw, base, measure=measure, embed_min_bits=embed_min_bits, solver=solver)
    return rec, table
