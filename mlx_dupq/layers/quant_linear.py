"""Modules that run packed weights, and the factory a loader uses to rebuild them.

``build_module(kind, shape, entry, bias)`` returns an empty module whose parameters have the
shapes :func:`~mlx_dupq.quant.bitpack.pack` writes for ``entry``, so ``load_weights`` fills it:

- ``entry["format"] == "mlx"``: mlx's own ``nn.QuantizedLinear`` / ``nn.QuantizedEmbedding`` and
  mlx-lm's ``QuantizedSwitchLinear`` (what ``mlx_lm.load`` builds too);
- ``"dupq"``: :class:`DupqLinear`, :class:`DupqEmbedding`, :class:`DupqSwitchLinear`.

Runtime of the dupq modules. Their parameters are the stored arrays (``weight``, ``scales``,
``biases`` when asymmetric), so ``parameters()`` bytes are the pack's bytes. The matmul runs on
mlx's fast kernels (``mx.quantized_matmul`` / ``mx.gather_qmm``): on first use -- and again
whenever ``load_weights``/``update`` replaces a stored array -- the module derives kernel arrays
and caches them:

- the kernel group is the largest of 128/64/32 dividing both the stored group and the row;
  per-group scales (and offsets; symmetric offsets are the implied ``-s*(L-1)/2``) are repeated
  to it. Groups of 256/512 cost 2-4x the scale bytes at run time, per-channel/per-tensor
  ``in/128`` scales per row instead of one -- the disk format keeps the small count;
- non-ternary codes are already in mlx's bit layout and are used as they are;
- ternary codes (1.6 bits/weight on disk) are re-encoded once as 2-bit mlx codes. The stored
  ``weight`` is then swapped for an *unevaluated* expression that re-derives the base-3 bytes
  from the 2-bit codes, so the base-3 buffer is freed: run-time memory is 2 bits/weight (plus
  the expanded scales), disk stays 1.6. Evaluating the parameters (e.g. to save them)
  materialises the identical base-3 bytes again.

Rows whose length is not a multiple of 32 have no kernel layout; they run on a plain-mx
fallback (dequantize, then matmul) -- correct but slow. Compute dtype follows ``x`` (mlx casts
the scales); on the CPU use float32 activations.

CPU batch rule (linear and tied-head matmuls only): mlx's CPU ``quantized_matmul`` costs about
the same per input row as a whole GEMV (Qwen2.5-0.5B MLP shape 4864x896, 2-bit, fp32, 2 cores:
~4 ms at 1 row, ~470 ms at 64 rows), while dequantizing the weight once and calling BLAS costs
~20-40 ms flat. So on the CPU, inputs with at least :data:`CPU_DENSE_MIN_ROWS` rows (prompt
processing, perplexity windows) are computed as ``x @ mx.dequantize(...).T`` in ``x``'s dtype;
single-token decode keeps the packed kernel. (A switch layer called on its own keeps
``gather_qmm``; inside mlx-lm's ``SwitchGLU`` on the CPU, :class:`mlx_dupq.layers.cpu.DensePrefillSwitchGLU`
runs every expert densely when tokens pick enough of them, from :meth:`DupqSwitchLinear.dense_weight`.)
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from ..errors import DupqError
from ..kernels import route
from ..specs import QuantSpec
from ..quant.bitpack import (
    FORMAT_DUPQ,
    FORMAT_MLX,
    pack,
    pack_bits,
    pack_trits,
    packed_shapes,
    spec_of,
    unpack,
    unpack_bits,
    unpack_trits,
)
from ..quant.qtensor import dequantize, symmetric_offsets
from ..quant.rtn import rtn_quantize

KERNEL_GROUPS = (128, 64, 32)
CPU_DENSE_MIN_ROWS = 16
KINDS = ("linear", "embedding", "switch_linear")
#: module formats other modules run: ``format -> build(kind, shape, entry, bias) -> nn.Module``;
#: :mod:`mlx_dupq.layers.moe_linear` adds ``"moe_mixed"`` (the package ``__init__`` imports it)
FORMAT_BUILDERS: dict[str, Callable[[str, tuple, dict, bool], nn.Module]] = {}


def kernel_group(group: int, in_features: int) -> int | None:
    """Largest mlx kernel group size dividing both ``group`` and ``in_features`` (None if none)."""
    for kg in KERNEL_GROUPS:
        if group % kg == 0 and in_features % kg == 0:
            return kg
    return None


class KernelWeights:
    """Arrays in mlx's affine layout for ``mx.quantized_matmul`` / ``mx.gather_qmm``.

    weight (..., in*bits/32) uint32; scales, biases (..., in/group_size) float.
    """

    def __init__(self, weight: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int):
        self.weight, self.scales, self.biases = weight, scales, biases
        self.group_size, self.bits = group_size, bits


def kernel_weights(arrays: dict[str, mx.array], entry: dict, codes: tuple[mx.array, int] | None = None
                   ) -> KernelWeights | None:
    """Stored dupq arrays -> kernel arrays (see module doc), or None when no kernel layout exists.

    codes: ``(weight, bits)`` kernel codes already derived from ``arrays["weight"]`` (reused as they
    are: only the scales and offsets are derived, e.g. when training changes the scales alone)."""
    spec = spec_of(entry)
    shape = tuple(entry["shape"])
    *lead, n = shape
    g = spec.group_for(n)
    kg = kernel_group(g, n)
    if kg is None:
        return None
    scales = arrays["scales"]
    biases = symmetric_offsets(scales, spec.levels) if spec.symmetric else arrays["biases"]
    if codes is not None:
        weight, bits = codes
    elif spec.ternary:
        weight, bits = pack_bits(unpack_trits(arrays["weight"], n), 2), 2
    else:
        weight, bits = arrays["weight"], int(spec.bits)
    if spec.group_size == -1:
        full = (*lead, n // kg)
        one = (1,) * len(full)
        scales = mx.broadcast_to(scales.reshape(one), full)
        biases = mx.broadcast_to(biases.reshape(one), full)
        # materialise contiguous copies: the kernels copy strided inputs on every call
        scales, biases = mx.contiguous(scales), mx.contiguous(biases)
    elif g != kg:
        scales = mx.repeat(scales, g // kg, axis=-1)
        biases = mx.repeat(biases, g // kg, axis=-1)
    return KernelWeights(weight, scales, biases, kg, bits)


class _DupqBase(nn.Module):
    """Stored dupq arrays as (frozen) parameters + a cache of the kernel arrays."""

    def __init__(self, shape: tuple[int, ...], entry: dict):
        super().__init__()
        spec = spec_of(entry)
        if entry["format"] != FORMAT_DUPQ:
            raise DupqError(f"{type(self).__name__} runs the 'dupq' format, got {entry['format']!r}; use build_module()")
        # plain attribute (not a dict entry of the Module, which would look like a parameter tree)
        object.__setattr__(self, "entry", dict(entry, shape=list(shape)))
        self.bits = spec.bits
        self.group_size = spec.group_size
        self.symmetric = spec.symmetric
        for name, s in packed_shapes(tuple(shape), self.entry).items():
            dtype = (mx.uint8 if spec.ternary else mx.uint32) if name == "weight" else mx.float16
            setattr(self, name, mx.zeros(s, dtype=dtype))
        object.__setattr__(self, "_cache", None)
        self.freeze()

    @property
    def spec(self) -> QuantSpec:
        return spec_of(self.entry)

    def _stored(self) -> dict[str, mx.array]:
        return {k: self[k] for k in ("weight", "scales", "biases") if k in self}

    def _kernel(self) -> KernelWeights | None:
        """Kernel arrays for the current stored arrays (rebuilt when a stored array changes; when only
        the scales / offsets changed -- each step of training them -- the kernel codes are kept, so a
        ternary layer's codes are not re-encoded from base 3 again)."""
        stored = self._stored()
        cache = self._cache
        if cache is not None and all(cache[0].get(k) is v for k, v in stored.items()):
            return cache[1]
        if cache is not None and cache[1] is not None and cache[0].get("weight") is stored["weight"]:
            k = kernel_weights(stored, self.entry, codes=(cache[1].weight, cache[1].bits))
            object.__setattr__(self, "_cache", (stored, k))
            return k
        k = kernel_weights(stored, self.entry)
        if k is not None and self.spec.ternary:
            mx.eval(k.weight, k.scales, k.biases)
            n = self.entry["shape"][-1]
            # free the base-3 buffer; keep an equal, lazily re-derivable parameter (see module doc)
            self["weight"] = pack_trits(unpack_bits(k.weight, 2, n))
            stored = self._stored()
        object.__setattr__(self, "_cache", (stored, k))
        return k

    def dequantized(self) -> mx.array:
        """Float32 weight of shape ``entry["shape"]`` (reference path and fallback)."""
        return dequantize(unpack(self._stored(), self.entry))

    def _matmul(self, x: mx.array) -> mx.array:
        y = route.linear(self, x)
        if y is not None:
            return y
        k = self._kernel()
        if k is None or (x.size >= CPU_DENSE_MIN_ROWS * x.shape[-1] and mx.default_device() == mx.cpu):
            return x @ self.dense_weight(x.dtype).T
        return mx.quantized_matmul(
            x, k.weight, k.scales, k.biases, transpose=True, group_size=k.group_size, bits=k.bits
        )

    def dense_weight(self, dtype: mx.Dtype) -> mx.array:
        """The float weight in ``dtype``: the kernel arrays dequantized, or the stored ones where no
        kernel layout exists (the CPU's dense path; :class:`mlx_dupq.layers.cpu.DensePrefillSwitchGLU`)."""
        k = self._kernel()
        if k is None:
            return self.dequantized().astype(dtype)
        return mx.dequantize(k.weight, k.scales.astype(dtype), k.biases.astype(dtype), group_size=k.group_size,
                             bits=k.bits)

    def _extra_repr(self) -> str:
        return f"shape={tuple(self.entry['shape'])}, {self.spec.label()}"


class DupqLinear(_DupqBase):
    """``y = x @ W.T (+ bias)`` with W stored in the dupq format. W: (output_dims, input_dims)."""

    packed_kind = "linear"  # what :mod:`mlx_dupq.kernels.route` runs it as

    def __init__(self, input_dims: int, output_dims: int, entry: dict, bias: bool = False):
        super().__init__((output_dims, input_dims), entry)
        if bias:
            self.bias = mx.zeros((output_dims,))

    def __call__(self, x: mx.array) -> mx.array:
        y = self._matmul(x)
        if "bias" in self:
            y = y + self["bias"]
        return y


class DupqEmbedding(_DupqBase):
    """Token embedding (num_embeddings, dims) in the dupq format; ``as_linear`` for tied heads."""

    def __init__(self, num_embeddings: int, dims: int, entry: dict):
        super().__init__((num_embeddings, dims), entry)

    def __call__(self, ids: mx.array) -> mx.array:
        k = self._kernel()
        if k is None:
            rows = {name: (a if a.shape == (1,) else a[ids]) for name, a in self._stored().items()}
            entry = dict(self.entry, shape=[*ids.shape, self.entry["shape"][-1]])
            return dequantize(unpack(rows, entry))
        return mx.dequantize(
            k.weight[ids], k.scales[ids], k.biases[ids], group_size=k.group_size, bits=k.bits
        )

    def as_linear(self, x: mx.array) -> mx.array:
        """``x @ E.T``: logits of a tied lm_head."""
        return self._matmul(x)


class SwitchShape:
    """The ``SwitchLinear`` shape attributes of a layer whose ``entry["shape"]`` is (experts, out, in)."""

    @property
    def input_dims(self) -> int:
        return self.entry["shape"][2]

    @property
    def output_dims(self) -> int:
        return self.entry["shape"][1]

    @property
    def num_experts(self) -> int:
        return self.entry["shape"][0]


class DupqSwitchLinear(SwitchShape, _DupqBase):
    """Stacked experts (num_experts, output_dims, input_dims); call like mlx-lm's SwitchLinear."""

    packed_kind = "switch_linear"  # what :mod:`mlx_dupq.kernels.route` runs it as

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, entry: dict, bias: bool = False):
        super().__init__((num_experts, output_dims, input_dims), entry)
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = route.switch(self, [(list(range(self.num_experts)), self._stored(), self.entry)], x, indices)
        if y is not None:
            return y + mx.expand_dims(self["bias"][indices], -2) if "bias" in self else y
        k = self._kernel()
        if k is None:
            w = self.dequantized().astype(x.dtype).swapaxes(-1, -2)
            y = mx.gather_mm(x, w, rhs_indices=indices, sorted_indices=sorted_indices)
        else:
            y = mx.gather_qmm(
                x,
                k.weight,
                k.scales,
                k.biases,
                rhs_indices=indices,
                transpose=True,
                group_size=k.group_size,
                bits=k.bits,
                sorted_indices=sorted_indices,
            )
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][indices], -2)
        return y


def build_module(kind: str, shape: tuple[int, ...], entry: dict, bias: bool = False) -> nn.Module:
    """Empty module for a packed weight of float ``shape`` (see module doc); ``load_weights`` fills it.

    kind "linear": shape (out, in); "embedding": (vocab, dims); "switch_linear": (E, out, in).
    """
    if kind not in KINDS:
        raise DupqError(f"unknown module kind {kind!r}; use one of {', '.join(KINDS)}")
    shape = tuple(int(d) for d in shape)
    want_ndim = 3 if kind == "switch_linear" else 2
    if len(shape) != want_ndim:
        raise DupqError(f"a {kind} weight must have {want_ndim} dims, got shape {shape}")
    if "shape" in entry and tuple(entry["shape"]) != shape:
        raise DupqError(f"quantization entry is for shape {tuple(entry['shape'])}, not {shape}; the pack is damaged")
    if entry.get("format") in FORMAT_BUILDERS:  # a format another module runs (moe_mixed: moe_linear)
        return FORMAT_BUILDERS[entry["format"]](kind, shape, entry, bias)
    spec = spec_of(entry)
    entry = dict(entry, shape=list(shape))
    if entry["format"] == FORMAT_MLX:
        g, b = spec.group_size, int(spec.bits)
        if kind == "linear":
            return nn.QuantizedLinear(shape[1], shape[0], bias=bias, group_size=g, bits=b)
        if kind == "embedding":
            return nn.QuantizedEmbedding(shape[0], shape[1], group_size=g, bits=b)
        return QuantizedSwitchLinear(shape[2], shape[1], shape[0], bias=bias, group_size=g, bits=b)
    if kind == "linear":
        return DupqLinear(shape[1], shape[0], entry, bias=bias)
    if kind == "embedding":
        if bias:
            raise DupqError("an embedding has no bias")
        return DupqEmbedding(shape[0], shape[1], entry)
    return DupqSwitchLinear(shape[2], shape[1], shape[0], entry, bias=bias)


def quantize_tensor(w: mx.array, spec: QuantSpec, dtype: mx.Dtype = mx.float16) -> tuple[dict[str, mx.array], dict]:
    """``pack(rtn_quantize(w, spec, dtype))``: float weight (..., in) -> (arrays, entry)."""
    return pack(rtn_quantize(w, spec, dtype))
