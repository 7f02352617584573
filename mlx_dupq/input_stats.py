"""Calibration activations, collected layer by layer in a streaming pass.

The converter keeps only the hidden states of the calibration tokens, ``(n, seq_len, hidden)``.
For decoder layer ``k`` it builds that one layer with its (float, possibly rotated) weights,
runs the hidden states through it while recording what every linear layer receives
(:func:`layer_input_hessians` — ``E[x x^T]`` per linear, the GPTQ Hessian), quantizes the layer, and
then advances the hidden states through the *quantized* layer (:func:`advance`), as GPTQ does, so
later layers compensate for the error of earlier ones. Memory: one layer + the hidden states +
one ``(in, in)`` matrix per linear of that layer.

With ``switch=True`` (``[moe]`` recipes) the switch (stacked-expert) layers are captured too
(:class:`_SwitchCapture`): per expert ``e`` the mean ``x x^T`` over the rows routed to ``e`` (for
gate/up the token inputs whose top-k includes ``e``, for down the intermediate activations of ``e``
on those tokens), one ``(in, in)`` matrix per expert that received tokens (:class:`SwitchStats`).

Linears that receive the very same input array (``q/k/v_proj``, ``gate/up_proj``, a switch
layer's ``gate/up_proj`` with the same indices) share one accumulator (:class:`_Inputs`): their
statistics are one object, computed and held once.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from .errors import DupqError
from .quant.gptq import HessianAccumulator


@dataclass
class LinearStats:
    """What one linear layer saw during calibration."""

    hessian: mx.array  # (in, in) float32, E[x x^T]
    mean_abs: mx.array  # (in,) float32, E|x|  (activation importance, AWQ-style)
    tokens: int


class _Inputs:
    """The inputs the captures of one layer received lately, to find linears fed the same array.

    Holds strong references to the last few input arrays (so an identity test cannot be fooled
    by a reused id). A capture whose input ``is`` an earlier capture's input (same indices for
    switch layers) on every batch shares that capture's statistics instead of accumulating its own.
    """

    KEEP = 8

    def __init__(self):
        self.recent: list[tuple[tuple[mx.array, ...], object]] = []

    def owner(self, key: tuple[mx.array, ...], capture: object) -> object:
        """The capture that first received ``key`` (the arrays themselves) in this batch, or ``capture``."""
        for k, cap in self.recent:
            if len(k) == len(key) and all(a is b for a, b in zip(k, key)):
                return cap
        self.recent = (self.recent + [(key, capture)])[-self.KEEP:]
        return capture


class _Link:
    """Which capture's statistics a capture shares (a plain object: an nn.Module attribute holding a
    module would make it a child module)."""

    def __init__(self, inputs: _Inputs | None):
        self.inputs = inputs or _Inputs()
        self.owner = None  # the capture whose statistics are shared (None: its own)
        self.calls = 0


class _Shared:
    """Mixin: accumulate statistics, or share another capture's when fed the same input."""

    def _accumulates(self, key: tuple[mx.array, ...]) -> bool:
        """Whether this call must accumulate (False: the same input went into the owner's statistics)."""
        link = self._link
        owner = link.inputs.owner(key, self)
        first = link.calls == 0
        link.calls += 1
        if first:
            link.owner = None if owner is self else owner
        elif owner is not (self if link.owner is None else link.owner):
            raise DupqError("calibration capture: linears shared an input on one batch but not on another; "
                            "this model's forward pass is not deterministic in its inputs (please report it)")
        return link.owner is None

    def stats(self):
        return self._link.owner.stats() if self._link.owner is not None else self._own_stats()


class _Capture(_Shared, nn.Module):
    """Wraps a linear: records its inputs, returns the wrapped linear's output unchanged."""

    def __init__(self, inner: nn.Module, in_features: int, inputs: _Inputs | None = None):
        nn.Module.__init__(self)
        self.inner = inner
        self._in = in_features
        self._acc = None
        self._abs = None
        self._stats = None
        self._link = _Link(inputs)

    def __call__(self, x: mx.array) -> mx.array:
        if self._accumulates((x,)):
            if self._acc is None:
                self._acc = HessianAccumulator(self._in)
                self._abs = mx.zeros((self._in,), dtype=mx.float32)
            flat = x.reshape(-1, x.shape[-1])
            self._acc.add(flat)
            self._abs = self._abs + mx.abs(flat.astype(mx.float32)).sum(axis=0)
            mx.eval(self._abs)
        return self.inner(x)

    def _own_stats(self) -> LinearStats:
        if self._stats is None:  # computed once, also when shared
            n = self._acc.tokens if self._acc is not None else 0
            if n == 0:
                raise DupqError("no calibration activations reached this linear; run the calibration pass first")
            self._stats = LinearStats(self._acc.finalize(), self._abs / n, n)
        return self._stats


@dataclass
class SwitchStats:
    """What each expert of one switch layer saw during calibration."""

    experts: dict[int, LinearStats]  # expert -> its routed rows' statistics (experts with rows only)
    tokens: list[int]  # (E,) rows routed to each expert (0: no statistics)

    def expert(self, e: int) -> LinearStats | None:
        """The :class:`LinearStats` of expert ``e``, or None when no calibration row reached it."""
        return self.experts.get(e)


class _SwitchCapture(_Shared, nn.Module):
    """Wraps a switch layer: records per expert the rows it receives, returns the layer's output unchanged.

    Called like mlx-lm's ``SwitchLinear``: x (..., 1 or k, M, in) and indices (..., k) broadcast
    to one expert id per (M, in) row block (``gather_mm``'s batch rule).
    """

    def __init__(self, inner: nn.Module, in_features: int, num_experts: int, inputs: _Inputs | None = None):
        nn.Module.__init__(self)
        self.inner = inner
        self._in = in_features
        self._accs: dict[int, HessianAccumulator] = {}
        self._abs: dict[int, mx.array] = {}
        self._num_experts = num_experts
        self._stats = None
        self._link = _Link(inputs)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        if self._accumulates((x, indices)):
            self._record(x, indices)
        return self.inner(x, indices, sorted_indices=sorted_indices)

    def _record(self, x: mx.array, indices: mx.array) -> None:
        batch = mx.broadcast_shapes(x.shape[:-2], indices.shape)
        rows = mx.broadcast_to(x, batch + x.shape[-2:]).reshape(-1, x.shape[-2], x.shape[-1])
        ids = np.array(mx.broadcast_to(indices, batch).reshape(-1).astype(mx.int32))
        order = np.argsort(ids, kind="stable")
        experts, starts, counts = np.unique(ids[order], return_index=True, return_counts=True)
        rows = rows[mx.array(order)]
        for e, a, n in zip(experts.tolist(), starts.tolist(), counts.tolist()):
            if e not in self._accs:
                self._accs[e] = HessianAccumulator(self._in)
            acc = self._accs[e]
            xe = rows[a : a + n].reshape(-1, self._in)
            acc.add(xe)
            self._abs[e] = self._abs.get(e, 0) + mx.abs(xe.astype(mx.float32)).sum(axis=0)
            mx.eval(self._abs[e])

    def _own_stats(self) -> SwitchStats:
        if self._stats is None:
            tokens = [self._accs[e].tokens if e in self._accs else 0 for e in range(self._num_experts)]
            experts = {e: LinearStats(a.finalize(), self._abs[e] / a.tokens, a.tokens) for e, a in self._accs.items()}
            self._stats = SwitchStats(experts, tokens)
        return self._stats


def _in_features(m: nn.Module) -> int:
    return int(getattr(m, "input_dims", None) or m.weight.shape[-1])


def _targets(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """The dense linear layers inside a decoder layer (switch layers: :func:`_switch_targets`).

    Behind an online rotation (``RotatedInput``) the captured module is the wrapped linear
    (``mlp.down_proj.linear``), so it records the rotated input it really receives.
    """
    return [(p, m) for p, m in layer.named_modules() if isinstance(m, nn.Linear)]


def _switch_targets(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """The switch (stacked-expert) layers inside a decoder layer."""
    from mlx_lm.models.switch_layers import SwitchLinear

    return [(p, m) for p, m in layer.named_modules() if isinstance(m, SwitchLinear)]


def run_layer(layer: nn.Module, h: mx.array, batch: int = 4) -> mx.array:
    """h (n, L, d) -> layer(h) with a causal mask, in batches of ``batch`` sequences."""
    from mlx_lm.models.base import create_attention_mask

    outs = []
    for i in range(0, h.shape[0], batch):
        x = h[i : i + batch]
        y = layer(x, mask=create_attention_mask(x, None))
        mx.eval(y)
        outs.append(y)
    return mx.concatenate(outs, axis=0)


def _capture_pass(layer: nn.Module, h: mx.array, batch: int) -> None:
    """Run h through ``layer`` for its captures only: the layer's output is never evaluated, so (mlx
    being lazy) what feeds no captured input is never computed (a dense layer's down_proj matmul)."""
    from mlx_lm.models.base import create_attention_mask

    for i in range(0, h.shape[0], batch):
        x = h[i : i + batch]
        layer(x, mask=create_attention_mask(x, None))


def layer_input_hessians(layer: nn.Module, h: mx.array, batch: int = 4,
                         switch: bool = False) -> dict[str, LinearStats | SwitchStats]:
    """Run h (n, L, d) through ``layer`` and return the input statistics of each of its linears.

    Keys are module paths relative to the layer (``self_attn.q_proj``, ``mlp.down_proj``, ...).
    A linear behind an online rotation sees the rotated input, exactly as at run time.
    ``switch``: also capture the switch layers (``mlp.switch_mlp.up_proj``, ...) as :class:`SwitchStats`.
    """
    inputs = _Inputs()
    caps = {path: _Capture(m, _in_features(m), inputs) for path, m in _targets(layer)}
    if switch:
        caps.update({path: _SwitchCapture(m, int(m.input_dims), int(m.num_experts), inputs)
                     for path, m in _switch_targets(layer)})
    layer.update_modules(tree_unflatten(list(caps.items())))
    try:
        _capture_pass(layer, h, batch)
    finally:
        layer.update_modules(tree_unflatten([(p, c.inner) for p, c in caps.items()]))
    return {p: c.stats() for p, c in caps.items()}


def advance(layer: nn.Module, h: mx.array, batch: int = 4) -> mx.array:
    """The next layer's calibration input: h (n, L, d) through ``layer`` (already quantized)."""
    return run_layer(layer, h, batch)
