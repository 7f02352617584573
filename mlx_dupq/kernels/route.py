"""Where the layers hand their matmuls to the custom kernels (see docs/kernels.md, "Layers").

Rule, in one place: a layer uses a kernel only when the backend in use runs custom kernels
(:func:`~mlx_dupq.kernels.dispatch.custom_active`: metal, cuda, or the CPU harness when forced)
*and* the input has at most :data:`DECODE_MAX_ROWS` rows (decode, small batch) *and* the
kernel passed its self-check for that configuration (:func:`~mlx_dupq.kernels.dispatch.accepts`).
Otherwise each function returns None and the layer keeps its own mlx path
(``mx.quantized_matmul``), which is also the fastest decode path mlx offers on the CPU.

- :func:`linear`: a :class:`~mlx_dupq.layers.quant_linear.DupqLinear` (our formats) -> ``qmv``;
- :func:`copies`: all copies of a :class:`~mlx_dupq.layers.dup_linear.DupLinear` in one pass over
  x (parallel mean / scalar mix, residual sum) -> ``multi_copy_qmv``;
- :func:`rotated`: a :class:`~mlx_dupq.layers.online_rotation.RotatedInput` whose rotation is a
  (randomized) Hadamard -> ``hadamard_qmv`` (the rotation fused with the matmul);
- :func:`switch`: an MoE switch layer, one bit width per expert -> ``gather_qmv``.

The kernel layout (:class:`~mlx_dupq.kernels.layout.KernelPack`) is built from the modules'
stored arrays on first use and cached on the owning module; it is rebuilt when a stored array
is replaced (``load_weights`` / ``update``). A single layer's pack reuses its stored buffers;
a DupLinear's copies are concatenated once and then re-pointed at their slices of the
concatenation (:func:`share_codes`), so their codes are held once; a switch layer's experts are
concatenated (one more copy of their codes while the kernels are in use).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from . import dispatch, ops
from .layout import KernelPack, kernel_pack, split_stacked

DECODE_MAX_ROWS = 8


def wants_kernel(x: mx.array) -> bool:
    """Input (..., in) small enough for the decode kernels, and a custom backend in use."""
    return x.size <= DECODE_MAX_ROWS * x.shape[-1] and dispatch.custom_active()


def packed(module: nn.Module) -> tuple[dict, dict] | None:
    """(arrays, entry) of a packed linear's weight (DupqLinear, or mlx's affine QuantizedLinear;
    any bias is left out), else None. Our layers say what they are by ``packed_kind`` (this layer
    sits below :mod:`mlx_dupq.layers`, so it does not import their classes)."""
    if getattr(module, "packed_kind", None) == "linear":
        return module._stored(), module.entry
    if isinstance(module, nn.QuantizedLinear) and getattr(module, "mode", "affine") == "affine":
        out, words = module.weight.shape
        entry = {"format": "mlx", "bits": module.bits, "group_size": module.group_size, "symmetric": False,
                 "shape": [out, words * 32 // module.bits]}
        return {k: module[k] for k in ("weight", "scales", "biases")}, entry
    return None


def _cached(owner: nn.Module, arrays: list[mx.array], build) -> KernelPack | None:
    """``build()`` cached on ``owner`` while ``arrays`` (the stored arrays it reads) stay the same objects."""
    cache = getattr(owner, "_kernel_pack", None)
    if cache is not None and len(cache[0]) == len(arrays) and all(p is q for p, q in zip(cache[0], arrays)):
        return cache[1]
    kp = build()
    object.__setattr__(owner, "_kernel_pack", (arrays, kp))
    return kp


def cached_pack(owner: nn.Module, layers: list[tuple[dict, dict]]) -> KernelPack | None:
    """The KernelPack of ``layers`` cached on ``owner`` (None when rows are not a multiple of 32)."""
    return _cached(owner, [v for a, _ in layers for v in a.values()],
                   lambda: kernel_pack(layers) if layers[0][1]["shape"][-1] % 32 == 0 else None)


def linear(module: nn.Module, x: mx.array) -> mx.array | None:
    """``x @ W.T`` of a DupqLinear (no bias) through ``qmv``, or None (use the mlx path)."""
    if not wants_kernel(x):
        return None
    kp = cached_pack(module, [(module._stored(), module.entry)])
    if kp is None or not dispatch.accepts(x, kp, 1, True):
        return None
    return ops.qmv(x, kp)


def copies(dup: nn.Module, x: mx.array) -> mx.array | None:
    """All copies of a DupLinear in one pass (no bias), or None when they cannot run as one kernel
    (copies wrapped in rotations/activation quantizers, per-channel (K, out) mixes, non-affine)."""
    if not wants_kernel(x):
        return None
    layers = [None if "bias" in c else packed(c) for c in dup.copies]
    if any(p is None for p in layers) or len({tuple(e["shape"]) for _, e in layers}) != 1:
        return None
    k = len(layers)
    if dup.mode == "residual":
        weights = mx.ones((k,))
    elif "mix" not in dup:
        weights = mx.full((k,), 1.0 / k)
    elif dup["mix"].ndim == 1:
        weights = dup["mix"]
    else:
        return None
    before = getattr(dup, "_kernel_pack", None)
    kp = cached_pack(dup, layers)
    if kp is not None and getattr(dup, "_kernel_pack") is not before:  # built just now
        share_codes(dup.copies, kp)
        object.__setattr__(dup, "_kernel_pack", ([v for c in dup.copies for v in packed(c)[0].values()], kp))
    if kp is None or not dispatch.accepts(x, kp, k, True):
        return None
    return ops.multi_copy_qmv(x, kp, weights=weights)


def share_codes(modules: list[nn.Module], kp: KernelPack) -> None:
    """Point each packed module's stored codes (and an mlx-format module's scales and offsets) at
    its slice of the concatenated pack: views, so the copies' codes are held once. Ternary bytes
    and our formats' group parameters (stored in a different layout) keep their own arrays."""
    mx.eval(kp.w, kp.scales, kp.biases)
    for e, m in enumerate(modules):
        _, _, woff, soff = (int(v) for v in kp.meta[e].tolist())
        w = m["weight"]
        if w.dtype == mx.uint32:
            m["weight"] = kp.w[woff: woff + w.size].reshape(w.shape)
        if isinstance(m, nn.QuantizedLinear) and m["scales"].dtype == kp.scales.dtype and m.get("biases") is not None:
            n = m["scales"].size
            m["scales"] = kp.scales[soff: soff + n].reshape(m["scales"].shape)
            m["biases"] = kp.biases[soff: soff + n].reshape(m["biases"].shape)


def rotated(wrapper: nn.Module, x: mx.array) -> mx.array | None:
    """``linear(x @ R)`` with R = diag(signs) blockdiag(H) fused into one kernel, or None."""
    rot = wrapper.rotation
    if rot.dense is not None or not rot.block or not wants_kernel(x):
        return None
    lin = wrapper.linear
    layer = packed(lin)
    if layer is None:
        return None
    kp = cached_pack(lin, [layer])
    if kp is None or not dispatch.accepts(x, kp, 1, True, rot.block):
        return None
    signs = mx.ones((rot.size,)) if rot.signs is None else rot.signs
    y = ops.hadamard_qmv(x, kp, signs, rot.block)
    return y + lin["bias"] if "bias" in lin else y


def switch(owner: nn.Module, groups: list[tuple[list[int], dict, dict]], x: mx.array,
           indices: mx.array) -> mx.array | None:
    """An MoE switch layer (mlx-lm's ``SwitchLinear`` call) through ``gather_qmv``, or None.

    groups: ``[(global expert ids, stacked arrays, stacked entry)]`` -- the experts grouped by
    format, each group an (n_g, out, in) pack (one group for a plain switch layer); every expert
    keeps its own bit width in the kernel. x: (..., 1, 1, in) (every slot reads the token's
    input: gate/up) or (..., k, 1, in) (one input per slot: down); indices (..., k) ->
    (..., k, 1, out). The caller adds any bias. None when no custom backend is in use, for
    prefill (more than :data:`DECODE_MAX_ROWS` tokens) or shapes it does not know.
    """
    lead, k = indices.shape[:-1], indices.shape[-1]
    if x.ndim < 3 or x.shape[-2] != 1 or x.shape[-3] not in (1, k) or tuple(x.shape[:-3]) != tuple(lead):
        return None
    tokens = indices.size // k
    if tokens > DECODE_MAX_ROWS or not dispatch.custom_active():
        return None

    def build():
        experts: dict[int, tuple[dict, dict]] = {}
        for ids, a, e in groups:
            experts.update(zip(ids, split_stacked(a, e)))
        layers = [experts[i] for i in range(len(experts))]
        return kernel_pack(layers) if layers[0][1]["shape"][-1] % 32 == 0 else None

    kp = _cached(owner, [v for _, a, _ in groups for v in a.values()], build)
    if kp is None or not dispatch.accepts(x, kp, k if x.shape[-3] == 1 else 1, False):
        return None
    n = x.shape[-1]
    if x.shape[-3] == 1:
        y = ops.gather_qmv(x.reshape(tokens, n), kp, indices.reshape(tokens, k))  # (tokens, k, out)
    else:
        y = ops.gather_qmv(x.reshape(tokens * k, n), kp, indices.reshape(tokens * k, 1))  # (tokens*k, 1, out)
    return y.reshape(*indices.shape, 1, kp.n_out)


def stacked(module: nn.Module) -> dict | None:
    """Stored arrays of a packed switch module (DupqSwitchLinear, mlx-lm's QuantizedSwitchLinear), else None."""
    if getattr(module, "packed_kind", None) == "switch_linear":
        return module._stored()
    if isinstance(module, QuantizedSwitchLinear) and getattr(module, "mode", "affine") == "affine":
        return {k: module[k] for k in ("weight", "scales", "biases")}
    return None


def mixed_groups(module: nn.Module) -> list[tuple[list[int], dict, dict]] | None:
    """The ``groups`` argument of :func:`switch` for a per-expert-width switch layer
    (``MixedSwitchLinear``: ``entry["groups"]`` + one packed switch module per group), else None:
    the layer then runs its own grouped path. None too when the experts are rotated or a group
    stores residual copies (the kernels run one code stack per expert, unrotated)."""
    if module.entry.get("rotation") or any("copies" in g for g in module.entry["groups"]):
        return None
    out = []
    for grp, mod in zip(module.entry["groups"], module.groups):
        arrays = stacked(mod)
        if arrays is None or "bias" in mod:
            return None
        out.append(([int(i) for i in grp["experts"]], arrays, dict(grp["entry"], shape=[len(grp["experts"]),
                                                                                     *module.entry["shape"][1:]])))
    return out
