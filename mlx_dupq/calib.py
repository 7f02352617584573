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
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from .quant.gptq import HessianAccumulator


@dataclass
class LinearStats:
    """What one linear layer saw during calibration."""

    hessian: mx.array  # (in, in) float32, E[x x^T]
    mean_abs: mx.array  # (in,) float32, E|x|  (activation importance, AWQ-style)
    tokens: int


class _Capture(nn.Module):
    """Wraps a linear: records its inputs, returns the wrapped linear's output unchanged."""

    def __init__(self, inner: nn.Module, in_features: int):
        super().__init__()
        self.inner = inner
        self._acc = HessianAccumulator(in_features)
        self._abs = mx.zeros((in_features,), dtype=mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        flat = x.reshape(-1, x.shape[-1])
        self._acc.add(flat)
        self._abs = self._abs + mx.abs(flat.astype(mx.float32)).sum(axis=0)
        mx.eval(self._abs)
        return self.inner(x)

    def stats(self) -> LinearStats:
        n = self._acc.tokens
        return LinearStats(self._acc.finalize(), self._abs / max(n, 1), n)


@dataclass
class SwitchStats:
    """What each expert of one switch layer saw during calibration."""

    experts: dict[int, LinearStats]  # expert -> its routed rows' statistics (experts with rows only)
    tokens: list[int]  # (E,) rows routed to each expert (0: no statistics)

    def expert(self, e: int) -> LinearStats | None:
        """The :class:`LinearStats` of expert ``e``, or None when no calibration row reached it."""
        return self.experts.get(e)


class _SwitchCapture(nn.Module):
    """Wraps a switch layer: records per expert the rows it receives, returns the layer's output unchanged.

    Called like mlx-lm's ``SwitchLinear``: x (..., 1 or k, M, in) and indices (..., k) broadcast
    to one expert id per (M, in) row block (``gather_mm``'s batch rule).
    """

    def __init__(self, inner: nn.Module, in_features: int, num_experts: int):
        super().__init__()
        self.inner = inner
        self._in = in_features
        self._accs: dict[int, HessianAccumulator] = {}
        self._abs: dict[int, mx.array] = {}
        self._num_experts = num_experts

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
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
        return self.inner(x, indices, sorted_indices=sorted_indices)

    def stats(self) -> SwitchStats:
        tokens = [self._accs[e].tokens if e in self._accs else 0 for e in range(self._num_experts)]
        experts = {e: LinearStats(a.finalize(), self._abs[e] / a.tokens, a.tokens) for e, a in self._accs.items()}
        return SwitchStats(experts, tokens)


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


def layer_input_hessians(layer: nn.Module, h: mx.array, batch: int = 4,
                         switch: bool = False) -> dict[str, LinearStats | SwitchStats]:
    """Run h (n, L, d) through ``layer`` and return the input statistics of each of its linears.

    Keys are module paths relative to the layer (``self_attn.q_proj``, ``mlp.down_proj``, ...).
    A linear behind an online rotation sees the rotated input, exactly as at run time.
    ``switch``: also capture the switch layers (``mlp.switch_mlp.up_proj``, ...) as :class:`SwitchStats`.
    """
    caps = {path: _Capture(m, _in_features(m)) for path, m in _targets(layer)}
    if switch:
        caps.update({path: _SwitchCapture(m, int(m.input_dims), int(m.num_experts))
                     for path, m in _switch_targets(layer)})
    layer.update_modules(tree_unflatten(list(caps.items())))
    try:
        run_layer(layer, h, batch)
    finally:
        layer.update_modules(tree_unflatten([(p, c.inner) for p, c in caps.items()]))
    return {p: c.stats() for p, c in caps.items()}


def advance(layer: nn.Module, h: mx.array, batch: int = 4) -> mx.array:
    """The next layer's calibration input: h (n, L, d) through ``layer`` (already quantized)."""
    return run_layer(layer, h, batch)
