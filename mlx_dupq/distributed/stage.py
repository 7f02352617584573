"""One rank's part of a model: ``[embedding] -> decoder layers start..end-1 -> [norm -> head]``.

:func:`load_stage` rebuilds a pack with :func:`mlx_dupq.io.pack.load_pack` restricted to the
rank's tensors (``only=plan.owns``), so every kind of layer the pack can hold (mlx or dupq
formats, online rotations, serial and parallel copies, per-expert widths, activation
quantization) is built by the same code as a one-process load; the files the index does not
list for this rank are never opened, and the skeleton's other modules are dropped unevaluated.
An mlx-lm model directory (no ``mlx_dupq`` section) is loaded lazily by mlx-lm and cut the same
way: every file is opened, but only this rank's tensors are read.

The stage runs the decoder layers the way mlx-lm's ``qwen2`` / ``llama`` / ``deepseek`` models
do (one causal mask, a sliding-window one for ``use_sliding`` layers) and keeps one KV cache per
layer (:meth:`Stage.make_cache`).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.utils import load_model as mlx_load_model

from ..adapter import model_classes
from ..errors import DupqError
from ..io import pack as packio
from ..layers.cpu import use_dense_prefill
from .split import StagePlan, plan_stages, tensor_sizes


class Stage(nn.Module):
    """Rank ``plan.rank``'s modules, taken from a (lazily) loaded mlx-lm model."""

    def __init__(self, model: nn.Module, plan: StagePlan):
        super().__init__()
        owner = getattr(model, "model", None)
        if not isinstance(owner, nn.Module) or not isinstance(owner.get("layers"), list):
            raise DupqError(f"{type(model).__name__} has no model.layers list; --pipeline runs mlx-lm decoder models")
        self.plan = plan
        self.args = getattr(model, "args", None)
        self.sliding_window = getattr(owner, "sliding_window", None)
        self.layers = owner.layers[plan.start : plan.end]
        if plan.first or (plan.last and plan.tied):
            self.embed_tokens = owner.embed_tokens
        if plan.last:
            self.norm = owner.norm
            if not plan.tied:
                self.lm_head = model["lm_head"]

    def embed(self, tokens: mx.array) -> mx.array:
        """(B, T) ids -> (B, T, hidden)."""
        return self.embed_tokens(tokens)

    def head(self, h: mx.array) -> mx.array:
        """(B, T, hidden) -> (B, T, vocab) logits."""
        h = self.norm(h)
        return self.embed_tokens.as_linear(h) if self.plan.tied else self.lm_head(h)

    def __call__(self, h: mx.array, cache: list | None = None) -> mx.array:
        """(B, T, hidden) -> (B, T, hidden) through this rank's decoder layers."""
        if cache is None:
            cache = [None] * len(self.layers)
        sliding = [bool(getattr(layer, "use_sliding", False)) for layer in self.layers]
        full = next((i for i, s in enumerate(sliding) if not s), 0)
        mask = create_attention_mask(h, cache[full])
        swa = None
        for layer, c, s in zip(self.layers, cache, sliding):
            if s and swa is None:
                swa = create_attention_mask(h, c, window_size=self.sliding_window)
            h = layer(h, swa if s else mask, c)
        return h

    def make_cache(self) -> list:
        """A fresh KV cache for each of this rank's layers."""
        return [RotatingKVCache(max_size=self.sliding_window) if getattr(layer, "use_sliding", False) else KVCache()
                for layer in self.layers]


def _lazy_model(path: Path, plan: StagePlan, compute_dtype: str) -> tuple[nn.Module, dict]:
    if packio.is_pack(path):
        return packio.load_pack(path, compute_dtype=compute_dtype, lazy=True, only=plan.owns)
    try:
        model, config = mlx_load_model(path, lazy=True, get_model_classes=model_classes)
    except Exception as e:
        raise DupqError(f"mlx-lm could not load {path} ({type(e).__name__}: {e})") from None
    packio.cast_floats(model, getattr(mx, compute_dtype))
    return model, config


def load_stage(path: str | Path, rank: int, size: int, compute_dtype: str = "float32") -> tuple[Stage, dict, list[StagePlan]]:
    """(this rank's stage, the model config, every rank's plan) for the pack or mlx-lm directory ``path``."""
    p = Path(str(path)).expanduser()
    if not packio.is_quantized_dir(p):
        raise DupqError(f"{path} is not a pack or an mlx-lm model directory; --pipeline runs packs "
                        "(make one with `mlx-dupq convert MODEL -o PACK`)")
    plans = plan_stages(tensor_sizes(p, compute_dtype), size)
    model, config = _lazy_model(p, plans[rank], compute_dtype)
    stage = Stage(model, plans[rank])
    del model
    mx.eval(stage.parameters())
    if mx.default_device() == mx.cpu:
        use_dense_prefill(stage)
    return stage, config, plans
