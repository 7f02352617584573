"""Perplexity with the standard GPTQ / QuaRot protocol.

1. The whole text is tokenized once with the tokenizer's default special tokens. A tokenizer
   that adds BOS (Llama, SmolLM2) adds exactly one, at the start of the stream, so it lands in
   the first window only; Qwen's adds none. Windows never get a BOS of their own (as in GPTQ).
2. The ids are cut into non-overlapping windows of ``ctx`` tokens; the remainder is dropped.
3. Each window is run from an empty context; token ``t`` (t = 2..ctx) is predicted from tokens
   ``1..t-1``, so a window contributes ``ctx - 1`` predictions.
4. ``nll`` = mean negative log-likelihood over all predictions of all windows; ``ppl = exp(nll)``.
   This equals GPTQ's ``exp(sum(mean_loss_w * ctx) / (W * ctx))`` since every window scores the
   same number of predictions.

Memory: the model returns (batch, ctx, vocab) logits (1.2 GB in float32 for Qwen's 152k vocab at
ctx 2048, batch 1). The loss is computed from them in row chunks of about 256 MB, each cast to
float32 on its own, so peak memory is the model's logits plus one chunk, never a second full
float32 copy. ``batch_size`` windows run per forward pass: memory grows linearly with it.

Long context (README.md, F7.4): a window longer than ``chunk`` tokens is fed through mlx-lm's KV cache
in chunks of ``chunk`` tokens (chunked prefill, as ``mlx_lm.generate`` does): each step's
attention scores are (heads, chunk, tokens so far) and its logits (chunk, vocab), never
(ctx, ctx) or (ctx, vocab) at once; the KV cache (2 x layers x kv_heads x ctx x head_dim) is the
only part that grows with ``ctx``. The predictions are the same as one full pass (float rounding
aside). By default (``chunk=None``) windows up to 2048 tokens run in one pass and longer ones in
chunks of 1024. ``ctx`` may not exceed the model's ``max_position_embeddings``.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import mlx.core as mx
import numpy as np

from ..errors import DupqError, UsageError
from ..metrics import CHUNK_BYTES, token_nll_sum  # noqa: F401  (re-exported)
from .data import tokenize

ONE_PASS_MAX = 2048  # windows up to this many tokens run in one forward pass by default
PREFILL_CHUNK = 1024  # longer windows: tokens per chunked-prefill step


def max_context(model) -> int | None:
    """The model's ``max_position_embeddings`` (None when its config does not say)."""
    args = getattr(model, "args", None)
    n = getattr(args, "max_position_embeddings", None)
    return int(n) if n else None


def check_context(model, ctx: int) -> None:
    """Raise :class:`DupqError` when ``ctx`` exceeds the model's ``max_position_embeddings``."""
    n = max_context(model)
    if n is not None and ctx > n:
        raise UsageError(f"--ctx {ctx} is longer than the model's context ({n} positions, max_position_embeddings); "
                        f"use --ctx {n} or less")


def window_nll_sum(model, x: mx.array, chunk: int) -> float:
    """Summed NLL of tokens 2..L of each row of ``x`` (B, L) given the ones before them, fed
    through the KV cache in steps of ``chunk`` tokens (one pass when ``chunk >= L``)."""
    L = x.shape[1]
    if chunk >= L:
        logits = model(x)
        mx.eval(logits)
        return token_nll_sum(logits[:, :-1, :], x[:, 1:])
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    total = 0.0
    for s in range(0, L - 1, chunk):
        e = min(s + chunk, L - 1)  # inputs s..e-1 predict targets s+1..e
        logits = model(x[:, s:e], cache=cache)
        mx.eval(logits)
        total += token_nll_sum(logits, x[:, s + 1 : e + 1])
        del logits
    return total


def windows_of(ids: np.ndarray, ctx: int, windows: int | None = None) -> np.ndarray:
    """(T,) token ids -> (W, ctx) non-overlapping windows, remainder dropped, first ``windows`` only."""
    total = len(ids) // ctx
    if total < 1:
        raise DupqError(
            f"the text has {len(ids)} tokens, fewer than one window of {ctx}; use a longer text or a smaller --ctx"
        )
    n = total if windows is None else min(windows, total)
    return ids[: n * ctx].reshape(n, ctx)


def perplexity(
    model,
    tokenizer,
    text: str,
    ctx: int = 2048,
    windows: int | None = None,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
    chunk: int | None = None,
) -> dict:
    """Perplexity of ``model`` on ``text`` (see the module docstring for the protocol).

    ``model(tokens)``: (B, ctx) int -> (B, ctx, vocab) logits (an mlx-lm model).
    ``windows``: score only the first N windows (all when None; fewer if the text is shorter —
    the result's ``windows`` says how many were scored). ``progress(done, total)`` is called
    after each batch with window counts.

    Returns ``{"ppl", "nll", "ctx", "windows", "tokens", "text_tokens", "seconds"}`` where
    ``tokens`` is the number of predicted tokens (``windows * (ctx - 1)``) and ``text_tokens``
    the length of the tokenized text, ``chunk`` the prefill step used (``ctx`` = one pass) and
    ``peak_memory_bytes`` MLX's allocator peak during the run (weights included)."""
    if ctx < 2:
        raise UsageError(f"context length {ctx} is too short; use --ctx 2 or more (2048 is standard)")
    if windows is not None and windows < 1:
        raise UsageError(f"--windows {windows} must be at least 1 (or left out for all windows)")
    if batch_size < 1:
        raise UsageError(f"batch size {batch_size} must be at least 1")
    if chunk is not None and chunk < 1:
        raise UsageError(f"--chunk {chunk} must be at least 1 token")
    check_context(model, ctx)
    step = chunk if chunk is not None else (ctx if ctx <= ONE_PASS_MAX else PREFILL_CHUNK)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    ids = tokenize(tokenizer, text)
    wins = windows_of(ids, ctx, windows)
    n = len(wins)
    total_nll = 0.0
    for s in range(0, n, batch_size):
        total_nll += window_nll_sum(model, mx.array(wins[s : s + batch_size]), step)
        if progress is not None:
            progress(min(s + batch_size, n), n)
    predicted = n * (ctx - 1)
    nll = total_nll / predicted
    return {
        "ppl": math.exp(nll) if nll < 700 else math.inf,
        "nll": nll,
        "ctx": ctx,
        "windows": n,
        "tokens": predicted,
        "text_tokens": int(len(ids)),
        "seconds": time.perf_counter() - t0,
        "chunk": min(step, ctx),
        "peak_memory_bytes": int(mx.get_peak_memory()),
    }
