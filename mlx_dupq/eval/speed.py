"""Speed and memory of generation, with mlx-lm's own generation loop and KV cache.

Conventions (the same as ``mlx_lm.generate.stream_generate``):

- time to first token (TTFT): from the call until the first generated token is available; it
  covers prefilling the prompt into the KV cache and sampling one token.
- prompt tok/s = prompt tokens / TTFT.
- generation tok/s = (generated tokens - 1) / (time of the last token - time of the first).
- generation CPU tok/s: the same over this process's CPU time (all its threads) instead of the
  wall clock. On a machine shared with other jobs wall-clock speeds swing with their load; the
  CPU time a token costs moves much less, so it is the fairer figure for comparing models
  measured one after another (on an idle machine with N busy threads it is ~1/N of tok/s).

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
from ..io.loader import load
from .data import tokenize
from ..layers.dup_linear import DupLinear
from ..layers.quant_linear import DupqEmbedding, DupqLinear

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
        c_first = c_last = time.process_time()
        n = 0
        for n, (token, _) in enumerate(generate_step(prompt, model, max_tokens=gen_tokens, prompt_cache=cache), 1):
            if n == 1:
                t_first, c_first = time.perf_counter(), time.process_time()
            t_last, c_last = time.perf_counter(), time.process_time()
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
        "generation_cpu_tps": (n - 1) / (c_last - c_first) if n > 1 and c_last > c_first else float("nan"),
        "generated": n,
        "peak_memory_bytes": int(mx.get_peak_memory()),
        "kv_cache_bytes": kv_bytes,
    }


def bench_speed(model, tokenizer, prompt_tokens: int = 128, gen_tokens: int = 64, repeats: int = 1) -> dict:
    """Prompt and generation speed, time to first token and memory of ``model``.

    Returns ``{"prompt_tokens", "gen_tokens", "repeats", "prompt_tps", "generation_tps",
    "generation_cpu_tps", "ttft_s", "peak_memory_bytes", "peak_memory_mib", "kv_cache_bytes", "max_rss_bytes",
    "max_rss_mib", "device", "cpu_count", "load_avg_1min", "runs"}``; speeds in tokens/s, times in seconds (medians over
    ``repeats`` runs), ``kv_cache_bytes`` the KV cache allocated after the last run (-1 if the
    cache type cannot say), ``load_avg_1min`` the machine's 1-minute load before and after (other
    processes competing for the cores make every speed lower)."""
    if gen_tokens < 2:
        raise DupqError(f"--gen-tokens {gen_tokens} is too few to time generation; use 2 or more")
    if repeats < 1:
        raise DupqError(f"--repeats {repeats} must be at least 1")
    prompt = bench_prompt(tokenizer, prompt_tokens)
    load_before = os.getloadavg()[0]
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
        "generation_cpu_tps": med("generation_cpu_tps"),
        "ttft_s": med("ttft_s"),
        "peak_memory_bytes": peak,
        "peak_memory_mib": peak / 2**20,
        "kv_cache_bytes": runs[-1]["kv_cache_bytes"],
        "max_rss_bytes": rss,
        "max_rss_mib": rss / 2**20,
        "device": str(mx.default_device()),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": [load_before, os.getloadavg()[0]],
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


def linear_macs(model) -> dict:
    """Multiply-adds per token of ``model``'s linear layers (the tied lm_head included; attention
    scores, norms and MoE switch layers not counted): ``{"linear_macs", "dup_extra_macs"}``, the
    second being what copies beyond the first of every DupLinear add."""
    import mlx.nn as nn

    def macs(m) -> int:
        if isinstance(m, DupqLinear):
            out, n = m.entry["shape"]
            return out * n
        if isinstance(m, nn.QuantizedLinear):
            return m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
        if isinstance(m, nn.Linear):
            return m.weight.shape[0] * m.weight.shape[1]
        return 0

    total = extra = 0
    dups = []
    for path, m in model.named_modules():
        if any(path.startswith(d + ".") for d in dups):
            continue  # a copy inside a DupLinear: counted with it
        if isinstance(m, DupLinear):
            dups.append(path)
            each = [macs(c) or sum(macs(s) for _, s in c.named_modules()) for c in m.copies]
            total += sum(each)
            extra += sum(each[1:])
        else:
            total += macs(m)
    args = getattr(model, "args", None)
    if getattr(args, "tie_word_embeddings", False):
        emb = model.model.embed_tokens
        if isinstance(emb, DupqEmbedding):
            total += emb.entry["shape"][0] * emb.entry["shape"][1]
        elif isinstance(emb, nn.QuantizedEmbedding):
            total += emb.weight.shape[0] * emb.weight.shape[1] * 32 // emb.bits
        else:
            total += emb.weight.shape[0] * emb.weight.shape[1]
    return {"linear_macs": int(total), "dup_extra_macs": int(extra)}


def decode_comparison(results: list[dict], base: str | None = None, load_fn=None) -> dict:
    """Decode speed of the first model against every other one, and duplication overhead.

    Returns ``{"decode_ratio": {model: tps(first) / tps(model)}, "decode_ratio_cpu_time": (the
    same with CPU tok/s), "duplication": [...]}``. With ``base`` (one of the measured models: the
    non-duplicated pack the duplicated ones derive from), every other model with copies gets
    ``{"model", "base", "linear_macs", "dup_extra_macs", "dup_flop_share", "decode_overhead",
    "decode_overhead_cpu_time", "overhead_within_share"}``: ``dup_flop_share`` = linear MACs the
    copies add / the model's MACs without them; ``decode_overhead`` = base tok/s / model tok/s - 1
    (extra time per generated token), ``decode_overhead_cpu_time`` the same in CPU time.
    ``load_fn(name) -> (model, tokenizer)`` defaults to mlx_dupq's loader.
    """
    first = results[0]
    out: dict = {"decode_ratio": {r["model"]: first["generation_tps"] / r["generation_tps"]
                                  for r in results[1:] if r.get("generation_tps")},
                 "decode_ratio_cpu_time": {r["model"]: first["generation_cpu_tps"] / r["generation_cpu_tps"]
                                           for r in results[1:] if r.get("generation_cpu_tps")
                                           and first.get("generation_cpu_tps")}}
    if base is None:
        return out
    by_name = {r["model"]: r for r in results}
    if base not in by_name:
        raise DupqError(f"--dup-base {base} is not one of the measured models; pass it as MODEL or --against too")
    if load_fn is None:
        load_fn = load
    rows = []
    for r in results:
        if r["model"] == base:
            continue
        model, _ = load_fn(r["model"])
        m = linear_macs(model)
        del model
        if not m["dup_extra_macs"]:
            continue
        share = m["dup_extra_macs"] / (m["linear_macs"] - m["dup_extra_macs"])
        overhead = by_name[base]["generation_tps"] / r["generation_tps"] - 1
        row = {"model": r["model"], "base": base, **m, "dup_flop_share": share, "decode_overhead": overhead,
               "overhead_within_share": bool(overhead <= share)}
        if r.get("generation_cpu_tps") and by_name[base].get("generation_cpu_tps"):
            row["decode_overhead_cpu_time"] = by_name[base]["generation_cpu_tps"] / r["generation_cpu_tps"] - 1
        rows.append(row)
    out["duplication"] = rows
    return out
