"""Copies of one weight: quantize, pack, size, rebuild (the converter's side of duplication).

A converter calls, per linear of a duplicated layer::

    packed = pack_copies(w, base_spec, copy_specs, dtype, mode)   # [(arrays, entry), ...]
    bits   = copy_bits(packed)                                     # honest size of each copy
    mods   = load_copies(w.shape, packed)                          # modules, for DupLinear

and the loader only the last line (``arrays`` from the safetensors, ``entry`` from config.json).

How a copy is quantized (:func:`make_copies`), for a float weight ``W`` (out, in):

1. rotation ``R`` (copy.rotation): the copy quantizes ``W R`` and its module rotates its input at
   run time, ``RotatedInput(linear, R)(x) = (x R)(W R)^T = x W^T``. It is not folded into the
   residual stream: copies of one layer have *different* rotations of the *same* input, so a
   fold would have to rotate the previous layer's output once per copy. Cost per call: one
   (block) Hadamard (O(n log n)) plus, for ``perturbed`` (``H P``), one dense (n, n) product.
2. RTN parameters of ``W R`` (:func:`~mlx_dupq.quant.rtn.rtn_quantize`, copy.quant or the base spec).
3. dequantisation parameters: ``scale_mult`` scales the grid about its centre
   (``s <- m s``, ``b <- c - m (c - b)``, ``c = b + s (L-1)/2``; symmetric grids stay centred on 0),
   then ``grid_offset`` shifts the levels by that fraction of a step (``b <- b + o s``), both
   rounded once to the storage dtype.
4. codes on that grid: nearest; or seeded stochastic rounding; or nearest after seeded noise --
   the formulas of :mod:`mlx_dupq.quant.rounding`, so a copy with only one variant set equals
   ``grid_offset_quantize`` / ``stochastic_round_quantize`` / ``noise_quantize`` exactly.
   A ``shared_codes`` copy keeps copy 0's codes (same spec and rotation required).

Residual mode: copy k quantizes ``W - sum_{j<k} W_j`` where ``W_j = dequant(Q_j) R_j^T`` is copy
j's effective weight in the original basis; the outputs add.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

from ..specs import ActSpec, QuantSpec
from ..errors import DupqError
from ..layers.act_quant import ActQuantInput
from ..layers.online_rotation import RotatedInput
from ..layers.quant_linear import build_module
from ..quant.bpw import tensor_bits
from ..quant.gptq import gptq_quantize
from ..quant.bitpack import pack
from ..quant.qtensor import QTensor, codes_for, dequantize, grouped, symmetric_offsets
from ..quant.rtn import rtn_quantize
from ..rotation import Rotation, make_rotation
from .specs import CopySpec

_ROT_CACHE: dict[str, Rotation] = {}


def copy_rotation(copy: CopySpec, n: int) -> Rotation | None:
    """The copy's rotation of width ``n`` (built once per dict and width), or None."""
    if copy.rotation is None:
        return None
    key = json.dumps([copy.rotation, n], sort_keys=True, default=str)
    if key not in _ROT_CACHE:
        if len(_ROT_CACHE) > 64:
            _ROT_CACHE.clear()
        _ROT_CACHE[key] = make_rotation(copy.rotation, n)
    return _ROT_CACHE[key]


def dequant_params(qt: QTensor, copy: CopySpec, dtype: mx.Dtype) -> tuple[mx.array, mx.array | None]:
    """RTN parameters of ``qt`` with the copy's scale multiplier and grid offset applied.

    (..., n_groups) -> (scales, biases or None when symmetric), in ``dtype`` (see module doc, step 3).
    """
    if copy.scale_mult == 1.0 and copy.grid_offset == 0.0:
        return qt.scales, qt.biases
    spec = qt.spec
    s = qt.scales.astype(mx.float32)
    b = qt.offsets()
    if copy.scale_mult != 1.0:
        half = (spec.levels - 1) / 2
        centre = b + s * half
        s = s * copy.scale_mult
        b = centre - s * half
    if copy.grid_offset:
        if spec.symmetric:
            raise DupqError(f"a grid offset needs a stored bias, which {spec.label()} lacks; use an asymmetric spec")
        b = b + copy.grid_offset * s
    scales = s.astype(dtype)
    return scales, (None if spec.symmetric else b.astype(dtype))


def choose_codes(w: mx.array, scales: mx.array, biases: mx.array | None, spec: QuantSpec, copy: CopySpec) -> mx.array:
    """Codes of ``w`` (..., in) on the grid (scales, biases): nearest, stochastic or noisy (step 4)."""
    offsets = symmetric_offsets(scales, spec.levels) if biases is None else biases
    g = spec.group_for(w.shape[-1])
    s = scales.astype(mx.float32)[..., None]
    wf = w.astype(mx.float32)
    if copy.noise > 0:
        u = mx.random.uniform(-1.0, 1.0, shape=w.shape, key=mx.random.key(int(copy.noise_seed)))
        wf = (grouped(wf, g) + copy.noise * mx.abs(s) * grouped(u, g)).reshape(w.shape)
    if copy.stochastic_seed is None:
        return codes_for(wf, scales, offsets, spec)
    b = offsets.astype(mx.float32)[..., None]
    u = mx.random.uniform(shape=w.shape, key=mx.random.key(int(copy.stochastic_seed)))
    safe = mx.where(s == 0, 1.0, s)
    q = mx.floor((grouped(wf, g) - b) / safe + grouped(u, g))
    q = mx.clip(mx.where(s == 0, 0.0, q), 0, spec.levels - 1)
    return q.reshape(w.shape).astype(mx.uint8)


def quantile_clip(w: mx.array, spec: QuantSpec, q: float) -> mx.array:
    """(..., in) -> the weight with each quantization group clipped to its [1-q, q] quantiles
    (nearest rank), so that RTN's min/max range becomes the quantile range. Per-channel and
    per-tensor specs clip each row."""
    g = spec.group_for(w.shape[-1])
    wg = grouped(w.astype(mx.float32), g)
    srt = mx.sort(wg, axis=-1)
    hi_i = int(round(q * (g - 1)))
    lo, hi = srt[..., g - 1 - hi_i: g - hi_i], srt[..., hi_i: hi_i + 1]
    return mx.clip(wg, lo, hi).reshape(w.shape)


def quantize_copy(w: mx.array, spec: QuantSpec, copy: CopySpec, dtype: mx.Dtype = mx.float16,
                  codes: mx.array | None = None) -> QTensor:
    """One copy of an (already rotated) weight (..., in) -> QTensor; ``codes`` given = shared codes."""
    qt = rtn_quantize(w if copy.quantile == 1.0 else quantile_clip(w, spec, copy.quantile), spec, dtype)
    scales, biases = dequant_params(qt, copy, dtype)
    if codes is None:
        codes = choose_codes(w, scales, biases, qt.spec, copy)
    return QTensor(codes, scales, biases, qt.spec)


def effective_weight(qt: QTensor, rotation: Rotation | None) -> mx.array:
    """A copy's weight in the original input basis: ``dequant(qt) R^T`` (out, in) float32."""
    wq = dequantize(qt)
    return wq if rotation is None else wq @ rotation.matrix().T


def gptq_applies(copy: CopySpec) -> bool:
    """GPTQ can make this copy: its codes are its own and its grid is the RTN one (no multiplier,
    offset, stochastic rounding or noise; those copies stay RTN on their variant grid)."""
    return (not copy.shared_codes and copy.stochastic_seed is None and copy.noise == 0
            and copy.scale_mult == 1.0 and copy.grid_offset == 0.0 and copy.quantile == 1.0)


def make_copies(w: mx.array, base_spec: QuantSpec, copy_specs: Sequence[CopySpec], dtype: mx.Dtype = mx.float16,
                residual: bool = False, hessian: mx.array | None = None, gptq=None) -> list[QTensor]:
    """Quantize the copies of a float weight ``w`` (out, in) -> one QTensor per CopySpec.

    Each QTensor holds ``Q(W R_k)`` (or, when ``residual``, ``Q((W - sum_{j<k} W_j) R_k)``), in the
    copy's rotated basis; :func:`effective_weight` maps it back.

    hessian (in, in) = ``X^T X`` of the layer's calibration inputs and ``gptq`` (the recipe's
    :class:`~mlx_dupq.config.QuantizerSpec`, method gptq): every copy :func:`gptq_applies` to is
    GPTQ'd against it instead of rounded to nearest: parallel copies each against ``W`` (a rotated
    copy against ``R^T H R``, its inputs are ``x R``); residual copies only the LAST one, against
    what the others left. The final output error is the last copy's, and an RTN residual (at most
    half a step per weight) is what the next 2-bit grid fits best: GPTQ'ing copy 1 spreads its
    error into larger weight residuals and made two residual copies worse than plain RTN ones
    (``tests/test_dup_convert.py::test_gptq_copies_lower_the_output_error`` checks the order).
    """
    if not copy_specs:
        raise DupqError("make_copies needs at least one CopySpec")
    if copy_specs[0].shared_codes:
        raise DupqError("the first copy must own its codes (shared_codes = false)")
    if residual and any(c.shared_codes for c in copy_specs):
        raise DupqError("residual copies need their own codes; set shared_codes = false")
    w = w.astype(mx.float32)
    n = w.shape[-1]
    out: list[QTensor] = []
    target = w
    first = copy_specs[0]
    for i, copy in enumerate(copy_specs):
        rot = copy_rotation(copy, n)
        spec = copy.spec(base_spec)
        if copy.shared_codes:
            if spec.fit(n) != out[0].spec or copy.rotation != first.rotation:
                raise DupqError(
                    f"a shared-codes copy must use copy 0's quantization ({out[0].spec.label()}) and rotation "
                    f"({first.rotation}); got {spec.label()} / {copy.rotation}"
                )
            qt = quantize_copy(w if rot is None else rot.apply(w), spec, copy, dtype, codes=out[0].codes)
        elif (hessian is not None and gptq is not None and gptq_applies(copy)
              and (not residual or i == len(copy_specs) - 1)):
            h = hessian if rot is None else rot.matrix().T @ hessian.astype(mx.float32) @ rot.matrix()
            qt = gptq_quantize(target if rot is None else rot.apply(target), h, spec, dtype, damp=gptq.damp,
                               act_order=gptq.act_order, block_size=gptq.block_size,
                               cd_sweeps=gptq.cd_sweeps)
        else:
            qt = quantize_copy(target if rot is None else rot.apply(target), spec, copy, dtype)
        mx.eval(qt.codes, qt.scales, *([] if qt.biases is None else [qt.biases]))
        out.append(qt)
        if residual:
            target = target - effective_weight(qt, rot)
    return out


def pack_copies(w: mx.array, base_spec: QuantSpec, copy_specs: Sequence[CopySpec], dtype: mx.Dtype = mx.float16,
                mode: str = "parallel") -> list[tuple[dict[str, mx.array], dict]]:
    """Float weight (out, in) -> [(arrays, entry)] per copy, ready to store.

    ``entry`` is the packer's entry plus ``"copy"`` (the CopySpec dict); a shared-codes copy has no
    ``weight`` array and ``"codes_from": 0``, so its codes are stored (and counted) once.
    """
    qts = make_copies(w, base_spec, copy_specs, dtype, residual=(mode == "residual"))
    return pack_qtensors(qts, copy_specs)


def pack_qtensors(qts: Sequence[QTensor], copy_specs: Sequence[CopySpec]) -> list[tuple[dict[str, mx.array], dict]]:
    """:func:`make_copies`' QTensors -> [(arrays, entry)] per copy (see :func:`pack_copies`)."""
    packed = []
    for copy, qt in zip(copy_specs, qts):
        arrays, entry = pack(qt)
        entry["copy"] = copy.to_dict()
        if copy.shared_codes:
            arrays = {k: v for k, v in arrays.items() if k != "weight"}
            entry["codes_from"] = 0
        packed.append((arrays, entry))
    return packed


def copy_bits(packed: Sequence[tuple[dict[str, mx.array], dict]]) -> list[int]:
    """Stored bits of each packed copy (codes + scales + biases; shared codes counted once, at copy 0)."""
    return [tensor_bits(arrays) for arrays, _ in packed]


def _wrap(module: nn.Module, copy: CopySpec, n: int) -> nn.Module:
    """Activation fake-quant (if the copy sets it) inside the run-time rotation (if any)."""
    if copy.act_quantized:
        module = ActQuantInput(module, ActSpec(bits=copy.act_bits or 8, clip_ratio=copy.act_clip or 1.0))
    rot = copy_rotation(copy, n)
    return module if rot is None else RotatedInput(module, rot)


def load_copies(shape: Sequence[int], packed: Sequence[tuple[dict[str, mx.array], dict]]) -> list[nn.Module]:
    """Stored copies of a linear of float ``shape`` (out, in) -> bias-free modules ``x -> x W_k^T``.

    Each is the packer's module (``nn.QuantizedLinear`` / ``DupqLinear``), wrapped in
    ``ActQuantInput`` / ``RotatedInput`` as the copy's spec says. A shared-codes copy's ``weight``
    *is* copy 0's array (one buffer in memory).
    """
    shape = tuple(int(d) for d in shape)
    mods, cores = [], []
    for arrays, entry in packed:
        copy = CopySpec.from_dict(entry["copy"]) if "copy" in entry else CopySpec()
        if "codes_from" in entry:
            arrays = dict(arrays, weight=cores[int(entry["codes_from"])]["weight"])
        core = build_module("linear", shape, {k: v for k, v in entry.items() if k not in ("copy", "codes_from")})
        core.load_weights(list(arrays.items()))
        core.freeze()
        cores.append(core)
        mods.append(_wrap(core, copy, shape[1]))
    return mods


def collapse_shared(qts: Sequence[QTensor], mix: mx.array | None = None, dtype: mx.Dtype = mx.float16) -> QTensor:
    """Parallel copies sharing codes (no rotation, no activation quant) as ONE QTensor.

    ``sum_k a_k (s_k q + b_k) = (sum_k a_k s_k) q + sum_k a_k b_k``; ``mix`` (K,) or (K, out) are the
    aggregation weights (None: the mean). Exact up to rounding the combined parameters to ``dtype``.
    """
    q0 = qts[0]
    if any(qt.codes is not q0.codes and not bool(mx.all(qt.codes == q0.codes).item()) for qt in qts):
        raise DupqError("collapse_shared needs copies with identical codes (shared_codes copies)")
    k = len(qts)
    a = mx.full((k,), 1.0 / k) if mix is None else mix.astype(mx.float32)
    a = a.reshape(k, *([1] * q0.scales.ndim)) if a.ndim == 1 else a.reshape(k, -1, *([1] * (q0.scales.ndim - 1)))
    s = sum(a[i] * qt.scales.astype(mx.float32) for i, qt in enumerate(qts))
    b = sum(a[i] * qt.offsets() for i, qt in enumerate(qts))
    spec = QuantSpec(q0.spec.bits, q0.spec.group_size, False)  # the combined offset is free: affine
    return QTensor(q0.codes, s.astype(dtype), b.astype(dtype), spec)
