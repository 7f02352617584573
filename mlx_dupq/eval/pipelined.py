"""Generation, perplexity and speed of a pack run as a pipeline over ``mx.distributed`` (``--pipeline``).

The same protocols as :mod:`mlx_dupq.eval.ppl` and :mod:`mlx_dupq.eval.speed`, with the model's
forward pass split over the ranks (:class:`mlx_dupq.distributed.pipeline.Pipeline`): every rank
tokenizes the text, the last rank scores the predictions, and the summed NLL (float64) reaches
rank 0 through one ``all_sum``. Each rank's peak memory (MLX's allocator peak, weights + its KV
cache + activations) is gathered into the result, next to the bytes its stage holds.
Functions return the result on rank 0 and None on the other ranks.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from ..distributed.comm import DEFAULT_TIMEOUT, Session
from ..distributed.pipeline import Pipeline
from ..errors import DupqError
from ..generate import build_prompt
from ..metrics import token_nll_sum
from .data import load_text, tokenize
from .ppl import ONE_PASS_MAX, PREFILL_CHUNK, check_context, windows_of
from .speed import bench_prompt


def rank_memory(pipe: Pipeline, extra: list[int]) -> list[dict]:
    """Per-rank ``{"rank", "layers", "resident_bytes", "stored_bytes", "load_peak_bytes", "peak_memory_bytes"}``."""
    p = pipe.plan
    row = [p.start, p.end, p.resident_bytes, p.stored_bytes, pipe.load_peak_bytes, *extra]
    out = []
    for r, v in enumerate(pipe.gather(row, "gathering the per-rank memory")):
        out.append({"rank": r, "layers": [v[0], v[1]], "resident_bytes": v[2], "stored_bytes": v[3],
                     "load_peak_bytes": v[4], "peak_memory_bytes": v[5]})
    return out


def pipeline_nll(pipe: Pipeline, ids, ctx: int, windows: int | None, chunk: int | None,
                 progress: Callable[[int, int], None] | None = None) -> tuple[float, int]:
    """(summed NLL on every rank, windows scored) of the windows of ``ids`` (see eval.ppl)."""
    if chunk is not None and chunk < 1:
        raise DupqError(f"--chunk {chunk} must be at least 1 token")
    check_context(pipe.stage, ctx)
    step = chunk if chunk is not None else (ctx if ctx <= ONE_PASS_MAX else PREFILL_CHUNK)
    wins = windows_of(ids, ctx, windows)
    total = 0.0
    for i, w in enumerate(wins):
        x = mx.array(w[None])
        if step >= ctx:
            out = pipe.forward(x)
            if out is not None:
                total += token_nll_sum(out[:, :-1, :], x[:, 1:])
        else:
            cache = pipe.stage.make_cache()
            for s in range(0, ctx - 1, step):
                e = min(s + step, ctx - 1)
                out = pipe.forward(x[:, s:e], cache)
                if out is not None:
                    total += token_nll_sum(out, x[:, s + 1 : e + 1])
        del out
        if progress is not None:
            progress(i + 1, len(wins))
    shared = pipe.share(mx.array([total], dtype=mx.float64), "sharing the summed NLL")
    return float(shared.item()), len(wins)


def pipeline_perplexity(model: str | Path, data: str, ctx: int = 2048, windows: int | None = None,
                        chunk: int | None = None, compute_dtype: str = "float32", timeout: float = DEFAULT_TIMEOUT,
                        progress: Callable[[int, int], None] | None = None,
                        log: Callable[[str], None] | None = None) -> dict | None:
    """``mlx-dupq eval ppl MODEL --pipeline``: the :func:`mlx_dupq.eval.ppl.perplexity` result plus
    ``ranks`` (the process count) and ``per_rank`` memory; None on ranks other than 0."""
    if ctx < 2:
        raise DupqError(f"context length {ctx} is too short; use --ctx 2 or more (2048 is standard)")
    if windows is not None and windows < 1:
        raise DupqError(f"--windows {windows} must be at least 1 (or left out for all windows)")
    text = load_text(data)
    with Session(timeout=timeout) as s:
        pipe = Pipeline.load(model, s, compute_dtype)
        if log is not None:
            log(pipe.describe())
        ids = tokenize(pipe.tokenizer(model), text)
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        total, n = pipeline_nll(pipe, ids, ctx, windows, chunk, progress if s.rank == 0 else None)
        seconds = time.perf_counter() - t0
        per_rank = rank_memory(pipe, [int(mx.get_peak_memory())])
        if s.rank != 0:
            return None
    predicted = n * (ctx - 1)
    nll = total / predicted
    step = chunk if chunk is not None else (ctx if ctx <= ONE_PASS_MAX else PREFILL_CHUNK)
    return {"ppl": math.exp(nll) if nll < 700 else math.inf, "nll": nll, "ctx": ctx, "windows": n,
            "tokens": predicted, "text_tokens": int(len(ids)), "seconds": seconds, "chunk": min(step, ctx),
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in per_rank), "ranks": len(per_rank),
            "per_rank": per_rank}


def _timed_run(pipe: Pipeline, prompt: list[int], gen_tokens: int) -> dict:
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    t_first = t_last = t0
    n = 0
    for n, _ in enumerate(pipe.generate(prompt, gen_tokens, make_sampler(temp=0.0)), 1):
        if n == 1:
            t_first = time.perf_counter()
        t_last = time.perf_counter()
    ttft = t_first - t0
    return {"ttft_s": ttft, "prompt_tps": len(prompt) / ttft,
            "generation_tps": (n - 1) / (t_last - t_first) if n > 1 and t_last > t_first else float("nan"),
            "generated": n, "peak_memory_bytes": int(mx.get_peak_memory())}


def allsum_latency(pipe: Pipeline, repeats: int = 20) -> float | None:
    """Median seconds of one ``all_sum`` of a (hidden,) array over the ranks (None for one rank):
    what each of tensor parallelism's two all-reduces per layer and token would cost on this link."""
    if pipe.session.size == 1:
        return None
    x = mx.zeros((pipe.hidden,), dtype=pipe.dtype)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pipe.share(x, "timing an all_sum")
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def pipeline_bench(model: str | Path, prompt_tokens: int = 128, gen_tokens: int = 64, repeats: int = 1,
                   compute_dtype: str = "float32", timeout: float = DEFAULT_TIMEOUT,
                   log: Callable[[str], None] | None = None) -> dict | None:
    """``mlx-dupq bench MODEL --pipeline``: prompt and generation tokens/s (as in eval.speed: greedy,
    end-of-sequence ignored, one 8-token warm-up, medians over ``repeats``), per rank its layers,
    bytes and peak memory, and the :func:`allsum_latency`; None on ranks other than 0."""
    if gen_tokens < 2:
        raise DupqError(f"--gen-tokens {gen_tokens} is too few to time generation; use 2 or more")
    with Session(timeout=timeout) as s:
        pipe = Pipeline.load(model, s, compute_dtype)
        if log is not None:
            log(pipe.describe())
        prompt = bench_prompt(pipe.tokenizer(model), prompt_tokens).tolist()
        load_before = os.getloadavg()[0]
        _timed_run(pipe, prompt, min(8, gen_tokens))
        runs = [_timed_run(pipe, prompt, gen_tokens) for _ in range(repeats)]
        latency = allsum_latency(pipe)
        per_rank = rank_memory(pipe, [max(r["peak_memory_bytes"] for r in runs)])
        if s.rank != 0:
            return None

    def med(key: str) -> float:
        return float(statistics.median(r[key] for r in runs))

    return {"model": str(model), "ranks": len(per_rank), "prompt_tokens": len(prompt), "gen_tokens": gen_tokens,
            "repeats": repeats, "prompt_tps": len(prompt) / med("ttft_s"), "generation_tps": med("generation_tps"),
            "ttft_s": med("ttft_s"), "allsum_latency_s": latency, "peak_memory_mib": max(r["peak_memory_bytes"] for r in per_rank) / 2**20,
            "load_avg_1min": [load_before, os.getloadavg()[0]], "cpu_count": os.cpu_count(),
            "device": str(mx.default_device()), "per_rank": per_rank, "runs": runs}


def stream_pipelined(model: str | Path, prompt: str, write: Callable[[str], None], max_tokens: int = 100,
                     temp: float = 0.0, seed: int = 0, chat: bool = True, compute_dtype: str = "float32",
                     timeout: float = DEFAULT_TIMEOUT, log: Callable[[str], None] | None = None) -> None:
    """``mlx-dupq generate MODEL --pipeline``: as :func:`mlx_dupq.generate.stream` (chat template,
    sampling, stop at end-of-sequence); rank 0 calls ``write(text)`` with the pieces of the
    completion and a final newline, every rank ``log`` with its stage."""
    with Session(timeout=timeout) as s:
        pipe = Pipeline.load(model, s, compute_dtype)
        if log is not None:
            log(pipe.describe())
        tok = pipe.tokenizer(model)
        mx.random.seed(seed)
        ids = build_prompt(tok, prompt, chat)
        if isinstance(ids, str):  # as mlx_lm.stream_generate encodes a plain prompt
            ids = tok.encode(ids, add_special_tokens=tok.bos_token is None or not ids.startswith(tok.bos_token))
        detok = tok.detokenizer
        detok.reset()
        eos = set(tok.eos_token_ids)
        for t in pipe.generate(ids, max_tokens, make_sampler(temp=temp), stop=eos):
            if t in eos:
                break
            detok.add_token(t)
            piece = detok.last_segment  # (reading it consumes it)
            if s.rank == 0 and piece:
                write(piece)
        detok.finalize()
        if s.rank == 0:
            write(detok.last_segment + "\n")
