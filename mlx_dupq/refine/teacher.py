"""The teacher of the end-to-end distillation (:mod:`mlx_dupq.refine.e2e`): its top-k targets per window.

The teacher is a loaded float model, run on a chunk of windows at a time, or a float
:class:`~mlx_dupq.io.base.Source`, streamed: a whole float teacher does not fit beside the student
where a big model is converted on a small machine, so the windows still without targets (both
splits, this rank's share) go through decoder layer i together before layer i + 1 is read
(:func:`~mlx_dupq.io.loader.float_layers`), and the final norm and head are read last. Each layer is
read once; the pass holds one float layer, the hidden states of those windows ``(n, seq_len, hidden)``
float32 and one chunk of logits. Both give the same targets up to float rounding
(tests/test_refine_e2e.py).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..adapter import build_skeleton, final_logits, layer_owner
from ..errors import DupqError
from ..input_stats import run_layer
from ..io.base import Source
from ..io.loader import float_embedding, float_layers, load_float_head

Progress = Callable[[str, int, int, dict], None]  # (phase, done, total, info)
Teacher = Source | Callable[[mx.array], mx.array]  # a float source (streamed) or tokens (B, L) -> logits (B, L, V)


def window_key(row: np.ndarray) -> bytes:
    """A window's tokens as a dict key."""
    return np.ascontiguousarray(row, dtype=np.int32).tobytes()


class Targets:
    """Teacher top-k targets per window: ``(log-probs at the temperature (L, k) float16, indices (L, k) uint32)``.

    Computed once for the windows this rank uses (:func:`build_targets`), saved under ``root`` (one
    file per window, so a resumed or data-parallel run reuses them) and kept in memory when they fit."""

    def __init__(self, root: Path | None, split: str, keep: bool):
        self.root, self.split, self.keep = root, split, keep
        self.mem: dict[int, tuple[mx.array, mx.array]] = {}
        self.index: dict[bytes, int] = {}
        self.names: list[str] = []

    def _file(self, i: int) -> Path:
        # named by the window's tokens, not its place: a run with other samples (or chat windows) finds
        # the targets of every window it shares with an earlier one
        return self.root / f"{self.split}-{self.names[i]}.safetensors"

    def todo(self, windows: np.ndarray, mine: list[int]) -> list[int]:
        """Index ``windows`` (n, L+1) for :meth:`get`; the windows of ``mine`` with no saved targets."""
        keys = [window_key(windows[i]) for i in range(len(windows))]
        self.index = {k: i for i, k in enumerate(keys)}
        self.names = [hashlib.sha256(k).hexdigest()[:20] for k in keys]
        return [i for i in mine if self.root is None or not self._file(i).exists()]

    def add(self, ids: list[int], logits: mx.array, top_k: int, temperature: float) -> None:
        """Keep (and save) the top-k log-probs at ``temperature`` of the teacher's logits (len(ids), L, V)."""
        logp = nn.log_softmax(logits.astype(mx.float32) / temperature, axis=-1)
        k = min(top_k, logp.shape[-1])
        idx = mx.argpartition(logp, kth=-k, axis=-1)[..., -k:]
        vals = mx.take_along_axis(logp, idx, axis=-1).astype(mx.float16)
        idx = mx.contiguous(idx.astype(mx.uint32))  # a copy: the slice, a view, would keep the whole
        # (chunk, seq_len, vocab) argpartition alive for as long as the targets (~200 MB per chunk)
        mx.eval(vals, idx)
        for r, i in enumerate(ids):
            if self.root is not None:
                tmp = self.root / f"tmp-{self._file(i).name}"
                mx.save_safetensors(str(tmp), {"logits": vals[r], "indices": idx[r]})
                os.replace(tmp, self._file(i))
            if self.keep:
                self.mem[i] = (vals[r], idx[r])

    def get(self, rows: np.ndarray) -> tuple[mx.array, mx.array]:
        """Targets of a batch of windows (B, L+1) -> (log-probs (B, L, k) float32, indices (B, L, k))."""
        vals, idx = [], []
        for row in rows:
            i = self.index[window_key(row)]
            if i not in self.mem:
                d = mx.load(str(self._file(i)))
                pair = (d["logits"], d["indices"])
                if not self.keep:
                    vals.append(pair[0])
                    idx.append(pair[1])
                    continue
                self.mem[i] = pair
            vals.append(self.mem[i][0])
            idx.append(self.mem[i][1])
        return mx.stack(vals).astype(mx.float32), mx.stack(idx)


def build_targets(teacher: Teacher, parts: list[tuple[Targets, np.ndarray, list[int], float]], top_k: int,
                  chunk: int, progress: Progress | None = None) -> None:
    """Compute, in one teacher pass, the targets each part still lacks.

    parts: ``(targets, windows (n, L+1), the windows of this rank, temperature)``; the teacher sees
    ``chunk`` windows at a time. progress("targets", done, total, {"windows": n, "unit": ...}): per
    chunk of windows for a loaded model (unit "windows"), per decoder layer and then the head for a
    source (unit "layers and head")."""
    jobs = []
    for targets, windows, mine, temperature in parts:
        todo = targets.todo(windows, mine)
        jobs += [(targets, todo[j : j + chunk], windows[todo[j : j + chunk], :-1], temperature)
                 for j in range(0, len(todo), chunk)]
    if not jobs:
        return
    batches = [x for _, _, x, _ in jobs]

    def use(j: int, logits: mx.array) -> None:
        targets, ids, _, temperature = jobs[j]
        targets.add(ids, logits, top_k, temperature)

    teacher_logits(teacher, batches, use, progress)


def teacher_logits(teacher: Teacher, batches: list[np.ndarray], use: Callable[[int, mx.array], None],
                   progress: Progress | None = None) -> None:
    """``use(j, logits (B_j, L, V) float32)`` for every batch of tokens ``batches[j]`` (B_j, L).

    A source is streamed (:func:`_streamed`); anything else is called on each batch."""
    say = progress or (lambda *a: None)
    n = sum(len(b) for b in batches)
    if isinstance(teacher, Source):
        _streamed(teacher, batches, use, lambda done, total: say("targets", done, total,
                                                                 {"windows": n, "unit": "layers and head"}))
        return
    done = 0
    for j, x in enumerate(batches):
        use(j, teacher(mx.array(x)).astype(mx.float32))
        done += len(x)
        say("targets", done, n, {"windows": n, "unit": "windows"})


def _streamed(src: Source, batches: list[np.ndarray], use: Callable[[int, mx.array], None],
              say: Callable[[int, int], None]) -> None:
    """:func:`teacher_logits` of a source: every batch through decoder layer i (as one array of
    hidden states, ``max B_j`` windows at a time) before layer i + 1 is read, then the head per batch."""
    skeleton = build_skeleton(src.config)
    skeleton.eval()
    layers = layer_owner(skeleton).layers
    if any(getattr(layer, "use_sliding", False) for layer in layers):
        raise DupqError(f"{src.name} has sliding-window layers, which the streamed teacher does not run "
                        "(every layer gets a causal mask); pass distill_pack the loaded float model instead")
    h = float_embedding(src, mx.array(np.concatenate(batches)))
    for i, layer in float_layers(src, skeleton):
        h = run_layer(layer, h, max(len(b) for b in batches))
        say(i + 1, len(layers) + 1)
    load_float_head(src, skeleton)
    start = 0
    for j, x in enumerate(batches):
        use(j, final_logits(skeleton, h[start : start + len(x)]))
        start += len(x)
    say(len(layers) + 1, len(layers) + 1)
