"""Speed and memory of generation, with mlx-lm's own generation loop and KV cache.

Conventions (the same as ``mlx_lm.generate.stream_generate``):

- time to first token (TTFT): from the call until the first generated token is available; it
  covers prefilling the prompt into the KV cache and sampling one token.
- prompt tok/s = prompt tokens / TTFT.
- generation tok/s = (generated tokens - 1) / (time of the last token - time of the first).

The prompt is the fixed English passage :data:`PROMPT_TEXT`, repeated and tokenized, cut to
exactly ``prompt_tokens`` ids, so two models that share a tokenizer see identical input.
Greedy decoding; end-of-sequence does not stop the run, so every run generates exactly
``gen_tokens`` tokens. One untimed warm-up run (8 tokens) comes first. With ``repeats > 1`` the
reported TTFT and generation tok/s are medians over the runs (prompt tok/s follows from the
median TTFT); ``runs`` keeps each run.

Memory: ``peak_memory_bytes`` is MLX's allocator peak during a run (``mx.reset_peak_memory()``
before, ``mx.get_peak_memory()`` after): weights + activations + KV cache. ``max_rss_bytes`` is
the process's lifetime peak resident set (it includes everything loaded before the bench).
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

from ..errors import DupqError
from .data import tokenize

PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable metal type "
    "made it possible to reproduce books quickly and cheaply. Within a few decades presses were "
    "running in most large European cities, and the number of printed volumes grew from thousands "
    "to millions. Scholars exchanged letters and pamphlets, merchants printed price lists, and "
    "governments issued proclamations that could be read aloud in every market square. "
)


def bench_prompt(tokenizer, n: int) -> mx.array:
    """The fixed benchmark prompt as exactly ``n`` token ids -> (n,) int32."""
    if n < 1:
        raise DupqError(f"prompt length {n} must be at least 1 token")
    text = PROMPT_TEXT
    ids = tokenize(tokenizer, text)
    if len(ids) == 0:
        raise DupqError("the tokenizer turned the benchmark prompt into no tokens; check the tokenizer")
    while len(ids) < n:
        text += PROMPT_TEXT
        ids = tokenize(tokenizer, text)
    return mx.array(ids[:n])


def max_rss_bytes() -> int:
    """Peak resident set size of this process (bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _run_once(model, prompt: mx.array, gen_tokens: int) -> dict:
    from mlx_lm.generate import generate_step, generation_stream, wired_limit
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.synchronize()
    mx.reset_peak_memory()
    with wired_limit(model, [generation_stream]):
        t0 = time.perf_counter()
        t_first = t_last = t0
        n = 0
        for n, (token, _) in enumerate(generate_step(prompt, model, max_tokens=gen_tokens, prompt_cache=cache), 1):
            if n == 1:
                t_first = time.perf_counter()
            t_last = time.perf_counter()
        mx.synchronize()
    try:
        kv_bytes = int(sum(c.nbytes for c in cache))
    except (NotImplementedError, AttributeError):
        kv_bytes = -1
    ttft = t_first - t0
    return {
        "ttft_s": ttft,
        "prompt_tps": prompt.size / ttft,
        "generation_tps": (n - 1) / (t_last - t_first) if n > 1 and t_last > t_first else float("nan"),
        "generated": n,
        "peak_memory_bytes": int(mx.get_peak_memory()),
        "kv_cache_bytes": kv_bytes,
    }


def bench_speed(model, tokenizer, prompt_tokens: int = 128, gen_tokens: int = 64, repeats: int = 1) -> dict:
    """Prompt and generation speed, time to first token and memory of ``model``.

    Returns ``{"prompt_tokens", "gen_tokens", "repeats", "prompt_tps", "generation_tps",
    "ttft_s", "peak_memory_bytes", "peak_memory_mib", "kv_cache_bytes", "max_rss_bytes",
    "max_rss_mib", "device", "runs"}``; speeds in tokens/s, times in seconds (medians over
    ``repeats`` runs), ``kv_cache_bytes`` the KV cache allocated after the last run (-1 if the
    cache type cannot say)."""
    if gen_tokens < 2:
        raise DupqError(f"--gen-tokens {gen_tokens} is too few to time generation; use 2 or more")
    if repeats < 1:
        raise DupqError(f"--repeats {repeats} must be at least 1")
    prompt = bench_prompt(tokenizer, prompt_tokens)
    _run_once(model, prompt, min(8, gen_tokens))  # warm-up: first-call allocation and compilation
    runs = [_run_once(model, prompt, gen_tokens) for _ in range(repeats)]

    def med(key):
        return float(statistics.median(r[key] for r in runs))

    peak, rss = int(max(r["peak_memory_bytes"] for r in runs)), max_rss_bytes()

    return {
        "prompt_tokens": int(prompt.size),
        "gen_tokens": gen_tokens,
        "repeats": repeats,
        "prompt_tps": prompt.size / med("ttft_s"),
        "generation_tps": med("generation_tps"),
        "ttft_s": med("ttft_s"),
        "peak_memory_bytes": peak,
        "peak_memory_mib": peak / 2**20,
        "kv_cache_bytes": runs[-1]["kv_cache_bytes"],
        "max_rss_bytes": rss,
        "max_rss_mib": rss / 2**20,
        "device": str(mx.default_device()),
        "runs": runs,
    }


def dir_size_bytes(path: str | Path) -> int:
    """Total size in bytes of the files under ``path`` (a file: its size). Symlinked files count
    with their target's size (the Hugging Face cache links snapshots to blobs)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DupqError(f"{p} does not exist; pass a model directory or file")
    if p.is_file():
        return p.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(p):
        for name in files:
            f = Path(root) / name
            if f.is_file():  # follows symlinks; skips broken ones
                total += f.stat().st_size
    return total
