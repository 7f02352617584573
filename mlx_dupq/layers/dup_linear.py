"""A linear layer run as several quantized copies (docs/duplication.md, F5.3, F5.5).

``DupLinear(copies, mode, mix, bias)``: every copy is a bias-free module ``x -> x W_k^T`` (what
:func:`mlx_dupq.dup.copies.load_copies` builds); the layer's float bias is added once.

- ``parallel``: ``y = sum_k a_k copy_k(x) + bias``, ``a = mix`` of shape (K,) or (K, out), or the
  mean when ``mix`` is None (fitted by :func:`mlx_dupq.dup.aggregate.fit_mix`).
- ``residual``: ``y = sum_k copy_k(x) + bias`` (copy k stores the error left by copies < k).

Dynamic duplication: with ``early_stop = tau`` the copies run in order and stop once the
running output changes by less than ``tau`` relative (``||y_k - y_{k-1}|| / ||y_k||``): the copies
"agree" (parallel) or the next residual is negligible (residual). ``max_copies`` caps the copies
per call (a compute budget). The decision is per call (per input), so it syncs with the device
once per copy; ``copies_run`` / ``calls`` count what actually ran. Early stop needs weights that
stay meaningful for a prefix of the copies: the mean or ``sum_k a_k = 1`` scalar weights
(renormalised over the prefix); learned and selective mixtures always run every copy.

Kernels: on a custom-kernel backend (metal / cuda, :mod:`mlx_dupq.kernels.route`) a decode call
that runs every copy computes them in one pass over x (``multi_copy_qmv``) when the copies are
plain packed linears and the mix is the mean, scalar weights or a residual sum.

CPU decode (the reference backend, fewer than ``CPU_DENSE_MIN_ROWS`` rows): copies that run on
mlx's affine kernel with one bit width and group size are stacked along the output axis once, and
all of them run as *one* ``mx.quantized_matmul`` over ``(K*out, in)`` that reads x once; the K
outputs are then weighted and summed (any mix, per-channel included). The copies' own arrays are
re-pointed at views of the stack (codes held once); see :func:`stack_copies`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..errors import DupqError
from ..kernels import route
from .quant_linear import CPU_DENSE_MIN_ROWS, DupqLinear, KernelWeights

LINEAR_MODES = ("parallel", "residual")


class DupLinear(nn.Module):
    """Copies of one linear, aggregated (see module doc). bias: (out,) or None; mix: (K,) / (K, out) / None."""

    def __init__(self, copies: list[nn.Module], mode: str = "parallel", mix: mx.array | None = None,
                 bias: mx.array | None = None, early_stop: float | None = None, max_copies: int | None = None):
        super().__init__()
        if mode not in LINEAR_MODES:
            raise DupqError(f"DupLinear mode {mode!r} is unknown; use parallel or residual "
                            "(serial copies are whole decoder layers: mlx_dupq.dup.runtime.duplicate_layers)")
        if not copies:
            raise DupqError("DupLinear needs at least one copy")
        self.copies = list(copies)
        object.__setattr__(self, "mode", mode)
        if mix is not None:
            if mode == "residual":
                raise DupqError("residual copies add up; they take no aggregation weights")
            if mix.shape[0] != len(copies) or mix.ndim not in (1, 2):
                raise DupqError(f"aggregation weights of shape {tuple(mix.shape)} do not fit {len(copies)} copies; "
                                "expected (K,) or (K, out)")
            self.mix = mix.astype(mx.float32)
        if bias is not None:
            self.bias = bias
        if early_stop is not None and mix is not None and (mix.ndim != 1 or abs(float(mx.sum(mix).item()) - 1) > 1e-3):
            raise DupqError("early stop needs the mean or scalar weights summing to 1 (variance_weighted); "
                            "learned and selective mixtures run every copy")
        object.__setattr__(self, "early_stop", early_stop)
        object.__setattr__(self, "max_copies", max_copies)
        object.__setattr__(self, "copies_run", 0)
        object.__setattr__(self, "calls", 0)
        self.freeze()

    def _weight(self, k: int, y: mx.array) -> mx.array:
        a = self["mix"][k]
        return a if a.ndim == 0 else a.astype(y.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        n = len(self.copies) if self.max_copies is None else min(self.max_copies, len(self.copies))
        if self.early_stop is None and n == len(self.copies):
            y = self._full(x)
            ran = n
        else:
            y, ran = self._dynamic(x, n)
        object.__setattr__(self, "copies_run", self.copies_run + ran)
        object.__setattr__(self, "calls", self.calls + 1)
        if "bias" in self:
            y = y + self["bias"]
        return y

    def _full(self, x: mx.array) -> mx.array:
        y = route.copies(self, x)  # one pass over x on a custom-kernel backend (docs/kernels.md)
        if y is not None:
            object.__setattr__(self, "_stack", None)  # the copies now point into the kernel pack
            return y
        y = self._stacked(x)
        if y is not None:
            return y
        ys = [c(x) for c in self.copies]
        if self.mode == "residual":
            return sum(ys[1:], ys[0])
        if "mix" not in self:
            return sum(ys[1:], ys[0]) / len(ys)
        out = ys[0] * self._weight(0, ys[0])
        for k in range(1, len(ys)):
            out = out + ys[k] * self._weight(k, ys[k])
        return out

    def _stacked(self, x: mx.array) -> mx.array | None:
        """CPU decode: every copy in one quantized matmul (see :func:`stack_copies`), or None."""
        if len(self.copies) < 2 or mx.default_device() != mx.cpu or x.size >= CPU_DENSE_MIN_ROWS * x.shape[-1]:
            return None
        if getattr(self, "_kernel_pack", None) is not None:
            return None  # the copies already point into a GPU kernel pack: stacking again would hold them twice
        kernels = [copy_kernel(c) for c in self.copies]
        cache = getattr(self, "_stack", None)
        if cache is None or not _same(cache[0], kernels):  # first call, or an array was replaced
            st = stack_copies(self.copies, kernels)
            cache = ([copy_kernel(c) for c in self.copies], st)  # the copies now point into the stack
            object.__setattr__(self, "_stack", cache)
        st = cache[1]
        if st is None:
            return None
        k, out = len(self.copies), st.weight.shape[0] // len(self.copies)
        y = mx.quantized_matmul(x, st.weight, st.scales, st.biases, transpose=True, group_size=st.group_size,
                                bits=st.bits)
        y = y.reshape(*x.shape[:-1], k, out)
        if self.mode == "residual":
            return y.sum(axis=-2)
        if "mix" not in self:
            return y.mean(axis=-2)
        a = self["mix"].astype(y.dtype)
        return (y * (a[:, None] if a.ndim == 1 else a)).sum(axis=-2)

    def _dynamic(self, x: mx.array, n: int) -> tuple[mx.array, int]:
        """Copies in order, stopping early; returns (output, copies run)."""
        total, wsum, prev = None, 0.0, None
        for k in range(n):
            yk = self.copies[k](x)
            a = 1.0 if (self.mode == "residual" or "mix" not in self) else float(self["mix"][k].item())
            total = yk * a if total is None else total + yk * a
            wsum += a
            cur = total if self.mode == "residual" else total / wsum
            if prev is not None and self.early_stop is not None:
                change = mx.sqrt(mx.sum(mx.square(cur - prev))) / (mx.sqrt(mx.sum(mx.square(cur))) + 1e-12)
                if float(change.item()) < self.early_stop:
                    return cur, k + 1
            prev = cur
        return cur, n

    def _extra_repr(self) -> str:
        agg = "mean" if "mix" not in self else f"mix{tuple(self['mix'].shape)}"
        return f"{len(self.copies)} copies, {self.mode}" + ("" if self.mode == "residual" else f", {agg}")


def _same(a: list[KernelWeights | None], b: list[KernelWeights | None]) -> bool:
    """Both lists hold the very same arrays (identity, not values)."""
    return all((x is None and y is None) or (x is not None and y is not None and x.weight is y.weight
               and x.scales is y.scales and x.biases is y.biases) for x, y in zip(a, b))


def copy_kernel(copy: nn.Module) -> KernelWeights | None:
    """The affine kernel arrays a copy's decode matmul uses (mlx QuantizedLinear or DupqLinear), or
    None (float copies, copies wrapped in rotations / activation quantizers, no kernel layout)."""
    if isinstance(copy, DupqLinear):
        return None if "bias" in copy else copy._kernel()
    if isinstance(copy, nn.QuantizedLinear) and getattr(copy, "mode", "affine") == "affine" and "bias" not in copy:
        return KernelWeights(copy["weight"], copy["scales"], copy["biases"], copy.group_size, copy.bits)
    return None


def stack_copies(copies: list[nn.Module], kernels: list[KernelWeights | None]) -> KernelWeights | None:
    """K copies' kernel arrays concatenated along the output axis: (K*out, in*bits/32) codes and
    (K*out, in/g) scales / offsets, or None when they differ in bits, group, shape or dtype.

    Each copy's arrays are then re-pointed at its rows of the stack (row slices are views), so the
    codes -- and an mlx copy's scales and offsets -- are held once, not twice."""
    if any(k is None for k in kernels) or len({id(k.weight) for k in kernels}) < len(kernels):
        return None  # a shared-codes copy: stacking would hold its codes twice
    k0 = kernels[0]
    if any((k.bits, k.group_size, k.weight.shape, k.scales.shape, k.scales.dtype) !=
           (k0.bits, k0.group_size, k0.weight.shape, k0.scales.shape, k0.scales.dtype) for k in kernels):
        return None
    st = KernelWeights(mx.concatenate([k.weight for k in kernels]), mx.concatenate([k.scales for k in kernels]),
                       mx.concatenate([k.biases for k in kernels]), k0.group_size, k0.bits)
    mx.eval(st.weight, st.scales, st.biases)
    out = k0.weight.shape[0]
    for i, (c, k) in enumerate(zip(copies, kernels)):
        rows = slice(i * out, (i + 1) * out)
        w, s, b = st.weight[rows], st.scales[rows], st.biases[rows]
        if isinstance(c, nn.QuantizedLinear):
            c["weight"], c["scales"], c["biases"] = w, s, b
        elif c._stored().get("weight") is k.weight:  # DupqLinear whose kernel codes are its stored codes
            c["weight"] = w
            stored = c._stored()
            object.__setattr__(c, "_cache", (stored, KernelWeights(w, s, b, k.group_size, k.bits)))
    return st
