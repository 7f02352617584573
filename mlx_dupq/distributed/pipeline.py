"""Pipeline-parallel forward pass and generation of a pack over ``mx.distributed``.

Rank 0 embeds the tokens and runs the first layers; rank r receives the (B, T, hidden)
activations of rank r-1 (``mx.distributed.recv``), runs its layers and sends the result to rank
r+1; the last rank applies the final norm and the head. Every rank runs the same program on the
same inputs (all of them tokenize the prompt; only rank 0 reads the ids), so each knows the
shape it receives. In generation the last rank samples the next token and shares it with all
ranks (``all_sum`` of a one-element array to which only it contributes): rank 0 embeds it and
prints, the others learn when to stop. Per token and rank boundary ``hidden x dtype bytes``
travel forward (3.5 KiB for hidden 896 in float32) plus the 4-byte token.

Generation follows ``mlx_lm.generate.generate_step``: the prompt but its last token is prefilled
into the KV caches in steps of ``prefill_step`` tokens without computing logits, then each step
runs one token; so greedy tokens are those of a one-process ``mlx_lm`` run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx

from ..io.loader import tokenizer_of
from .comm import Session
from .split import StagePlan
from .stage import Stage, load_stage

PREFILL_STEP = 2048  # mlx_lm.generate's default prefill_step_size
MIB = 2**20


class Pipeline:
    """One rank's stage plus the session it talks through."""

    def __init__(self, session: Session, stage: Stage, config: dict, plans: list[StagePlan], compute_dtype: str):
        self.session = session
        self.stage = stage
        self.config = config
        self.plans = plans
        self.dtype = getattr(mx, compute_dtype)
        self.hidden = int(config["hidden_size"])
        self.load_peak_bytes = 0

    @classmethod
    def load(cls, path: str | Path, session: Session, compute_dtype: str = "float32") -> "Pipeline":
        """Load this rank's part of the pack at ``path`` (see :func:`~mlx_dupq.distributed.stage.load_stage`)."""
        mx.reset_peak_memory()
        stage, config, plans = load_stage(path, session.rank, session.size, compute_dtype)
        pipe = cls(session, stage, config, plans, compute_dtype)
        pipe.load_peak_bytes = int(mx.get_peak_memory())
        session.barrier("waiting for the other ranks to load their layers")
        return pipe

    @property
    def plan(self) -> StagePlan:
        return self.stage.plan

    def describe(self) -> str:
        p = self.plan
        parts = [f"layers {p.start}-{p.end - 1}"]
        if p.first:
            parts.insert(0, "embedding")
        if p.last:
            parts.append("norm + head" + (" (tied embedding)" if p.tied and not p.first else ""))
        return (f"rank {p.rank}/{p.size}: {', '.join(parts)}; {p.resident_bytes / MIB:.1f} MiB resident, "
                f"{p.stored_bytes / MIB:.1f} MiB stored, load peak {self.load_peak_bytes / MIB:.1f} MiB")

    def tokenizer(self, path: str | Path):
        return tokenizer_of(Path(str(path)).expanduser(), self.config)

    # ------------------------------------------------------------------ the forward pass

    def forward(self, tokens: mx.array, cache: list | None = None, logits: bool = True) -> mx.array | None:
        """(B, T) ids (the same on every rank) through the whole model; the last rank returns the
        evaluated (B, T, vocab) logits (or its hidden states with ``logits=False``), others None."""
        p, s = self.plan, self.session
        B, T = tokens.shape
        with s.step(f"running {T} tokens through layers {p.start}-{p.end - 1}"):
            if p.first:
                h = self.stage.embed(tokens)
            else:
                h = mx.distributed.recv((B, T, self.hidden), self.dtype, p.rank - 1, group=s.group)
            h = self.stage(h, cache)
            states = [c.state for c in cache] if cache is not None else []
            if not p.last:
                mx.eval(mx.distributed.send(h, p.rank + 1, group=s.group), states)
                return None
            out = self.stage.head(h) if logits else h
            mx.eval(out, states)
            return out

    def share(self, x: mx.array, what: str) -> mx.array:
        """The last rank's ``x`` on every rank (the others pass zeros of the same shape)."""
        if self.session.size == 1:
            return x
        with self.session.step(what):
            y = mx.distributed.all_sum(x if self.plan.last else mx.zeros_like(x), group=self.session.group)
            mx.eval(y)
        return y

    def gather(self, row: list[int], what: str) -> list[list[int]]:
        """Every rank's ``row`` of integers, by rank."""
        x = mx.array([row], dtype=mx.int64)
        if self.session.size > 1:
            with self.session.step(what):
                x = mx.distributed.all_gather(x, group=self.session.group)
                mx.eval(x)
        return x.tolist()

    # ------------------------------------------------------------------ generation

    def generate(self, prompt: list[int] | mx.array, max_tokens: int, sampler: Callable[[mx.array], mx.array],
                 stop: set[int] | frozenset[int] = frozenset(), prefill_step: int = PREFILL_STEP) -> Iterator[int]:
        """Token ids of a completion, on every rank (see the module docstring)."""
        cache = self.stage.make_cache()
        y = mx.array(prompt, dtype=mx.int32).reshape(-1)
        while y.size > 1:
            n = min(prefill_step, y.size - 1)
            self.forward(y[None, :n], cache, logits=False)
            y = y[n:]
            mx.clear_cache()
        for _ in range(max_tokens):
            out = self.forward(y[None], cache)
            tok = mx.zeros((1,), dtype=mx.int32)
            if self.plan.last:
                last = out[:, -1, :]
                tok = sampler(last - mx.logsumexp(last, keepdims=True)).astype(mx.int32).reshape(1)
            y = self.share(tok, "sharing the sampled token")
            t = int(y.item())
            yield t
            if t in stop:
                return

