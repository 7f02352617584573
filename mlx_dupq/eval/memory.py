"""Decoding speed and memory (README.md, F7.5): batch scaling, KV cache size, quantized KV cache, bandwidth.

All runs use mlx-lm's model classes and KV caches (``KVCache``; ``QuantizedKVCache`` for a 8- or
4-bit cache, mlx-lm's ``--kv-bits``), greedy decoding, end-of-sequence ignored.

- :func:`decode_run`: ``batch`` copies of the fixed benchmark prompt
  (:func:`mlx_dupq.eval.speed.bench_prompt`) are prefilled in one call, then ``gen_tokens``
  single-token steps are timed: ``decode_tps`` = batch x gen_tokens / decode time (all
  sequences), ``per_seq_tps`` = gen_tokens / decode time. ``kv_cache_bytes``: the cache's
  ``nbytes`` at the end; ``peak_memory_bytes``: MLX's allocator peak over prefill and decode.
- Bytes moved per decoded token (:func:`bytes_per_token`), a lower bound that counts what one
  decode step must read: every weight the step multiplies with, once per step and shared by the
  batch (all parameter bytes as held in memory; an untied input embedding is left out, a step
  reads one row of it), plus the KV cache of the sequence (keys and values of all earlier
  positions, the mean over the timed steps). Activations and writes are left out.
  ``achieved_gbps`` = bytes per token x tokens/s; ``utilisation`` = that / the peak the user
  states (``peak_gbps``; without one ``utilisation`` is None). :func:`gemv_bandwidth_gbps`
  (a 256 MiB float32 matrix-vector product) is recorded next to it as what this machine reached
  with the same access pattern during the run.
  The KV read uses the bytes per position actually stored (:func:`kv_position_bytes`);
  ``kv_cache_bytes`` is what mlx-lm allocated (it grows in steps of 256 positions).
- :func:`kv_quant_effect`: the same held-out windows scored twice through the KV cache in
  chunks of ``chunk`` tokens, once with the float cache and once quantized (mlx-lm quantizes
  every key and value it stores, so all attention after the first chunk reads quantized
  history, and the current chunk's own keys too): NLL / PPL of both, top-1 agreement and mean
  KL(float || quantized) of the next-token distributions.
- :func:`kv_bytes_formula`: 2 x layers x kv_heads x head_dim x tokens x bytes per element; with
  2 bytes, the size of the fp16 cache a GPU run would hold (the float32 CPU runs hold 4 bytes).
"""

from __future__ import annotations

import math
import time

import mlx.core as mx
import numpy as np

from ..errors import DupqError
from .speed import bench_prompt

KV_BITS = (4, 8)


def _args(model):
    args = getattr(model, "args", None)
    if args is None:
        raise DupqError("the model has no config (args); use an mlx-lm model")
    return args


def kv_bytes_formula(model, tokens: int, bytes_per_element: float = 2.0) -> int:
    """Bytes of a plain K/V cache of ``tokens`` positions (one sequence) for ``model``."""
    a = _args(model)
    heads = a.num_attention_heads
    kv = getattr(a, "num_key_value_heads", None) or heads
    hd = getattr(a, "head_dim", None) or a.hidden_size // heads
    return int(2 * a.num_hidden_layers * kv * hd * tokens * bytes_per_element)


def make_cache(model, kv_bits: int | None = None, kv_group_size: int = 64) -> list:
    """mlx-lm's prompt cache for ``model``; with ``kv_bits`` a ``QuantizedKVCache`` per layer."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache

    cache = make_prompt_cache(model)
    if kv_bits is None:
        return cache
    if kv_bits not in KV_BITS:
        raise DupqError(f"KV cache bits {kv_bits} are not supported; use 4 or 8 (mlx-lm's quantized cache)")
    if not all(type(c) is KVCache for c in cache):
        raise DupqError("this model's cache is not a plain KV cache (sliding window or state); "
                        "the quantized KV cache needs one")
    a = _args(model)
    hd = getattr(a, "head_dim", None) or a.hidden_size // a.num_attention_heads
    if kv_group_size not in (32, 64, 128) or hd % kv_group_size:
        raise DupqError(f"KV group size {kv_group_size} does not divide the head dimension {hd} (or is not 32, 64, 128); "
                        f"use a group size of 32, 64 or 128 that divides {hd}")
    return [QuantizedKVCache(group_size=kv_group_size, bits=kv_bits) for _ in cache]


def kv_position_bytes(model, kv_bits: int | None = None, kv_group_size: int = 64) -> float:
    """Bytes one position of one sequence takes in the KV cache: keys and values of every layer;
    quantized: ``kv_bits`` per element plus a scale and a bias (model dtype) per group."""
    elem = _dtype_bytes(model)
    per = elem if kv_bits is None else kv_bits / 8 + 2 * elem / kv_group_size
    return kv_bytes_formula(model, 1, 1.0) * per


def _dtype_bytes(model) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}.get(model_dtype(model), 4)


def weight_bytes(model) -> int:
    """Parameter bytes one decode step reads (see the module docstring)."""
    from mlx.utils import tree_flatten

    total = 0
    untied = hasattr(model, "lm_head") or not getattr(_args(model), "tie_word_embeddings", True)
    for k, v in tree_flatten(model.parameters()):
        if untied and "embed_tokens" in k:
            continue
        total += v.nbytes
    return int(total)


def decode_run(model, tokenizer, batch: int = 1, prompt_tokens: int = 128, gen_tokens: int = 32,
               kv_bits: int | None = None, kv_group_size: int = 64) -> dict:
    """One timed batched decode (module docstring); returns timings, cache bytes and peak memory."""
    if batch < 1 or gen_tokens < 1:
        raise DupqError(f"batch {batch} and gen_tokens {gen_tokens} must be at least 1")
    prompt = bench_prompt(tokenizer, prompt_tokens)
    x = mx.broadcast_to(prompt[None], (batch, prompt.size))
    cache = make_cache(model, kv_bits, kv_group_size)
    mx.synchronize()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    y = mx.argmax(model(x, cache=cache)[:, -1, :], axis=-1)
    mx.eval(y)
    t1 = time.perf_counter()
    for _ in range(gen_tokens):
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
        mx.eval(y)
    t2 = time.perf_counter()
    kv = int(sum(c.nbytes for c in cache))
    return {
        "batch": batch, "prompt_tokens": int(prompt.size), "gen_tokens": gen_tokens,
        "kv": f"q{kv_bits}" if kv_bits else str(model_dtype(model)),
        "prefill_s": t1 - t0, "decode_s": t2 - t1,
        "decode_tps": batch * gen_tokens / (t2 - t1), "per_seq_tps": gen_tokens / (t2 - t1),
        "kv_cache_bytes": kv, "kv_bytes_per_position": kv_position_bytes(model, kv_bits, kv_group_size),
        "peak_memory_bytes": int(mx.get_peak_memory()),
    }


def model_dtype(model) -> str:
    from mlx.utils import tree_flatten

    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return str(v.dtype).replace("mlx.core.", "")
    return "?"


def bytes_per_token(model, run: dict, peak_gbps: float | None = None) -> dict:
    """Bytes moved per decoded token of ``run`` (a :func:`decode_run` result) and bandwidth use."""
    w = weight_bytes(model)
    mean_pos = run["prompt_tokens"] + (run["gen_tokens"] - 1) / 2  # history length, mean over the steps
    kv = run["kv_bytes_per_position"] * mean_pos
    per_tok = w / run["batch"] + kv
    gbps = per_tok * run["decode_tps"] / 1e9
    return {"weight_bytes": w, "kv_read_bytes_per_token": kv, "bytes_per_token": per_tok, "achieved_gbps": gbps,
            "utilisation": gbps / peak_gbps if peak_gbps else None}


def gemv_bandwidth_gbps(n: int = 8192, repeats: int = 5) -> float:
    """Best GB/s of a float32 (n, n) matrix times a vector: the access pattern of a decode step
    (each weight byte read once). A reference point for this machine, not a hardware peak."""
    a = mx.random.uniform(shape=(n, n))
    x = mx.random.uniform(shape=(n, 1))
    mx.eval(a, x)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(a @ x)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def _log_softmax(x: mx.array) -> mx.array:
    x = x.astype(mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def kv_quant_effect(model, windows: np.ndarray, kv_bits: int, chunk: int = 64, kv_group_size: int = 64) -> dict:
    """Float vs ``kv_bits`` KV cache on ``windows`` (W, L) token ids (module docstring)."""
    W, L = windows.shape
    if chunk < 1 or L < 2:
        raise DupqError(f"chunk {chunk} must be >= 1 and windows at least 2 tokens long")
    nll_f = nll_q = kl = 0.0
    agree = n = 0
    for w in range(W):
        x = mx.array(windows[w : w + 1])
        cf, cq = make_cache(model), make_cache(model, kv_bits, kv_group_size)
        for s in range(0, L - 1, chunk):
            e = min(s + chunk, L - 1)
            t = x[:, s + 1 : e + 1]
            lf, lq = _log_softmax(model(x[:, s:e], cache=cf)), _log_softmax(model(x[:, s:e], cache=cq))
            pf = mx.exp(lf)
            step = [
                -mx.take_along_axis(lf, t[..., None], axis=-1).sum(), -mx.take_along_axis(lq, t[..., None], axis=-1).sum(),
                (pf * (lf - lq)).sum(), (mx.argmax(lf, axis=-1) == mx.argmax(lq, axis=-1)).sum(),
            ]
            mx.eval(step)
            nll_f, nll_q, kl, agree = nll_f + step[0].item(), nll_q + step[1].item(), kl + step[2].item(), agree + step[3].item()
            n += e - s
    return {"kv_bits": kv_bits, "kv_group_size": kv_group_size, "chunk": chunk, "windows": W, "ctx": L, "positions": n,
            "nll_float": nll_f / n, "nll_quant": nll_q / n, "ppl_float": math.exp(nll_f / n), "ppl_quant": math.exp(nll_q / n),
            "top1_agreement": agree / n, "kl": kl / n}


def memory_study(model, tokenizer, windows: np.ndarray | None = None, batches=(1, 2, 4, 8), prompt_tokens: int = 128,
                 gen_tokens: int = 32, kv_bits=KV_BITS, peak_gbps: float | None = None, chunk: int = 64,
                 kv_group_size: int = 64, repeats: int = 1, progress=None) -> dict:
    """The whole study: batch scaling (float cache), KV cache variants at batch 1, bandwidth, and the
    quantized cache's effect on ``windows`` (skipped when None). ``peak_gbps`` None: no
    utilisation (``peak_source`` says which). Each decode configuration
    runs ``repeats`` times and the fastest run is kept."""
    gemv = gemv_bandwidth_gbps()
    decode_run(model, tokenizer, 1, min(prompt_tokens, 16), 2)  # warm-up

    def best(*args, **kw) -> dict:  # the fastest of ``repeats`` runs: other load only slows a run down
        runs = [decode_run(model, tokenizer, *args, **kw) for _ in range(repeats)]
        return {**min(runs, key=lambda r: r["decode_s"]), "repeats": repeats}

    rows = []
    for i, b in enumerate(batches):
        r = best(b, prompt_tokens, gen_tokens)
        rows.append({**r, **bytes_per_token(model, r, peak_gbps)})
        if progress:
            progress("batch", i + 1, len(batches))
    kv_rows = [{**rows[0], "kv_bytes_per_position_fp16": kv_bytes_formula(model, 1, 2.0)}]
    for bits in kv_bits:
        r = best(1, prompt_tokens, gen_tokens, kv_bits=bits, kv_group_size=kv_group_size)
        row = {**r, **bytes_per_token(model, r, peak_gbps)}
        if windows is not None:
            row.update({k: v for k, v in kv_quant_effect(model, windows, bits, chunk, kv_group_size).items() if k not in ("kv_bits",)})
        kv_rows.append(row)
        if progress:
            progress("kv", len(kv_rows) - 1, len(kv_bits))
    return {"batch": rows, "kv_cache": kv_rows,
            "bandwidth": {"weight_bytes": weight_bytes(model), "peak_gbps": peak_gbps,
                          "peak_source": "stated" if peak_gbps else "none stated", "measured_gemv_gbps": gemv,
                          "model_dtype": model_dtype(model)},
            "device": str(mx.default_device())}
