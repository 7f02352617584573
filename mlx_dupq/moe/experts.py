"""Simulated (fake) quantization of experts and routers of a float MoE model, for the studies.

The studies change one thing at a time (one layer's experts, one router, one rotation) and measure;
packing every variant would cost a conversion each. Instead the float model's weights are replaced
by their dequantized values -- the same numbers a pack's layers compute with -- and restored after:

    snap = snapshot(model)
    fake_quantize_experts(block, [QuantSpec(2), QuantSpec(4), ...])      # per-expert widths
    fake_quantize_experts(block, specs, rotation="hadamard")            # rotated experts
    fake_quantize_experts(block, specs, copies={e: 2})                  # residual expert copies
    ...
    restore(model, snap)

Copies reuse the duplication engine (:func:`mlx_dupq.dup.copies.make_copies`, residual mode:
copy k quantizes what copies < k left over, the outputs add), per linear of the expert, exactly as
``DupLinear`` runs them. Rotations act on each projection's input (``Q(W R) R^T``, an online
rotation at run time), like a copy's rotation in the dense path.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..specs import QuantSpec
from ..quant.qtensor import dequantize
from ..quant.rtn import rtn_quantize
from ..rotation import Rotation, make_rotation
from ..rotation.hadamard import hadamard_supported
from .routing import MoEBlock
from ..dup.copies import effective_weight, make_copies
from ..dup.specs import CopySpec

PROJS = ("gate_proj", "up_proj", "down_proj")


def snapshot(model: nn.Module) -> dict[str, mx.array]:
    """All parameters (references; mlx arrays are immutable, so this is cheap)."""
    return dict(tree_flatten(model.parameters()))


def restore(model: nn.Module, snap: dict[str, mx.array]) -> None:
    model.load_weights(list(snap.items()), strict=False)


def fake_quant(w: mx.array, spec: QuantSpec) -> mx.array:
    """(..., in) float -> dequantized RTN weight, float32 (fp16 scales, like a pack)."""
    return dequantize(rtn_quantize(w.astype(mx.float32), spec.fit(w.shape[-1]), mx.float16))


def rotated_fake_quant(w: mx.array, spec: QuantSpec, rot: Rotation) -> mx.array:
    """(out, in) -> ``Q(W R) R^T``: the weight an online-rotated quantized linear computes with."""
    return fake_quant(rot.apply(w.astype(mx.float32)), spec) @ rot.matrix().T


def copies_fake_quant(w: mx.array, spec: QuantSpec, n: int, rot: Rotation | None = None) -> mx.array:
    """(out, in) -> sum of ``n`` residual copies' effective weights (the dup engine's residual mode),
    all in the basis rotated by ``rot`` (``(sum_k Q_k) R^T``)."""
    w = w.astype(mx.float32)
    target = w if rot is None else rot.apply(w)
    qts = make_copies(target, spec.fit(w.shape[-1]), [CopySpec() for _ in range(n)], mx.float16, residual=True)
    total = sum(effective_weight(q, None) for q in qts)
    return total if rot is None else total @ rot.matrix().T


def expert_rotation(kind: str, n: int, seed: int = 0) -> Rotation:
    return make_rotation({"kind": kind, "seed": seed}, n)


def simulated_rotation(kind: str, n: int) -> Rotation:
    """The rotation a simulated treatment uses: :func:`expert_rotation`, except that ``hadamard`` on a
    width with no Hadamard transform (SmolLM2's 576 = 9 x 64) is the block Hadamard with the largest
    block that tiles it (192). Packs stay strict (``[moe] rotation`` names the kind that fits)."""
    if kind == "hadamard" and not hadamard_supported(n):
        kind = "block_hadamard"
    return expert_rotation(kind, n)


def fake_quantize_experts(block: MoEBlock, specs: list[QuantSpec | None], *, rotation: str | dict | None = None,
                          copies: dict[int, int] | None = None) -> None:
    """Replace the float expert weights of ``block`` by their quantized values, in place.

    specs[e]: expert e's spec (None: keep float); rotation: a rotation kind ("hadamard",
    "block_hadamard", ...) or {proj: Rotation} for each projection's input; copies {e: n}: expert e
    as ``n`` residual copies (n >= 2) at its spec.
    """
    sw = block.switch
    for p in PROJS:
        if p not in sw:
            continue
        w = sw[p]["weight"].astype(mx.float32)
        n_in = w.shape[-1]
        rot = None
        if isinstance(rotation, str):
            rot = simulated_rotation(rotation, n_in)
        elif isinstance(rotation, dict):
            rot = rotation.get(p)
        rows = []
        for e, spec in enumerate(specs):
            if spec is None:
                rows.append(w[e])
            elif copies and copies.get(e, 1) > 1:
                rows.append(copies_fake_quant(w[e], spec, copies[e], rot))
            elif rot is not None:
                rows.append(rotated_fake_quant(w[e], spec, rot))
            else:
                rows.append(fake_quant(w[e], spec))
        new = mx.stack(rows).astype(sw[p]["weight"].dtype)
        mx.eval(new)
        sw[p]["weight"] = new


def fake_quantize_shared(block: MoEBlock, spec: QuantSpec | None, copies: int = 1, rotation: str | None = None) -> None:
    """The shared expert's linears at ``spec`` (``copies`` residual copies, optional input rotation kind), in place."""
    if block.shared is None or spec is None:
        return
    mlp = block.block[block.shared]
    for p in PROJS:
        w = mlp[p]["weight"]
        rot = None if rotation is None else simulated_rotation(rotation, w.shape[-1])
        if copies > 1:
            new = copies_fake_quant(w, spec, copies, rot)
        else:
            new = fake_quant(w, spec) if rot is None else rotated_fake_quant(w, spec, rot)
        mlp[p]["weight"] = new.astype(w.dtype)


def fake_quantize_router(block: MoEBlock, bits: float | None, group_size: int = 64) -> None:
    """The router weight (E, hidden) at ``bits`` (RTN, asymmetric, groups along hidden), in place."""
    if bits is None:
        return
    g = block.gate
    g["weight"] = fake_quant(g["weight"], QuantSpec(bits, group_size)).astype(g["weight"].dtype)


def fake_quantize_dense(model: nn.Module, spec: QuantSpec, skip_experts: bool = True) -> None:
    """Every nn.Linear outside the MoE experts and routers (attention, dense MLPs, shared experts,
    lm_head) at ``spec``, in place; the embedding stays float."""
    for path, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not path.endswith(("gate", "shared_expert_gate")):
            mod["weight"] = fake_quant(mod["weight"], spec).astype(mod["weight"].dtype)
