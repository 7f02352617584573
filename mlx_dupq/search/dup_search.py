"""Search over duplication plans and copy parameters (docs/duplication.md, F8): grid, TPE, evolutionary, two-stage.

A candidate is a dict of parameters (:class:`SearchSpace`): the copy count of each *layer group*
(layers in a group share every parameter, F8.2), the execution mode (parallel / residual), how
copies differ (``scale``: multipliers 1, 1+s, 1-s, ...; ``offset``: grid offsets i/K; ``rotation``:
perturbed H.P with eps s) and the step ``s``. :meth:`SearchSpace.plan` turns it into a
:class:`~mlx_dupq.dup.specs.DupPlan`.

The objective (F8.3) of a plan, evaluated on calibration text only (never the eval split)::

    alpha * PPL_calib + beta * bits_per_weight + gamma * latency,   subject to bpw <= max_bpw

``bits_per_weight`` is the all-in size of the model the plan builds
(:func:`mlx_dupq.dup.build.quantize_with_plan`), ``latency`` the relative decode compute
``(layers + extra copies) / layers`` (every copy is one more pass over a layer's weights;
wall-clock decode on a shared CPU is too noisy to optimise on). A plan over the memory cap is
not evaluated (objective ``inf``).

Searchers: :func:`grid_search` (every combination, in order, up to ``trials``),
:func:`tpe_search` (optuna's TPE sampler; ``enqueue`` seeds it with known candidates),
:func:`evolutionary_search` (truncation selection + mutation), :func:`two_stage_search` (a
coarse grid over counts and modes, in a seeded random order, keeps its best 10, which TPE
receives as known results before refining every parameter). Each returns the evaluated trials, best first.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..adapter import build_skeleton, layer_owner
from ..config import QuantSpec, Recipe, load_recipe
from ..dup.specs import CopySpec, DupPlan
from ..errors import DupqError
from ..extras import require
from ..metrics import mean_nll
from ..dup.build import quantize_with_plan
from ..eval.data import calibration_batches, load_text
from ..io.loader import tokenizer_of, load_model
from ..io.pack import cast_floats
from .allocate import toml_value, recipe_toml

METHODS = ("grid", "tpe", "evolutionary", "two-stage")


@dataclass(frozen=True)
class SearchSpace:
    """groups: layer groups sharing parameters, e.g. [[0, 1], [2, 3]]; counts: total copies per group."""

    groups: tuple[tuple[int, ...], ...]
    counts: tuple[int, ...] = (1, 2, 3)
    modes: tuple[str, ...] = ("parallel", "residual")
    diversity: tuple[str, ...] = ("scale", "offset", "rotation")
    steps: tuple[float, ...] = (0.025, 0.05, 0.1)

    def __post_init__(self):
        if not self.groups or any(not g for g in self.groups):
            raise DupqError("the search needs at least one non-empty layer group")
        if min(self.counts) < 1 or max(self.counts) > 8:
            raise DupqError(f"copy counts {self.counts} are out of range; use 1..8")

    @classmethod
    def contiguous(cls, n_layers: int, group: int, last: int | None = None, **kw) -> "SearchSpace":
        """Groups of ``group`` consecutive layers over the last ``last`` layers (all when None)."""
        if group < 1:
            raise DupqError(f"layer group size {group} must be at least 1")
        start = 0 if last is None else max(0, n_layers - last)
        layers = list(range(start, n_layers))
        return cls(tuple(tuple(layers[i:i + group]) for i in range(0, len(layers), group)), **kw)

    def choices(self) -> dict[str, tuple]:
        d = {"mode": self.modes, "by": self.diversity, "step": self.steps}
        d.update({f"g{i}": self.counts for i in range(len(self.groups))})
        return d

    def plan(self, params: dict) -> DupPlan | None:
        """The plan of a candidate (None when every group has one copy)."""
        copies = {}
        for i, g in enumerate(self.groups):
            c = int(params[f"g{i}"])
            if c > 1:
                cs = copy_specs(c, params["by"], float(params["step"]), params["mode"])
                copies.update({k: cs for k in g})
        return DupPlan(mode=params["mode"], copies=copies) if copies else None


def copy_specs(n: int, by: str, step: float, mode: str = "parallel") -> list[CopySpec]:
    """n copies differing ``by`` scale / offset / rotation with ``step`` (residual copies: plain)."""
    if mode == "residual" and by != "rotation":
        return [CopySpec()] * n
    if by == "scale":
        mults = [1.0] + [round(1.0 + s * step * (i // 2 + 1), 4) for i, s in zip(range(n - 1), itertools.cycle((1, -1)))]
        return [CopySpec(scale_mult=m) for m in mults]
    if by == "offset":
        return [CopySpec(grid_offset=round(min(0.5, i / n), 4)) for i in range(n)]
    if by == "rotation":
        return [CopySpec(rotation={"kind": "perturbed", "seed": i, "eps": step if i else 0.0}) for i in range(n)]
    raise DupqError(f"unknown copy diversity {by!r}; use scale, offset or rotation")


@dataclass(frozen=True)
class Objective:
    alpha: float = 1.0
    beta: float = 0.0
    gamma: float = 0.0
    max_bpw: float | None = None

    def value(self, ppl: float, bpw: float, latency: float) -> float:
        if self.max_bpw is not None and bpw > self.max_bpw:
            return math.inf
        return self.alpha * ppl + self.beta * bpw + self.gamma * latency


@dataclass
class Evaluator:
    """Builds and scores candidates of one float model on calibration tokens (n, L).

    make_model() -> a fresh float model (its weights may be shared between calls; they are not changed).
    """

    make_model: object
    tokens: mx.array
    base: QuantSpec
    space: SearchSpace
    objective: Objective
    n_params: int
    n_layers: int
    cache: dict = field(default_factory=dict)

    def __call__(self, params: dict) -> dict:
        plan = self.space.plan(params)
        key = repr(None if plan is None else plan.to_dict())
        if key in self.cache:
            return {**self.cache[key], "params": dict(params)}
        model = self.make_model()
        bits = quantize_with_plan(model, plan, self.base)
        bpw = bits / self.n_params
        extra = 0 if plan is None else sum(len(c) - 1 for c in plan.copies.values())
        latency = (self.n_layers + extra) / self.n_layers
        if self.objective.max_bpw is not None and bpw > self.objective.max_bpw:
            ppl = math.nan
        else:
            cast_floats(model, mx.float32)
            model.eval()
            ppl = float(np.exp(mean_nll(model(self.tokens), self.tokens)))
        obj = self.objective.value(ppl, bpw, latency) if not math.isnan(ppl) else math.inf
        r = {"params": dict(params), "plan": None if plan is None else plan.to_dict(), "ppl": ppl,
             "bits_per_weight": bpw, "latency": latency, "objective": obj}
        self.cache[key] = r
        return r


def _ranked(trials: list[dict]) -> list[dict]:
    return sorted(trials, key=lambda t: (t["objective"], t["bits_per_weight"]))


def grid_search(ev: Evaluator, trials: int, choices: dict | None = None, shuffle: int | None = None) -> list[dict]:
    """Every combination of ``choices`` (default: the space's), at most ``trials``: in order, or in a
    random order seeded by ``shuffle`` (so a small budget samples the whole grid)."""
    choices = choices or ev.space.choices()
    keys = list(choices)
    combos = list(itertools.product(*(choices[k] for k in keys)))
    if shuffle is not None:
        random.Random(shuffle).shuffle(combos)
    return _ranked([ev(dict(zip(keys, c))) for c in combos[:trials]])


def tpe_search(ev: Evaluator, trials: int, seed: int = 0, enqueue: list[dict] | None = None,
               history: list[dict] | None = None) -> list[dict]:
    """optuna's TPE sampler over the space's choices (categorical). ``enqueue``: parameters tried
    first; ``history``: trials already evaluated (e.g. a grid's), given to TPE as known results
    without spending the budget on them again."""
    optuna = require("optuna", "search", "the TPE search")  # deferred: optional extra
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    choices = ev.space.choices()
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    dists = {k: optuna.distributions.CategoricalDistribution(list(v)) for k, v in choices.items()}
    for t in history or []:
        if all(t["params"].get(k) in v for k, v in choices.items()):
            study.add_trial(optuna.trial.create_trial(
                params={k: t["params"][k] for k in choices}, distributions=dists,
                value=t["objective"] if math.isfinite(t["objective"]) else 1e30))
    for p in enqueue or []:
        study.enqueue_trial(p)
    out = []

    def f(trial):
        params = {k: trial.suggest_categorical(k, list(v)) for k, v in choices.items()}
        r = ev(params)
        out.append(r)
        return r["objective"] if math.isfinite(r["objective"]) else 1e30

    study.optimize(f, n_trials=trials)
    return _ranked(out)


def evolutionary_search(ev: Evaluator, trials: int, population: int = 8, seed: int = 0,
                        mutation: float = 0.3) -> list[dict]:
    """Random population; each generation keeps the best half and refills it with mutated copies."""
    rng = random.Random(seed)
    choices = ev.space.choices()

    def sample():
        return {k: rng.choice(v) for k, v in choices.items()}

    def mutate(p):
        q = dict(p)
        for k, v in choices.items():
            if rng.random() < mutation:
                q[k] = rng.choice(v)
        return q

    out: list[dict] = []
    pop = [ev(sample()) for _ in range(min(population, trials))]
    out += pop
    while len(out) < trials:
        parents = _ranked(pop)[: max(1, len(pop) // 2)]
        children = [ev(mutate(rng.choice(parents)["params"])) for _ in range(min(population - len(parents), trials - len(out)))]
        out += children
        pop = parents + children
    return _ranked(out)


def two_stage_search(ev: Evaluator, trials: int, keep: int = 10, seed: int = 0) -> list[dict]:
    """Coarse grid (counts x modes, scale copies of step 0.05) keeps the best ``keep``; TPE refines."""
    coarse = dict(ev.space.choices(), by=("scale",), step=(0.05,))
    n_grid = min(trials // 2 or 1, math.prod(len(v) for v in coarse.values()))
    first = grid_search(ev, n_grid, coarse, shuffle=seed)
    second = tpe_search(ev, max(0, trials - n_grid), seed, history=first[:keep])
    return _ranked(first + second)


def run_search(ev: Evaluator, method: str, trials: int, seed: int = 0) -> list[dict]:
    if trials < 1:
        raise DupqError(f"--trials {trials} must be at least 1")
    if method == "grid":
        return grid_search(ev, trials)
    if method == "tpe":
        return tpe_search(ev, trials, seed)
    if method == "evolutionary":
        return evolutionary_search(ev, trials, seed=seed)
    if method == "two-stage":
        return two_stage_search(ev, trials, seed=seed)
    raise DupqError(f"unknown search method {method!r}; use one of {', '.join(METHODS)}")


# ------------------------------------------------------------------------- model and recipe


def search_dup(model: str | Path, method: str = "two-stage", trials: int = 20, base_bits: int = 2,
               group_size: int = 64, layer_group: int = 4, last: int | None = None,
               objective: Objective = Objective(), calib_data: str = "brown:calib", samples: int = 4,
               seq_len: int = 256, seed: int = 0) -> tuple[Recipe, list[dict]]:
    """Search a duplication plan for ``model`` on calibration text -> (recipe of the best, trials best first)."""
    if method not in METHODS:
        raise DupqError(f"unknown search method {method!r}; use one of {', '.join(METHODS)}")
    from mlx.utils import tree_flatten

    float_model, config, tok_dir = load_model(model)
    tok = tokenizer_of(tok_dir, config)
    weights = list(tree_flatten(float_model.parameters()))
    n_params = sum(int(v.size) for _, v in weights)
    n_layers = len(layer_owner(float_model).layers)
    del float_model

    def make_model():
        m = build_skeleton(config)
        m.load_weights(weights)
        return m

    tokens = calibration_batches(tok, load_text(calib_data), samples, seq_len, seed)
    base = QuantSpec(bits=base_bits, group_size=group_size, symmetric=False)
    space = SearchSpace.contiguous(n_layers, layer_group, last)
    ev = Evaluator(make_model, tokens, base, space, objective, n_params, n_layers)
    trials_out = run_search(ev, method, trials, seed)
    best = trials_out[0]
    if not math.isfinite(best["objective"]):
        raise DupqError(f"no candidate fits --max-bpw {objective.max_bpw}; raise the cap or the trials")
    return dup_recipe(best["plan"], base, f"search-dup {method}, {trials} trials"), trials_out


def dup_recipe(plan: dict | None, base: QuantSpec, description: str) -> Recipe:
    rec = load_recipe("rtn2")
    import dataclasses

    return dataclasses.replace(rec, name="search-dup", description=description, default=base,
                               duplication=None if plan is None else DupPlan.from_dict(plan))


def _inline(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_inline(x)}" for k, x in v.items() if x is not None) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_inline(x) for x in v) + "]"
    return toml_value(v)


def _key(k: str) -> str:
    return k if k.replace("_", "").isalpha() else f'"{k}"'


def dup_recipe_toml(recipe: Recipe) -> str:
    """``recipe`` as TOML, its ``[duplication]`` included (copies as inline tables)."""
    import dataclasses

    text = recipe_toml(dataclasses.replace(recipe, duplication=None)).replace("mlx-dupq allocate", "mlx-dupq search-dup")
    if recipe.duplication is None:
        return text
    d = recipe.duplication.to_dict()
    d.pop("version", None)
    lines = ["", "[duplication]"] + [f"{k} = {_inline(v)}" for k, v in d.items() if v is not None]
    return text + "\n".join(lines) + "\n"


def write_dup_recipe(recipe: Recipe, path: str | Path) -> Path:
    p = Path(path).expanduser()
    tmp = p.with_name(p.name + ".tmp")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(dup_recipe_toml(recipe))
        tmp.replace(p)
    except OSError as e:
        raise DupqError(f"could not write {p} ({e.strerror or e}); choose another -o path") from None
    return p
