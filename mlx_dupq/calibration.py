"""The converter's calibration state: tokens, hidden states, and the per-layer capture/advance.

Used by :mod:`mlx_dupq.pipeline` when the recipe's quantizer is calibrated (awq, gptq). The hidden
states after each finished layer are saved in ``OUT.partial/`` so ``--resume`` continues exactly.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.utils import load_tokenizer

from .adapter import EMBED_KEY_RE, layer_prefix  # noqa: F401  (re-exported)
from .input_stats import LinearStats, advance, layer_input_hessians
from .specs import QuantizerSpec
from .errors import DupqError
from .eval.data import calibration_batches, load_text
from .layers.online_rotation import apply_online_rotations

HIDDEN_RE = re.compile(r"^calib-hidden-(\d{5})\.safetensors$")


class Calibration:
    """Calibration tokens and the running hidden states ``h`` (n, seq_len, hidden), float32."""

    def __init__(self, spec: QuantizerSpec, tokenizer_dir: Path, root: Path):
        tok = load_tokenizer(tokenizer_dir)
        text = load_text(spec.calib_data)
        self.tokens = calibration_batches(tok, text, spec.calib_samples, spec.calib_seq_len, spec.seed)
        self.root = root
        self.h: mx.array | None = None
        self.hf: mx.array | None = None  # the float model's hidden states, when a stage keeps them (refine.block)

    def resume(self, done_indices: list[int], layer_indices: set[int]) -> None:
        """Reload ``h`` saved after the last finished group (if any layer was already done)."""
        saved = {int(m.group(1)): f for f in self.root.iterdir() if (m := HIDDEN_RE.match(f.name))}
        finished_layers = [i for i in done_indices if i in layer_indices]
        if not finished_layers:
            return
        last = max(finished_layers)
        if last not in saved:
            raise DupqError(f"{self.root} has no calibration state for its finished layers; pass --force to start over")
        state = mx.load(str(saved[last]))
        self.h, self.hf = state["h"], state.get("hf")

    def start(self, weights: dict[str, mx.array]) -> None:
        """Begin the hidden states from the float embedding, when this group holds it."""
        for k, w in weights.items():
            if EMBED_KEY_RE.search(k) and w.ndim == 2:
                self.h = w.astype(mx.float32)[self.tokens]
                mx.eval(self.h)

    def capture(self, layer: nn.Module, prefix: str, weights: dict[str, mx.array], online: dict[str, dict],
                switch: bool = False):
        """Load the float layer, wrap its online rotations, return ({full path: LinearStats}, wrapped).

        ``switch``: also record per-expert statistics of its switch layers (``[moe]`` recipes):
        :class:`~mlx_dupq.input_stats.SwitchStats` under the switch layer's path."""
        if self.h is None:
            raise DupqError("calibration needs the embedding before the first layer; this model's layout is not supported")
        rel_online = {p[len(prefix) + 1 :]: r for p, r in online.items() if p.startswith(prefix + ".")}
        wrapped = set(rel_online)
        _set_weights(layer, prefix, weights, set())
        if rel_online:
            apply_online_rotations(layer, rel_online)
        stats = layer_input_hessians(layer, self.h, switch=switch)
        full = {f"{prefix}.{p.removesuffix('.linear')}": s for p, s in stats.items()}
        return full, wrapped

    def advance(self, layer: nn.Module, prefix: str, dequantized: dict[str, mx.array], wrapped: set[str],
                group_index: int) -> None:
        """Put the quantized weights in, move ``h`` one layer on, save it, free the layer."""
        _set_weights(layer, prefix, dequantized, wrapped)
        self.h = advance(layer, self.h)
        layer.update(tree_map(lambda a: mx.zeros((1,), a.dtype), layer.parameters()))
        tmp = self.root / f"tmp-calib-hidden-{group_index:05d}.safetensors"
        mx.save_safetensors(str(tmp), {"h": self.h, **({} if self.hf is None else {"hf": self.hf})})
        os.replace(tmp, self.root / f"calib-hidden-{group_index:05d}.safetensors")

    def prune(self, keep_index: int) -> None:
        """Delete saved hidden states older than ``keep_index`` (called once that group is recorded)."""
        for f in self.root.iterdir():
            m = HIDDEN_RE.match(f.name)
            if m and int(m.group(1)) < keep_index:
                f.unlink()

    def cleanup(self) -> None:
        for f in self.root.iterdir():
            if HIDDEN_RE.match(f.name):
                f.unlink()


def _set_weights(layer: nn.Module, prefix: str, weights: dict[str, mx.array], wrapped: set[str]) -> None:
    """Load full-name weights of one decoder layer into its module (float32)."""
    items = []
    for k, v in weights.items():
        if not k.startswith(prefix + "."):
            continue
        rel = k[len(prefix) + 1 :]
        mod, _, param = rel.rpartition(".")
        if mod in wrapped:
            rel = f"{mod}.linear.{param}"
        items.append((rel, v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v))
    layer.load_weights(items, strict=False)
