"""A whole model quantized with a duplication plan in memory (experiments and search; no pack written).

:func:`quantize_with_plan` runs the same machinery as a pack: every decoder ``nn.Linear`` goes
through the copy engine (:func:`~mlx_dupq.dup.runtime.duplicate_linears`; layers outside the
plan are one plain RTN copy), serial plans through
:func:`~mlx_dupq.dup.runtime.duplicate_layers`, and the embedding / lm_head are mlx-quantized at
``embed``. :func:`stored_bits` counts what a pack would store (every copy, shared codes once,
float tensors at 16 bits), so ``bits / n_params`` is the pack's all-in bits per weight.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..specs import QuantSpec
from ..input_stats import advance, layer_input_hessians
from ..errors import DupqError
from .runtime import duplicate_layers, duplicate_linears, layer_owner, quantized_layer_copies
from .specs import CopySpec, DupPlan

EMBED_SPEC = QuantSpec(bits=8, group_size=64, symmetric=False)


def stored_bits(model: nn.Module, float_bits: int = 16) -> int:
    """Bits a pack stores for ``model``: each distinct array once, floating ones at ``float_bits``
    per element (the pack's storage dtype), quantized codes / fp16 scales as they are."""
    seen, bits = set(), 0
    for _, a in tree_flatten(model.parameters()):
        if id(a) in seen:
            continue
        seen.add(id(a))
        bits += a.size * float_bits if a.dtype == mx.float32 else a.nbytes * 8
    return bits


def quantize_with_plan(model: nn.Module, plan: DupPlan | None, base: QuantSpec,
                       embed: QuantSpec | None = EMBED_SPEC, dtype: mx.Dtype = mx.float16,
                       hessians: dict[int, dict[str, mx.array]] | None = None) -> int:
    """Quantize the float ``model`` in place with ``plan`` (None: one copy per layer); returns its stored bits.

    Parallel aggregations other than the mean are fitted on calibration inputs: pass ``hessians``
    ({layer: {path in the layer: X^T X}}, e.g. from :func:`float_hessians`) for the planned layers.
    """
    n = len(layer_owner(model).layers)
    mode = plan.mode if plan is not None else "parallel"
    if plan is not None and plan.mode == "parallel" and plan.aggregation != "mean" and hessians is None:
        raise DupqError(f"aggregation {plan.aggregation!r} is fitted on calibration data; pass hessians "
                        "(dup.build.float_hessians) or convert with a calibrated quantizer")
    if plan is not None:
        plan = plan.resolve(n)
    copies = {k: [CopySpec()] for k in range(n)}
    if plan is not None:
        copies.update({k: list(cs) for k, cs in plan.copies.items()})
    full = DupPlan(mode=mode, copies=copies, aggregation="mean" if plan is None else plan.aggregation,
                   early_stop=None if plan is None else plan.early_stop,
                   max_copies=None if plan is None else plan.max_copies)
    if mode == "serial":
        duplicate_layers(model, full, quantized_layer_copies(base, dtype))
    else:
        duplicate_linears(model, full, base, dtype, hessians)
    if embed is not None:
        nn.quantize(model, embed.group_size, int(embed.bits),
                    class_predicate=lambda p, m: isinstance(m, nn.Embedding) or p.endswith("lm_head"))
    return stored_bits(model)


def float_hessians(model: nn.Module, tokens: mx.array, layers: list[int]) -> dict[int, dict[str, mx.array]]:
    """{layer: {linear path in the layer: X^T X}} of the float ``model``'s own inputs to each linear of
    ``layers`` on calibration ``tokens`` (n, L): the statistics :func:`quantize_with_plan` fits
    aggregation weights on. Float inputs throughout (no quantized predecessors, unlike the converter)."""
    owner = layer_owner(model)
    h = owner.embed_tokens(tokens).astype(mx.float32)
    want, out = set(layers), {}
    for k, layer in enumerate(owner.layers[: max(want) + 1] if want else []):
        if k in want:
            out[k] = {p: st.hessian * st.tokens for p, st in layer_input_hessians(layer, h).items()}
        h = advance(layer, h)
    return out
