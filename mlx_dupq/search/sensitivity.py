"""Per-module sensitivity to quantization (docs/quality.md, F2.5): what each module costs at each bit width.

For a float model and calibration tokens ``(n, L)``, every module the base recipe quantizes
(linears, embedding, lm_head, switch linears) is measured at each candidate spec (the recipe's
spec for that module with ``bits`` changed, and ``group_size`` too where the candidate names one,
e.g. ``(2, 64)``); ``only`` (a path regex) restricts the measurement to some modules and counts
the others at the recipe's own spec in ``fixed_bits``:

- ``kl`` (cheap, end to end): mean per-token KL(p_float || p_q) of the final logits when ONLY that
  module's weight is replaced by ``dequantize(rtn_quantize(w, spec))`` (and put back afterwards).
  The float model's KL is 0, so this is the increase. Hidden states entering every decoder layer
  are cached from one float pass, so a module in layer ``i`` re-runs only layers ``i..N-1``, the
  final norm and the head (the embedding re-runs everything, lm_head only the head). All ``n``
  sequences run as one batch.
- ``proxy`` (no extra forward passes): relative output error of the module on its own inputs
  captured in the float pass, ``||X (W_q - W)^T||_F^2 / ||X W^T||_F^2``. The embedding weights
  its rows by how often the calibration tokens pick them; a tied embedding (the model has no
  ``lm_head``: the embedding is the head too) adds the head's relative output error on the final
  normed hidden states, so that it is not priced as an input table only; switch (expert) linears, whose inputs
  are routed, fall back to the plain weight error ``||W_q - W||_F^2 / ||W||_F^2``.

Stored bits per spec come from the real packing (:func:`~mlx_dupq.quant.bitpack.pack` and
:func:`~mlx_dupq.quant.bpw.tensor_bits`), so codes, scales and biases (including the implied
symmetric bias mlx's format must store) all count; tensors that are not quantized (norms,
linear biases, modules the recipe keeps in float) count at the recipe's storage dtype in
``fixed_bits``. ``n_params`` is the float model's parameter count, as in a pack's bits/weight.

Rotation: a recipe with a ``[rotation]`` quantizes rotated weights, so measure a rotated copy
(:func:`rotate_float_model`, same logits): a module wrapped for its run-time rotation
(``<path>.linear`` inside a ``RotatedInput``) is reported under ``<path>``, as the recipe names it.
The measurement always rounds to nearest; a GPTQ recipe's real error is smaller, so the table ranks
modules rather than predicting the converted model's loss.

Cost (``kl``): one full float pass plus, per module and spec, the tail of the network from that
module's layer. SmolLM2-135M, 4 x 128 tokens, 2 CPU cores (timed pieces, extrapolated, not a full
run): full forward 3.7 s, head only (49k-vocab lm_head + KL) 1.5 s, from layer 15 2.2 s, from
layer 0 3.0 s; 211 modules -> about 8 min per candidate bit width, ~32 min for (2, 3, 4, 8). The
head dominates, so the cost is linear in ``n * L``: 2 x 128 tokens about halves it. ``proxy``
alone costs one float pass plus one small matmul per module and spec (seconds).
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..adapter import LAYER_RE, LayerTail, build_skeleton, layer_index, module_kind
from ..config import LM_HEAD_PATTERN, Recipe
from ..errors import DupqError
from ..layers.online_rotation import RotatedInput, apply_online_rotations
from ..metrics import mean_kl
from ..quant.methods import fake_quantize
from ..rotation.plan import EMBED_GROUP, plan_rotation
from ..specs import QuantSpec, parse_bits, parse_group_size

DEFAULT_BITS = (2, 3, 4, 8)
MEASURES = ("kl", "proxy")
Progress = Callable[[str, int, int], None]  # (message, done, total)


@dataclass
class Sensitivity:
    """The sensitivity table and the size accounting an allocation needs.

    kl, proxy:    {path: {spec label: delta}} (``proxy`` empty when not measured, ``kl`` likewise)
    bits:         {path: {spec label: stored bits of that module's weight at that spec}}
    specs:        {spec label: QuantSpec} for every label used above
    params:       {path: float parameters of the module's weight}
    fixed_bits:   stored bits of every other tensor (norms, linear biases, float-kept modules)
    n_params:     all float parameters of the model (the bits/weight denominator)
    tokens:       calibration tokens used (n * L); seconds: wall time of the measurement
    """

    kl: dict[str, dict[str, float]]
    proxy: dict[str, dict[str, float]]
    bits: dict[str, dict[str, int]]
    specs: dict[str, QuantSpec]
    params: dict[str, int]
    fixed_bits: int
    n_params: int
    tokens: int = 0
    seconds: float = 0.0
    dtype: str = "float16"
    extra: dict = field(default_factory=dict)

    def table(self, measure: str = "kl") -> dict[str, dict[str, float]]:
        """{path: {label: delta}} of ``measure`` (``kl`` or ``proxy``)."""
        if measure not in MEASURES:
            raise DupqError(f"unknown sensitivity measure {measure!r}; use one of {', '.join(MEASURES)}")
        t = getattr(self, measure)
        if not t:
            raise DupqError(f"the sensitivity table has no {measure!r} measure; measure it with measures=({measure!r},)")
        return t

    def stored_spec(self, path: str, label: str) -> QuantSpec:
        """The spec module ``path`` is stored at for candidate ``label``: a group size that does not
        divide its rows falls back to a smaller one (:meth:`QuantSpec.fit`; 128 -> 64 on SmolLM2's
        576-wide rows), as the packer and the measured bits do. Tables written before the widths
        were recorded give the candidate as it is."""
        width = self.extra.get("widths", {}).get(path)
        return self.specs[label] if width is None else self.specs[label].fit(width)

    def bpw(self, choice: dict[str, str]) -> float:
        """All-in bits per weight when module ``path`` is stored at spec label ``choice[path]``."""
        return (self.fixed_bits + sum(self.bits[p][choice[p]] for p in self.bits)) / self.n_params

    def to_dict(self) -> dict:
        return {
            "kl": self.kl, "proxy": self.proxy, "bits": self.bits,
            "specs": {k: s.to_dict() for k, s in self.specs.items()},
            "params": self.params, "fixed_bits": self.fixed_bits, "n_params": self.n_params,
            "tokens": self.tokens, "seconds": self.seconds, "dtype": self.dtype, "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Sensitivity":
        d = dict(d)
        d["specs"] = {k: QuantSpec.from_dict(s) for k, s in d["specs"].items()}
        return cls(**d)


# ------------------------------------------------------------------------------ pure helpers


def candidate_specs(base: QuantSpec, bits=DEFAULT_BITS) -> list[QuantSpec]:
    """``base`` with each of ``bits``: a bit width (group size and symmetry kept), a pair
    ``(bits, group_size)`` (symmetry kept), e.g. ``(3, 128), (2, 64)``, or a whole
    :class:`~mlx_dupq.specs.QuantSpec` taken as it is (e.g. ternary, groups of 128, symmetric)."""
    out = []
    for b in bits:
        if isinstance(b, QuantSpec):
            out.append(b)
        elif isinstance(b, (tuple, list)):
            out.append(dataclasses.replace(base, bits=b[0], group_size=b[1]))
        else:
            out.append(dataclasses.replace(base, bits=b))
    return out


def _candidates_json(bits) -> list:
    """Candidates as JSON: bit widths, [bits, group size] pairs, or spec dicts."""
    return [b.to_dict() if isinstance(b, QuantSpec) else [float(b[0]), int(b[1])] if isinstance(b, (tuple, list))
            else float(b) for b in bits]


def parse_candidates(text: str) -> tuple:
    """``"2,3,4,8"`` or ``"2:64,3:128"`` (bits[:group size]) -> candidates for :func:`candidate_specs`."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        b, _, g = item.partition(":")
        out.append((parse_bits(b), parse_group_size(g)) if g else parse_bits(b))
    if not out:
        raise DupqError(f"no candidate bit widths in {text!r}; write e.g. 2,3,4,8 or 2:64,3:128 (bits:group size)")
    return tuple(out)


def relative_output_error(w: mx.array, w_hat: mx.array, x: mx.array | None = None,
                          hessian: mx.array | None = None, row_weights: mx.array | None = None) -> float:
    """Relative output error of a quantized weight; w, w_hat (..., out, in).

    x (T, in): ``||x dW^T||^2 / ||x W^T||^2``; hessian (in, in) = x^T x: the same via traces;
    row_weights (out,): rows weighted (an embedding's token counts); none: ``||dW||^2 / ||W||^2``.
    """
    w = w.astype(mx.float32)
    d = w_hat.astype(mx.float32) - w
    if x is not None:
        x = x.astype(mx.float32)
        num, den = mx.sum(mx.square(x @ d.T)), mx.sum(mx.square(x @ w.T))
    elif hessian is not None:
        num, den = mx.sum((d @ hessian) * d), mx.sum((w @ hessian) * w)
    elif row_weights is not None:
        r = row_weights.astype(mx.float32)
        num, den = mx.sum(r * mx.sum(mx.square(d), axis=-1)), mx.sum(r * mx.sum(mx.square(w), axis=-1))
    else:
        num, den = mx.sum(mx.square(d)), mx.sum(mx.square(w))
    den = den.item()
    return float(num.item() / den) if den > 0 else 0.0


def recipe_paths(model: nn.Module) -> dict[str, str]:
    """{module path: the path a recipe names it by}: ``<p>.linear`` inside a RotatedInput is ``<p>``."""
    mods = dict(model.named_modules())
    out = {}
    for p in mods:
        outer = p[: -len(".linear")]
        out[p] = outer if p.endswith(".linear") and isinstance(mods.get(outer), RotatedInput) else p
    return out


def quantizable_modules(model: nn.Module, recipe: Recipe) -> dict[str, tuple[nn.Module, str, QuantSpec]]:
    """{path (as the recipe names it): (module, kind, the recipe's spec)} of every module ``recipe`` quantizes."""
    names = recipe_paths(model)
    out = {}
    for path, m in model.named_modules():
        kind = module_kind(m)
        spec = recipe.spec_for(names[path]) if kind else None
        if spec is not None and "weight" in m and not isinstance(m, nn.QuantizedLinear):
            out[names[path]] = (m, kind, spec)
    return out


def rotate_float_model(model: nn.Module, config: dict, spec, consume: bool = False) -> nn.Module:
    """A new float model: ``model`` (an mlx-lm llama/qwen model, ``config`` its config.json dict) with
    rotation ``spec`` folded in as the converter folds it and the run-time rotations installed.

    Computes the same logits; its weights are the rotated ones a recipe with ``spec`` quantizes. A
    tied head that the rotation unties is stored (its bits count) but is not a parameter of the
    source model: ``source_n_params`` (set on the returned model) keeps the source's count, the
    bits/weight denominator a pack uses.

    ``consume``: the caller gives ``model`` up (it is left without weights): each layer's float
    weights are freed as soon as its rotated ones exist, so the peak is one model plus one layer
    rather than two (Qwen2.5-Coder-0.5B in float32: 2.4 GB each, bench/source_memory.py).
    """
    weights = dict(tree_flatten(model.parameters()))
    plan = plan_rotation(spec, config, list(weights), lambda k: weights[k].astype(mx.float32))
    dtype = next(iter(weights.values())).dtype
    n_params = sum(int(v.size) for v in weights.values())
    groups: dict[str, dict[str, mx.array]] = {}
    for k, v in weights.items():
        i = layer_index(k)
        groups.setdefault(EMBED_GROUP if i is None else f"layer.{i}", {})[k] = v
    if consume:
        model.update(tree_map(lambda _: mx.zeros((0,)), model.parameters()))
    del weights
    folded: dict[str, mx.array] = {}
    for name in list(groups):
        g = groups.pop(name)
        f = g if name == EMBED_GROUP and plan.partial else plan.fold_group(name, g)
        f = {k: v.astype(dtype) for k, v in f.items()}
        mx.eval(f)  # group by group: with ``consume`` the group's float weights go here
        folded.update(f)
        del g, f
    out = build_skeleton({**config, **plan.config_update})
    out.eval()
    out.load_weights(list(folded.items()), strict=True)
    apply_online_rotations(out, plan.online)
    mx.eval(out.parameters())
    out.source_n_params = n_params
    return out


# ------------------------------------------------------------------------------ forward passes


def _start_layer(path: str, kind: str) -> int | None:
    """First decoder layer a module affects (None: the embedding, i.e. everything)."""
    m = LAYER_RE.search(path)
    if m:
        return int(m.group(1))
    if kind == "embedding":
        return None
    return -1  # lm_head: only the head, after the last layer


class _Inputs:
    """Inputs seen in one forward pass, by array identity (q/k/v share one input: stored once)."""

    def __init__(self):
        self.arrays: dict[int, tuple[mx.array, mx.array]] = {}


class _Capture(nn.Module):
    """Wraps a linear and records which input it got."""

    def __init__(self, inner: nn.Module, store: _Inputs):
        super().__init__()
        self.inner = inner
        self._store = store
        self._key = None

    def __call__(self, x: mx.array) -> mx.array:
        key = id(x)
        if key not in self._store.arrays:  # keep x alive so that its id is not reused
            self._store.arrays[key] = (x, x.reshape(-1, x.shape[-1]).astype(mx.float32))
        self._key = key
        return self.inner(x)


def _forward_capturing(model: nn.Module, tokens: mx.array, paths: list[str]) -> tuple[mx.array, dict[str, mx.array]]:
    """Float logits (n, L, V) and {path: inputs (n*L, in)} of the nn.Linear modules at ``paths``
    (recipe paths, see :func:`recipe_paths`)."""
    store = _Inputs()
    mods = dict(model.named_modules())
    real = {name: p for p, name in recipe_paths(model).items()}
    caps = {real[p]: (p, _Capture(mods[real[p]], store)) for p in paths if isinstance(mods[real[p]], nn.Linear)}
    if caps:
        model.update_modules(tree_unflatten([(r, c) for r, (_, c) in caps.items()]))
    try:
        logits = model(tokens)
        mx.eval(logits)
    finally:
        if caps:
            model.update_modules(tree_unflatten([(r, c.inner) for r, (_, c) in caps.items()]))
    inputs = {p: store.arrays[c._key][1] for p, c in caps.values() if c._key is not None}
    mx.eval(list(inputs.values()))
    return logits, inputs


def _tied_head_states(model: nn.Module, tokens: mx.array) -> mx.array | None:
    """Final normed hidden states (n*L, hidden) when the embedding is also the head (no ``lm_head``
    module: mlx-lm's tied models end with ``model.embed_tokens.as_linear(model.model(x))``), else None."""
    if any(re.search(LM_HEAD_PATTERN, p) for p, _ in model.named_modules()) or not hasattr(model, "model"):
        return None
    h = model.model(tokens)
    h = h.reshape(-1, h.shape[-1]).astype(mx.float32)
    mx.eval(h)
    return h


# ------------------------------------------------------------------------------ the measurement


def measure_sensitivity(
    model: nn.Module,
    tokens: mx.array,
    recipe: Recipe | None = None,
    bits=DEFAULT_BITS,
    measures=MEASURES,
    progress: Progress | None = None,
    *,
    only: str | None = None,
    path_bits: dict[str, tuple] | None = None,
) -> Sensitivity:
    """Measure every quantizable module of the float ``model`` at each candidate bit width.

    model:   an mlx-lm float model (e.g. ``mlx_dupq.load(MODEL)[0]``); its weights are swapped one
             module at a time and always restored.
    tokens:  (n, L) int calibration tokens (e.g. ``calibration_batches(tok, text, 4, 128, 0)``).
    recipe:  base recipe: which modules are quantized, their group size / symmetry, storage dtype.
    bits:    candidate bit widths (or (bits, group_size) pairs); each module is measured at its
             recipe spec with these bits (and group size).
    measures: any of ``kl`` (end-to-end, one tail forward per module and spec) and ``proxy``.
    only:    path regex: measure only these modules; the others stay at the recipe's spec, their
             packed size counted in ``fixed_bits`` (e.g. keep a ternary embedding and head fixed).
    path_bits: {path regex: candidates}: the modules whose path matches (the first matching regex)
             are measured at these candidates instead of ``bits`` (e.g. ternary for the embedding
             and head only).
    """
    t0 = time.perf_counter()
    recipe = recipe or Recipe()
    measures = tuple(measures)
    for m in measures:
        if m not in MEASURES:
            raise DupqError(f"unknown sensitivity measure {m!r}; use one of {', '.join(MEASURES)}")
    if tokens.ndim != 2:
        raise DupqError(f"calibration tokens must be (n, L), got shape {tuple(tokens.shape)}")
    storage = getattr(mx, recipe.dtype)
    dtype_bits = 8 * storage.size
    say = progress or (lambda *a: None)
    model.eval()

    mods = quantizable_modules(model, recipe)
    if not mods:
        raise DupqError("the model has no module the recipe quantizes; check the recipe's rules")
    kept = {p: v for p, v in mods.items() if only is not None and not re.search(only, p)}
    mods = {p: v for p, v in mods.items() if p not in kept}
    if not mods:
        raise DupqError(f"no quantized module matches --only {only!r}; check the pattern against the module paths")
    params = dict(tree_flatten(model.parameters()))
    # the source model's count (a rotated model's untied head is stored, not a source parameter)
    n_params = getattr(model, "source_n_params", None) or sum(int(v.size) for v in params.values())
    real = {name: p for p, name in recipe_paths(model).items()}
    weight_keys = {f"{real[p]}.weight" for p in list(mods) + list(kept)}
    fixed_bits = sum(
        (dtype_bits * int(v.size) if mx.issubdtype(v.dtype, mx.floating) else 8 * int(v.nbytes))
        for k, v in params.items() if k not in weight_keys
    )
    for path, (mod, _, spec) in kept.items():  # the modules not allocated, at the recipe's spec
        fixed_bits += fake_quantize(mod.weight, spec, storage)[1]

    say("float pass", 0, len(mods))
    ref_logits, inputs = _forward_capturing(model, tokens, list(mods) if "proxy" in measures else [])
    ref_logp = ref_logits.astype(mx.float32)
    ref_logp = ref_logp - mx.logsumexp(ref_logp, axis=-1, keepdims=True)
    mx.eval(ref_logp)
    tail = LayerTail(model, tokens, ref_logits) if "kl" in measures else None
    del ref_logits
    counts = None
    if any(kind == "embedding" for _, kind, _ in mods.values()):
        counts = mx.zeros((int(params[next(f"{p}.weight" for p, (_, k, _) in mods.items() if k == "embedding")].shape[0]),))
        counts = counts.at[tokens.reshape(-1)].add(1.0)
    head_states = _tied_head_states(model, tokens) if counts is not None and "proxy" in measures else None

    kl: dict[str, dict[str, float]] = {}
    proxy: dict[str, dict[str, float]] = {}
    bits_table: dict[str, dict[str, int]] = {}
    specs: dict[str, QuantSpec] = {}
    sizes: dict[str, int] = {}
    widths: dict[str, int] = {}  # row width: a group size that does not divide it is stored smaller (QuantSpec.fit)
    for i, (path, (mod, kind, base)) in enumerate(mods.items()):
        say(f"measuring {path}", i, len(mods))
        w = mod.weight
        sizes[path] = int(w.size)
        widths[path] = int(w.shape[-1])
        kl[path], proxy[path], bits_table[path] = {}, {}, {}
        cands = next((c for pat, c in (path_bits or {}).items() if re.search(pat, path)), bits)
        for spec in candidate_specs(base, cands):
            label = spec.label()
            specs[label] = spec
            w_hat, nbits = fake_quantize(w, spec, storage)
            mx.eval(w_hat)
            bits_table[path][label] = nbits
            if "proxy" in measures:
                if path in inputs:
                    proxy[path][label] = relative_output_error(w, w_hat, x=inputs[path])
                elif kind == "embedding":
                    proxy[path][label] = relative_output_error(w, w_hat, row_weights=counts)
                    if head_states is not None:  # a tied embedding is the head too: its error enters twice
                        proxy[path][label] += relative_output_error(w, w_hat, x=head_states)
                else:
                    proxy[path][label] = relative_output_error(w, w_hat)
            if "kl" in measures:
                start = _start_layer(path, kind)
                if start == -1 and tail.hidden is not None:
                    start = len(tail.inner.layers)
                mod.weight = w_hat
                try:
                    kl[path][label] = mean_kl(ref_logp, tail.logits_from(start))
                finally:
                    mod.weight = w
            del w_hat
    say("done", len(mods), len(mods))
    return Sensitivity(
        kl=kl if "kl" in measures else {},
        proxy=proxy if "proxy" in measures else {},
        bits=bits_table, specs=specs, params=sizes, fixed_bits=int(fixed_bits), n_params=int(n_params),
        tokens=int(tokens.size), seconds=time.perf_counter() - t0, dtype=recipe.dtype,
        extra={"bits": _candidates_json(bits),
               "path_bits": {pat: _candidates_json(c) for pat, c in (path_bits or {}).items()},
               "measures": list(measures), "only": only, "kept": sorted(kept),
               "tail_cached": bool(tail is not None and tail.hidden is not None), "widths": widths},
    )


def planned_kl(model: nn.Module, tokens: mx.array, recipe: Recipe) -> float:
    """Mean per-token KL(p_float || p_q) of the final logits when EVERY module ``recipe`` quantizes is
    rounded to nearest at the recipe's spec for it at once (one float and one quantized forward pass;
    the weights are put back afterwards). Ranks whole plans (e.g. two allocations of different
    models of the same logits) where summed per-module sensitivities are not comparable."""
    if tokens.ndim != 2:
        raise DupqError(f"calibration tokens must be (n, L), got shape {tuple(tokens.shape)}")
    model.eval()
    storage = getattr(mx, recipe.dtype)
    ref = model(tokens).astype(mx.float32)
    ref_logp = ref - mx.logsumexp(ref, axis=-1, keepdims=True)
    mx.eval(ref_logp)
    del ref
    mods = quantizable_modules(model, recipe)
    saved = {}
    try:
        for path, (mod, _, spec) in mods.items():
            saved[path] = mod.weight
            mod.weight = fake_quantize(mod.weight, spec, storage)[0]
            mx.eval(mod.weight)
        return mean_kl(ref_logp, model(tokens))
    finally:
        for path, w in saved.items():
            mods[path][0].weight = w
