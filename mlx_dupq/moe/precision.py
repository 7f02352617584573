"""Expert-wise mixed precision under an all-in budget (docs/moe.md, F6.4): the decision, not the packing.

A recipe's ``[moe]`` table (:class:`~mlx_dupq.moe.spec.MoESpec`) asks for routed experts at
``low_bits``, the highest-scoring ones raised to ``high_bits``, shared experts at ``shared_bits``,
the whole pack at most ``budget`` bits per weight *all-in* (codes, scales, offsets, norms, routers,
embeddings: exactly what ``convert`` reports). :func:`plan_experts` scores the experts on
calibration text (routing frequency or the F6.2 sensitivity score), prices every tensor of the
model with the exact byte count the packer will write (:func:`stored_bits`), and raises experts
greedily -- best score first, across layers -- while the predicted all-in bpw stays within budget.

Copies and rotation (F6.5, ``dup_budget`` / ``shared_copies`` / ``rotation``): routed experts get
residual copies by the group policy of :mod:`mlx_dupq.moe.duplication` (frequency-based groups from
the same calibration routing), each copy priced like one more expert at its width; an expert with
copies keeps ``low_bits`` (its copies are its extra precision) and is never raised. Each shared-expert
linear costs ``shared_copies`` times its spec. A rotation changes no stored byte.

The converter (:func:`mlx_dupq.pipeline.convert`) packs each switch layer with its experts' specs
(:mod:`mlx_dupq.layers.moe_linear`). The frequency score streams like the dense converter
(:func:`stream_frequency`: one float decoder layer at a time plus the calibration hidden states);
the sensitivity score needs gradients through the whole model, so it loads the float source in
full (that conversion peaks at the float model's size).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..config import QuantSpec, Recipe
from ..errors import DupqError
from ..quant.bitpack import FORMAT_DUPQ, FORMAT_MLX, packed_shapes
from .spec import SHARED_PATTERN, MoESpec
from ..adapter import module_kind
from ..input_stats import run_layer
from ..eval.data import calibration_batches, load_text
from ..io import loader
from ..io.source import Source, open_source
from .duplication import expert_copies
from .experts import expert_rotation
from .routing import find_blocks, install, Routing, uninstall
from .expert_sensitivity import expert_sensitivity
from .stats import frequency, record_routing

SWITCH_PROJS = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2")
# quantizers a [moe] recipe takes; gptq / awq quantize each routed expert against the statistics of
# the calibration rows routed to it (mlx_dupq.pipeline._quantize_switch)
MOE_METHODS = ("rtn", "mse", "awq", "gptq")


def stored_bits(shape: tuple[int, ...], spec: QuantSpec | None, dtype_bits: int = 16) -> int:
    """Bits the packer stores for a float weight of ``shape`` under ``spec`` (None: kept in float)."""
    n = math.prod(shape)
    if spec is None:
        return n * dtype_bits
    s = spec.fit(shape[-1])
    entry = {"format": FORMAT_MLX if s.mlx_native else FORMAT_DUPQ, "bits": s.bits, "group_size": s.group_size,
             "symmetric": s.symmetric}
    total = 0
    for name, shp in packed_shapes(tuple(shape), entry).items():
        size = math.prod(shp)
        if name == "weight":
            total += size * (8 if s.ternary and entry["format"] == FORMAT_DUPQ else 32)
        else:
            total += size * dtype_bits
    return total


@dataclass
class ExpertPlan:
    """Per switch layer the bits of each expert, per shared-expert linear its spec."""

    expert_bits: dict[str, list[float]] = field(default_factory=dict)  # switch path -> bits per expert
    expert_copies: dict[str, list[int]] = field(default_factory=dict)  # switch path -> copies per expert
    linear_specs: dict[str, QuantSpec] = field(default_factory=dict)  # shared-expert linears
    linear_copies: dict[str, int] = field(default_factory=dict)  # shared-expert linears with >= 2 copies
    rotation: str = "none"  # expert input rotation kind
    seed: int = 0
    scores: dict[int, list[float]] = field(default_factory=dict)  # layer -> score per expert
    predicted_bpw: float = 0.0
    floor_bpw: float = 0.0  # every routed expert at low_bits
    score: str = "frequency"

    def expert_specs(self, path: str, default: QuantSpec) -> list[QuantSpec] | None:
        bits = self.expert_bits.get(path)
        return None if bits is None else [QuantSpec(b, default.group_size, default.symmetric) for b in bits]

    def copies_for(self, path: str) -> list[int] | None:
        """Residual copies per expert of a switch layer, or None when none of its experts has copies."""
        c = self.expert_copies.get(path)
        return None if c is None or max(c) == 1 else list(c)

    def rotation_for(self, n: int):
        """The experts' input :class:`~mlx_dupq.rotation.Rotation` of width ``n``, or None."""
        if self.rotation == "none":
            return None

        return expert_rotation(self.rotation, n, self.seed)

    def summary(self) -> dict:
        per_layer = {}
        for path, bits in self.expert_bits.items():
            layer = path.split(".switch_mlp.")[0]
            per_layer.setdefault(layer, bits)
        return {
            "score": self.score,
            "predicted_bpw": self.predicted_bpw,
            "floor_bpw": self.floor_bpw,
            "experts_high": {k: int(sum(b > min(v) for b in v)) for k, v in per_layer.items()},
            "expert_bits": per_layer,
            "expert_copies": {p.split(".switch_mlp.")[0]: c for p, c in self.expert_copies.items() if max(c) > 1},
            "shared_copies": max(self.linear_copies.values(), default=1),
            "rotation": self.rotation,
        }


def switch_paths(block_path: str, switch: nn.Module) -> list[str]:
    return [f"{block_path}.switch_mlp.{p}" for p in SWITCH_PROJS if p in switch]


def allocate(scores: dict[int, np.ndarray], expert_cost: dict[int, tuple[int, int]], fixed_bits: int,
             n_params: int, budget: float, max_high_fraction: float = 1.0,
             copies: dict[int, np.ndarray] | None = None) -> dict[int, np.ndarray]:
    """Greedy budgeted upgrade; pure function.

    scores {layer: (E,)}; expert_cost {layer: (bits of one expert at low, at high)} (all its
    projections); fixed_bits: everything else; copies {layer: (E,) ints}: an expert with n copies
    costs n times low and is never raised. Raises experts best score first (ties: lower layer,
    lower id) while ``(fixed + experts) / n_params <= budget``. Returns {layer: (E,) bool raised}.
    """
    copies = copies or {l: np.ones(len(s), dtype=np.int64) for l, s in scores.items()}
    raised = {l: np.zeros(len(s), dtype=bool) for l, s in scores.items()}
    total = fixed_bits + sum(expert_cost[l][0] * int(copies[l].sum()) for l in scores)
    if total / n_params > budget + 1e-9:
        raise DupqError(
            f"moe budget {budget:g} bpw is below the floor {total / n_params:.3f} bpw (every routed expert at low_bits, "
            "with its copies); raise budget, lower dup_budget / shared_copies or the default / embed / lm_head / "
            "shared bits of the recipe"
        )
    cands = sorted(((-float(s[e]), l, e) for l, s in scores.items() for e in range(len(s)) if copies[l][e] == 1))
    cap = {l: int(math.floor(max_high_fraction * len(s) + 1e-9)) for l, s in scores.items()}
    for _, l, e in cands:
        lo, hi = expert_cost[l]
        if raised[l].sum() >= cap[l]:
            continue
        if (total + hi - lo) / n_params <= budget + 1e-9:
            raised[l][e] = True
            total += hi - lo
    return raised


def plan_experts(rec: Recipe, skeleton: nn.Module, model: nn.Module, tokenizer) -> ExpertPlan:
    """The expert plan of ``rec.moe`` for a model (``skeleton``: shapes; ``model``: float weights)."""
    moe: MoESpec = rec.moe
    low = moe.spec(moe.low_bits, rec.default)
    scores, freqs = expert_scores(model, tokenizer, moe, low, with_frequency=moe.dup_budget > 0)
    return plan_from_scores(rec, skeleton, scores, freqs)


def plan_from_scores(rec: Recipe, skeleton: nn.Module, scores: dict[int, np.ndarray],
                     freqs: dict[int, np.ndarray] | None = None) -> ExpertPlan:
    """The expert plan of ``rec.moe`` from the experts' scores {layer: (E,)} (and, for
    ``dup_budget``, their routing shares {layer: (E,)}); ``skeleton`` gives the shapes only."""
    moe: MoESpec = rec.moe
    blocks = find_blocks(skeleton)
    low, high = moe.spec(moe.low_bits, rec.default), moe.spec(moe.high_bits, rec.default)
    plan = ExpertPlan(score=moe.score, rotation=moe.rotation, seed=moe.seed)
    fixed, n_params, costs = _price(rec, skeleton, blocks, plan)

    plan.scores = {l: [float(x) for x in s] for l, s in scores.items()}
    copies = None
    if moe.dup_budget > 0:
        copies = expert_copies(freqs, {b.layer: b.k for b in blocks}, moe.dup_budget)
    copies = copies or {b.layer: np.ones(b.num_experts, dtype=np.int64) for b in blocks}
    raised = allocate(scores, costs, fixed, n_params, moe.budget, moe.max_high_fraction, copies)
    total = fixed
    for b in blocks:
        r, c = raised[b.layer], copies[b.layer]
        bits = [float(high.bits) if r[e] else float(low.bits) for e in range(b.num_experts)]
        total += int(sum(c[e] * costs[b.layer][1 if r[e] else 0] for e in range(b.num_experts)))
        for p in switch_paths(b.path, b.switch):
            plan.expert_bits[p] = bits
            plan.expert_copies[p] = [int(x) for x in c]
    plan.predicted_bpw = total / n_params
    plan.floor_bpw = (fixed + sum(costs[b.layer][0] * int(copies[b.layer].sum()) for b in blocks)) / n_params
    return plan


def _price(rec: Recipe, skeleton: nn.Module, blocks: list, plan: ExpertPlan) -> tuple[int, int, dict]:
    """(fixed bits of everything but the routed experts, parameter count, {layer: [bits of one
    expert at low, at high]}); fills ``plan.linear_specs`` / ``plan.linear_copies`` (shared experts)."""
    moe: MoESpec = rec.moe
    dtype_bits = {"float16": 16, "bfloat16": 16, "float32": 32}[rec.dtype]
    mods = dict(skeleton.named_modules())
    low, high, shared = (moe.spec(b, rec.default) for b in (moe.low_bits, moe.high_bits, moe.shared_bits))
    switch = {p: b.layer for b in blocks for p in switch_paths(b.path, b.switch)}
    fixed = n_params = 0
    expert_cost: dict[int, list[int]] = {b.layer: [0, 0] for b in blocks}

    for key, v in tree_flatten(skeleton.parameters()):
        shape = tuple(v.shape)
        n_params += math.prod(shape)
        path, _, param = key.rpartition(".")
        mod = mods.get(path)
        kind = module_kind(mod) if mod is not None else None
        spec = rec.spec_for(path) if kind and param == "weight" else None
        if spec is None:
            fixed += stored_bits(shape, None, dtype_bits)
        elif path in switch:
            E = shape[0]
            c = expert_cost[switch[path]]
            c[0] += stored_bits(shape, low, dtype_bits) // E
            c[1] += stored_bits(shape, high, dtype_bits) // E
        elif re.search(SHARED_PATTERN, "." + path + "."):
            plan.linear_specs[path] = shared
            if moe.shared_copies > 1:
                plan.linear_copies[path] = moe.shared_copies
            fixed += stored_bits(shape, shared, dtype_bits) * moe.shared_copies
        else:
            fixed += stored_bits(shape, spec, dtype_bits)
    return fixed, n_params, {l: tuple(c) for l, c in expert_cost.items()}


def calibration_tokens(tokenizer, moe: MoESpec) -> mx.array:
    return calibration_batches(tokenizer, load_text(moe.calib_data), moe.calib_samples, moe.calib_seq_len, moe.seed)


def expert_scores(model: nn.Module, tokenizer, moe: MoESpec, low: QuantSpec, with_frequency: bool = False):
    """{layer: (E,) score}: routing share, or the F6.2 sensitivity score at ``low``.

    ``with_frequency``: returns (scores, {layer: (E,) routing share}) (one routing pass is shared
    when the score is the frequency); else (scores, None).
    """
    batches = calibration_tokens(tokenizer, moe)
    freqs = expert_frequency(model, batches) if (moe.score == "frequency" or with_frequency) else None
    if moe.score == "sensitivity":
        scores = {l: np.array(d["score"]) for l, d in expert_sensitivity(model, batches, low).items()}
    else:
        scores = freqs
    return scores, (freqs if with_frequency else None)


def expert_frequency(model: nn.Module, batches: mx.array) -> dict[int, np.ndarray]:
    """{layer: (E,) share of the token-expert assignments} on the calibration batches."""
    blocks = {b.layer: b for b in find_blocks(model)}
    routes = record_routing(model, batches)
    return {l: frequency(r["inds"], blocks[l].num_experts) for l, r in routes.items()}


def check_moe_recipe(rec: Recipe, skeleton: nn.Module) -> None:
    """Refuse what the expert plan cannot do, with one line saying what to change."""
    if rec.moe is None:
        return
    if rec.quantizer.method not in MOE_METHODS:
        raise DupqError(
            f"a [moe] recipe quantizes experts with {', '.join(MOE_METHODS)}, not {rec.quantizer.method}; set quantizer.method"
        )
    if rec.duplication is not None:
        raise DupqError("a [moe] recipe cannot combine with [duplication] yet; for the experts use "
                        "[moe] dup_budget / shared_copies instead")
    blocks = find_blocks(skeleton)  # raises when the model has no MoE layers
    if rec.moe.rotated:
        for b in blocks:
            for p in switch_paths(b.path, b.switch):
                n = b.switch[p.rpartition(".")[2]]["weight"].shape[-1]
                _check_rotation(rec.moe, p, n)


def _check_rotation(moe: MoESpec, path: str, n: int) -> None:
    try:
        expert_rotation(moe.rotation, n, moe.seed)
    except DupqError as e:
        raise DupqError(f"moe rotation {moe.rotation!r} does not fit {path} ({n} inputs): {e}") from None


def scoring_message(rec: Recipe) -> str:
    """The converter's progress line for scoring the experts of ``rec.moe``."""
    moe: MoESpec = rec.moe
    how = ("streamed one layer at a time" if moe.score == "frequency"
           else "loads the whole float model: the score needs gradients through every layer")
    return f"scoring experts ({moe.score}) on {moe.calib_data}, {how}"


def plan_for_convert(rec: Recipe, model_ref: Source | str | Path, skeleton: nn.Module,
                     progress=None) -> ExpertPlan | None:
    """The expert plan for ``convert``: scores the experts of the float source ``model_ref`` (the
    converter passes the :class:`~mlx_dupq.io.base.Source` it already opened; a path is opened here).

    ``score = "frequency"`` streams the source one decoder layer at a time (:func:`stream_frequency`);
    ``"sensitivity"`` loads the whole float model (it back-propagates through every layer).
    ``progress(message, done, total)`` hears one line per streamed layer.
    """
    if rec.moe is None:
        return None
    check_moe_recipe(rec, skeleton)
    moe: MoESpec = rec.moe
    if moe.score == "frequency":
        src = model_ref if isinstance(model_ref, Source) else open_source(model_ref)
        batches = calibration_tokens(loader.tokenizer_of(src.tokenizer_dir(), src.config), moe)
        freqs = stream_frequency(src, skeleton, batches, progress=progress)
        return plan_from_scores(rec, skeleton, freqs, freqs)

    if isinstance(model_ref, Source):
        model, config, tok_dir = loader.float_model(model_ref), model_ref.config, model_ref.tokenizer_dir()
    else:
        model, config, tok_dir = loader.load_model(model_ref, compute_dtype="float32")
    try:
        return plan_experts(rec, skeleton, model, loader.tokenizer_of(tok_dir, config))
    finally:
        del model
        mx.clear_cache()


def stream_frequency(src, skeleton: nn.Module, batches: mx.array, batch: int = 4,
                     progress=None) -> dict[int, np.ndarray]:
    """{layer: (E,) routing share} on ``batches`` (n, T), streaming the float weights of ``src``.

    The same shares as :func:`expert_frequency` on the loaded float model, without loading it: the
    float32 embedding rows of the tokens start the hidden states h (n, T, hidden)
    (:func:`~mlx_dupq.io.loader.float_embedding`); then each decoder layer up to the last MoE one
    is read from ``src`` into ``skeleton``'s layer in float32 (:func:`~mlx_dupq.io.loader.float_layers`),
    h is run through it (causal mask, ``batch`` sequences at a time) while its router's picks are
    recorded (:mod:`mlx_dupq.moe.routing`), and the layer gets its original (lazy, never evaluated)
    parameters back. Peak memory: one layer + h + the embedding while h is built.
    """
    blocks = {b.layer: b for b in find_blocks(skeleton)}
    h = loader.float_embedding(src, batches)
    say = progress or (lambda *a: None)
    last = max(blocks)
    record: list = []
    install(skeleton, Routing(record=record))
    freqs: dict[int, np.ndarray] = {}
    try:
        for i, layer in loader.float_layers(src, skeleton):
            say(f"scoring experts: layer {i + 1} of {last + 1}", i, last + 1)
            record.clear()
            h = run_layer(layer, h, batch)
            if i in blocks:
                inds = np.concatenate([np.asarray(r["inds"].reshape(-1, r["inds"].shape[-1]).astype(mx.int32))
                                       for r in record])
                freqs[i] = frequency(inds, blocks[i].num_experts)
            record.clear()
            if i == last:
                break
    finally:
        record.clear()
        uninstall(skeleton)
    return freqs
