"""Calibration activations, collected layer by layer in a streaming pass.

The converter keeps only the hidden states of the calibration tokens, ``(n, seq_len, hidden)``.
For decoder layer ``k`` it builds that one layer with its (float, possibly rotated) weights,
runs the hidden states through it while recording what every linear layer receives
(:func:`layer_input_hessians` — ``E[x x^T]`` per linear, the GPTQ Hessian), quantizes the layer, and
then advances the hidden states through the *quantized* layer (:func:`advance`), as GPTQ does, so
later layers compensate for the error of earlier ones. Memory: one layer + the hidden states +
one ``(in, in)`` matrix per linear of that layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
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


def _in_features(m: nn.Module) -> int:
    return int(getattr(m, "input_dims", None) or m.weight.shape[-1])


def _targets(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """The dense linear layers inside a decoder layer (switch/expert layers are not captured).

    Behind an online rotation (``RotatedInput``) the captured module is the wrapped linear
    (``mlp.down_proj.linear``), so it records the rotated input it really receives.
    """
    return [(p, m) for p, m in layer.named_modules() if isinstance(m, nn.Linear)]


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


def layer_input_hessians(layer: nn.Module, h: mx.array, batch: int = 4) -> dict[str, LinearStats]:
    """Run h (n, L, d) through ``layer`` and return the input statistics of each of its linears.

    Keys are module paths relative to the layer (``self_attn.q_proj``, ``mlp.down_proj``, ...).
    A linear behind an online rotation sees the rotated input, exactly as at run time.
    """
    caps = {path: _Capture(m, _in_features(m)) for path, m in _targets(layer)}
    layer.update_modules(tree_unflatten(list(caps.items())))
    try:
        run_layer(layer, h, batch)
    finally:
        layer.update_modules(tree_unflatten([(p, c.inner) for p, c in caps.items()]))
    return {p: c.stats() for p, c in caps.items()}


def advance(layer: nn.Module, h: mx.array, batch: int = 4) -> mx.array:
    """The next layer's calibration input: h (n, L, d) through ``layer`` (already quantized)."""
    return run_layer(layer, h, batch)
