"""The duplication study's machinery (docs/duplication.md): equal-bits controls, the in-memory
quantized models of each plan, and their measurement. ``bench/dup_experiments.py`` is its command line.

Every row is built in memory from the float model with the same machinery a pack uses
(:func:`mlx_dupq.dup.runtime.duplicate_linears` / :func:`~mlx_dupq.dup.runtime.duplicate_layers`,
every decoder linear through the copy engine's RTN, embedding and lm_head 8-bit g64). The
*equal-bits control* of a plan stores its duplicated layers once at the most precise RTN spec
(bits 3/4/5/6/8, groups 32/64/128) whose bits per weight do not exceed those layers' copies
together (:func:`control_spec`).
"""

from __future__ import annotations

import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from ..adapter import build_skeleton, layer_owner
from ..config import QuantSpec
from ..eval.data import calibration_batches, load_text
from ..eval.ppl import perplexity
from ..io.loader import tokenizer_of, load_model
from ..io.pack import cast_floats
from ..layers.cpu import use_dense_prefill
from .build import float_hessians, quantize_with_plan
from .specs import CopySpec, DupPlan, diversify

BASE = QuantSpec(bits=2, group_size=64, symmetric=False)
EMBED = QuantSpec(bits=8, group_size=64, symmetric=False)
CONTROL_BITS = (3, 4, 5, 6, 8)
CONTROL_GROUPS = (128, 64, 32)


# ------------------------------------------------------------------------------ bits and controls


def spec_cost(spec: QuantSpec, shared_codes: bool = False) -> float:
    """Stored bits per weight of one RTN copy: codes (unless shared) + fp16 scales (+ biases)."""
    return (0.0 if shared_codes else spec.bits) + (16 if spec.symmetric else 32) / spec.group_size


def layer_cost(copies, base: QuantSpec = BASE) -> float:
    return sum(spec_cost(c.spec(base), c.shared_codes) for c in copies)


def control_spec(copies, base: QuantSpec = BASE) -> QuantSpec:
    """The most precise single RTN spec whose bits per weight fit the copies' together."""
    budget = layer_cost(copies, base) + 1e-9
    best = base
    for b in CONTROL_BITS:
        for g in CONTROL_GROUPS:
            s = QuantSpec(bits=b, group_size=g, symmetric=False)
            if spec_cost(s) <= budget and (s.bits, -s.group_size) > (best.bits, -best.group_size):
                best = s
    return best


def control_plan(plan: DupPlan, base: QuantSpec = BASE) -> DupPlan:
    return DupPlan(mode="parallel", copies={k: [CopySpec(quant=control_spec(cs, base))]
                                           for k, cs in plan.copies.items() if len(cs) > 1})


# ------------------------------------------------------------------------------------ the model


class Bench:
    """A float model held in memory, rebuilt and quantized per duplication plan, and measured."""

    def __init__(self, name: str, data: str, ctx: int, windows: int, calib: str = "brown:calib"):
        model, self.config, tok_dir = load_model(name)
        self.tok = tokenizer_of(tok_dir, self.config)
        self.weights = dict(tree_flatten(model.parameters()))
        self.n_params = sum(int(v.size) for v in self.weights.values())
        self.n_layers = len(layer_owner(model).layers)
        del model
        self.text = load_text(data)
        self.calib = calibration_batches(self.tok, load_text(calib), 8, 256, 0)
        self.ctx, self.windows = ctx, windows

    def fresh(self) -> nn.Module:
        m = build_skeleton(self.config)
        m.load_weights(list(self.weights.items()))
        m.eval()
        return m

    def build(self, plan: DupPlan | None, base: QuantSpec = BASE) -> tuple[nn.Module, float]:
        """Quantized model for ``plan`` (None: no duplication) -> (model in float32, all-in bpw)."""
        model = self.fresh()
        hessians = None
        if plan is not None and plan.mode == "parallel" and plan.aggregation != "mean":
            hessians = float_hessians(model, self.calib, sorted(plan.resolve(self.n_layers).copies))
        bits = quantize_with_plan(model, plan, base, EMBED, hessians=hessians)
        cast_floats(model, mx.float32)
        use_dense_prefill(model)
        mx.eval(model.parameters())
        return model, bits / self.n_params

    def measure(self, model, speed: bool = True) -> dict:
        r = perplexity(model, self.tok, self.text, ctx=self.ctx, windows=self.windows)
        out = {"ppl": r["ppl"], "eval_seconds": r["seconds"]}
        if speed:
            out["decode_s_per_token"] = decode_latency(model)
            out["decode_tps"] = 1.0 / out["decode_s_per_token"]
        return out


def decode_latency(model, prompt: int = 16, steps: int = 6) -> float:
    """Median seconds of one cached decode step (batch 1) after a ``prompt``-token prefill."""
    cache = make_prompt_cache(model)
    y = model(mx.arange(1, prompt + 1)[None], cache=cache)
    mx.eval(y)
    times = []
    tok = mx.argmax(y[:, -1:], axis=-1)
    for _ in range(steps):
        t0 = time.perf_counter()
        y = model(tok, cache=cache)
        mx.eval(y)
        times.append(time.perf_counter() - t0)
        tok = mx.argmax(y[:, -1:], axis=-1)
    return float(sorted(times)[len(times) // 2])


# ---------------------------------------------------------------------------------- the plans


def scaled(n_layers: int, seed_layers: int) -> int:
    """The seed's count of a 64-layer model scaled to ``n_layers`` (at least 1)."""
    return max(1, round(seed_layers * n_layers / 64))


def copies_of(n: int, by: str = "scale") -> list[CopySpec]:
    return diversify(n, by)


def last(n_layers: int, n: int, copies: list[CopySpec], mode: str = "parallel") -> DupPlan:
    return DupPlan(mode=mode, copies={k: copies for k in range(n_layers - n, n_layers)})
