"""Duplication inside an mlx-lm model: serial decoder-layer copies, parallel/residual linear copies.

Serial (:func:`duplicate_layers`): decoder layer ``k`` with copies ``c_1..c_n`` becomes n
consecutive entries of the model's layer list, ``x -> c_1 -> c_2 -> ...``. Every mlx-lm model
iterates that list together with its cache list (``zip(self.layers, cache)``; qwen2 through
``pipeline_layers``, a slice of it), and ``make_prompt_cache`` makes one cache per
``len(model.layers)``, so each copy gets its own KV-cache slot with nothing else changed: KV
quantization, trimming and prompt-cache saving see ordinary caches. (A composite cache inside
one wrapper module would have to re-implement all of those.) The expanded list is recorded as
``layout(model)``: one ``(layer, copy)`` per entry. Note that serial copies change the
function even in float: the layer (with its residual connection) is applied n times.

Parallel / residual (:func:`duplicate_linears`): every ``nn.Linear`` of a planned decoder layer
becomes a :class:`~mlx_dupq.layers.dup_linear.DupLinear` built by the converter-side functions
(:func:`~mlx_dupq.dup.copies.pack_copies`, :func:`~mlx_dupq.dup.copies.load_copies`,
:func:`~mlx_dupq.dup.aggregate.fit_mix`). Expert (switch) linears are left alone.
"""

from __future__ import annotations

import copy as _copy
import re
from collections.abc import Callable, Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..adapter import layer_owner
from ..errors import DupqError
from ..specs import QuantSpec
from ..layers.dup_linear import DupLinear
from .aggregate import fit_mix
from .copies import copy_rotation, effective_weight, load_copies, make_copies, pack_copies
from .specs import CopySpec, DupPlan

BuildCopies = Callable[[int, nn.Module, Sequence[CopySpec]], list[nn.Module]]
FORMAT_DUP = "dup"  # the pack entry format of a duplicated linear (docs/architecture.md, "Pack formats")
_COPY_KEY_RE = re.compile(r"^(.*)\.copies\.(\d+)\.([^.]+)$")


def layout(model: nn.Module) -> list[tuple[int, int]]:
    """``(original layer, copy index)`` of every entry of the layer list (identity when not duplicated)."""
    owner = layer_owner(model)
    return list(getattr(owner, "_dup_layout", [(i, 0) for i in range(len(owner.layers))]))


def duplicate_layers(model: nn.Module, plan: DupPlan, build_copies: BuildCopies) -> nn.Module:
    """Replace each planned decoder layer by its serial copies (in place; returns ``model``).

    build_copies(k, float_layer, copy_specs) -> the n modules running layer k's copies, each
    callable like a decoder layer ``(x, mask, cache)``. Layers with one copy are replaced by it.
    """
    if plan.mode != "serial":
        raise DupqError(f"duplicate_layers runs serial plans; this plan is {plan.mode} (use duplicate_linears)")
    owner = layer_owner(model)
    old = layout(model)
    if any(c for _, c in old):
        raise DupqError("the model's layers are already duplicated; duplicate a fresh model")
    plan.check(len(owner.layers))
    new_layers, new_layout = [], []
    for k, layer in enumerate(owner.layers):
        specs = plan.copies.get(k)
        mods = [layer] if specs is None else build_copies(k, layer, specs)
        if specs is not None and len(mods) != len(specs):
            raise DupqError(f"build_copies returned {len(mods)} modules for layer {k}'s {len(specs)} copies")
        new_layers.extend(mods)
        new_layout.extend((k, c) for c in range(len(mods)))
    owner.layers = new_layers
    object.__setattr__(owner, "_dup_layout", new_layout)
    return model


def _linears(layer: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(p, m) for p, m in layer.named_modules() if isinstance(m, nn.Linear) and p]


def dup_linear(w: mx.array, bias: mx.array | None, base_spec: QuantSpec, copy_specs: Sequence[CopySpec],
               mode: str = "parallel", aggregation: str = "mean", dtype: mx.Dtype = mx.float16,
               hessian: mx.array | None = None, early_stop: float | None = None,
               max_copies: int | None = None) -> DupLinear:
    """Float linear (w (out, in), bias) -> DupLinear of its quantized copies.

    Aggregations other than the mean need ``hessian`` = ``X^T X`` (in, in) of calibration inputs.
    """
    packed = pack_copies(w, base_spec, copy_specs, dtype, mode)
    mods = load_copies(w.shape, packed)
    mix = None
    if mode == "parallel" and aggregation != "mean" and len(copy_specs) > 1:
        if hessian is None:
            raise DupqError(f"aggregation {aggregation} is fitted on calibration inputs; pass their Hessian X^T X")
        qts = make_copies(w, base_spec, copy_specs, dtype)
        ws = [effective_weight(qt, copy_rotation(c, w.shape[-1])) for qt, c in zip(qts, copy_specs)]
        mix = fit_mix(ws, w, hessian, aggregation)
    return DupLinear(mods, mode, mix=mix, bias=bias, early_stop=early_stop, max_copies=max_copies)


def duplicate_linears(model: nn.Module, plan: DupPlan, base_spec: QuantSpec, dtype: mx.Dtype = mx.float16,
                      hessians: Mapping[int, Mapping[str, mx.array]] | None = None) -> nn.Module:
    """Replace every nn.Linear of each planned layer by a DupLinear (in place; returns ``model``).

    hessians: {layer: {path in the layer (``mlp.down_proj``): X^T X}}, needed for aggregations
    other than the mean (e.g. from :func:`mlx_dupq.input_stats.layer_input_hessians` times its tokens).
    """
    if plan.mode == "serial":
        raise DupqError("serial plans duplicate whole decoder layers; use duplicate_layers")
    owner = layer_owner(model)
    plan.check(len(owner.layers))
    for k, specs in plan.copies.items():
        layer = owner.layers[k]
        new = []
        for path, lin in _linears(layer):
            h = None if hessians is None else hessians.get(k, {}).get(path)
            b = lin["bias"] if "bias" in lin else None
            new.append((path, dup_linear(lin.weight, b, base_spec, specs, plan.mode, plan.aggregation, dtype, h,
                                         plan.early_stop, plan.max_copies)))
        layer.update_modules(tree_unflatten(new))
    return model


def copies_run(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{path: (copies run, calls)} of every DupLinear (dynamic duplication's counter)."""
    return {p: (m.copies_run, m.calls) for p, m in model.named_modules() if isinstance(m, DupLinear)}


def quantized_layer_copies(base_spec: QuantSpec, dtype: mx.Dtype = mx.float16) -> BuildCopies:
    """A ``build_copies`` for serial plans: copy i = the float layer with every nn.Linear quantized by copy i.

    Linears of copy i are rebuilt from :func:`pack_copies` of that linear over all copies of the
    layer, so shared-codes copies really share copy 0's code buffers.
    """

    def build(k: int, layer: nn.Module, specs: Sequence[CopySpec]) -> list[nn.Module]:
        layers = [_copy.deepcopy(layer) for _ in specs]
        for path, lin in _linears(layer):
            mods = load_copies(lin.weight.shape, pack_copies(lin.weight, base_spec, specs, dtype, "parallel"))
            for i, m in enumerate(mods):
                b = lin["bias"] if "bias" in lin else None
                layers[i].update_modules(tree_unflatten([(path, DupLinear([m], bias=b))]))
        return layers

    return build


def serial_index(plan: DupPlan, k: int, copy: int = 0) -> int:
    """Entry of copy ``copy`` of decoder layer ``k`` in a serial plan's expanded layer list."""
    return k + sum(plan.count(j) - 1 for j in plan.copies if j < k) + copy


def expand_serial(model: nn.Module, plan: DupPlan) -> nn.Module:
    """A (skeleton) model's layer list expanded for a serial plan: copy i of layer k is a fresh
    deep copy at :func:`serial_index` (weights to be loaded); each entry gets its own KV-cache slot."""
    return duplicate_layers(model, plan, lambda k, layer, specs: [layer] + [_copy.deepcopy(layer) for _ in specs[1:]])


def load_dup_linear(path: str, entry: dict, weights: dict[str, mx.array]) -> DupLinear:
    """Rebuild the DupLinear at ``path`` from its entry and the pack's tensors.

    ``weights`` is updated in place: the stored copy tensors are replaced by the DupLinear's own
    parameter names, so the model's strict ``load_weights`` afterwards checks everything.
    """
    copies: dict[int, dict[str, mx.array]] = {}
    pre = path + ".copies."
    for key in [k for k in weights if k.startswith(pre)]:
        m = _COPY_KEY_RE.match(key)
        if m and m.group(1) == path:
            copies.setdefault(int(m.group(2)), {})[m.group(3)] = weights.pop(key)
    n = len(entry["copies"])
    if sorted(copies) != list(range(n)):
        raise DupqError(f"{path}: the pack stores copies {sorted(copies)} but config.json lists {n}; convert it again")
    packed = [(copies.get(k, {}), e) for k, e in enumerate(entry["copies"])]
    try:
        mods = load_copies(entry["shape"], packed)
    except (ValueError, KeyError) as e:
        raise DupqError(f"{path}: its copies do not match config.json ({e}); the pack is damaged, convert it again") from None
    mix = weights.pop(f"{path}.mix", None) if entry.get("mix") else None
    if entry.get("mix") and mix is None:
        raise DupqError(f"{path}: config.json says it has aggregation weights but {path}.mix is missing; convert it again")
    layer = DupLinear(mods, entry["mode"], mix=mix, bias=weights.get(f"{path}.bias"),
                      early_stop=entry.get("early_stop"), max_copies=entry.get("max_copies"))
    weights.update({f"{path}.{k}": v for k, v in tree_flatten(layer.parameters())})
    return layer

