"""A linear layer run as several quantized copies (SPEC F5.3, F5.5).

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
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..errors import DupqError
from ..kernels import route

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
