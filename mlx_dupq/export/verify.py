"""Run an exported GGUF with llama.cpp itself (``llama-cpp-python``): logits and perplexity.

Used by the tests and ``bench/gguf_export.py`` to check an export against its pack on the same
token ids (the pack's tokenizer), so tokenization cannot hide or cause a difference:

- :func:`llama_cpp_logits`: ``(n_tokens, vocab)`` logits of one sequence;
- :func:`llama_cpp_perplexity`: the protocol of :mod:`mlx_dupq.eval.ppl` (non-overlapping windows
  of ``ctx`` tokens, each from an empty context, ``ctx - 1`` predictions per window).

llama.cpp is loaded without its weight repacking (``llama-cli --no-repack``): on this project's
Xeon machines the repacked path dies with SIGILL (illegal instruction). CPU only, ``threads`` threads.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import DupqError


def _llama_cpp():
    try:
        import llama_cpp  # deferred: optional dependency (a llama.cpp build), only to verify exports
    except ImportError:
        raise DupqError("verifying with llama.cpp needs llama-cpp-python: pip install llama-cpp-python") from None
    return llama_cpp


@contextmanager
def _no_repack(llama_cpp):
    """Make ``Llama(...)`` load with ``use_extra_bufts = False`` (no weight repacking)."""
    lib = llama_cpp.llama_cpp
    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def open_llama(path: str | Path, n_ctx: int, threads: int = 2):
    """A ``llama_cpp.Llama`` over ``path`` keeping every position's logits."""
    llama_cpp = _llama_cpp()
    with _no_repack(llama_cpp):
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                               n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, verbose=False)


def sequence_logits(llm, tokens: list[int]) -> np.ndarray:
    """``(len(tokens), vocab)`` float32 logits of ``tokens`` from an empty context."""
    llm.reset()
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def llama_cpp_logits(path: str | Path, tokens: list[int], threads: int = 2) -> np.ndarray:
    """llama.cpp's ``(len(tokens), vocab)`` logits for ``tokens`` with the GGUF at ``path``."""
    llm = open_llama(path, max(len(tokens), 8), threads)
    try:
        return sequence_logits(llm, tokens)
    finally:
        llm.close()


def window_nll(logits: np.ndarray, window: np.ndarray) -> float:
    """Summed NLL of tokens 2..L of ``window`` given (L, vocab) ``logits`` (float64 log-softmax)."""
    z = logits[:-1].astype(np.float64)
    m = z.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))[:, 0]
    picked = z[np.arange(len(window) - 1), window[1:]]
    return float((lse - picked).sum())


def llama_cpp_perplexity(path: str | Path, windows: np.ndarray, threads: int = 2) -> dict:
    """Perplexity of the GGUF at ``path`` over ``(W, ctx)`` token windows (each from an empty context)."""
    t0 = time.perf_counter()
    w, ctx = windows.shape
    llm = open_llama(path, ctx, threads)
    try:
        total = sum(window_nll(sequence_logits(llm, [int(t) for t in win]), win) for win in windows)
    finally:
        llm.close()
    nll = total / (w * (ctx - 1))
    return {"ppl": math.exp(nll), "nll": nll, "ctx": ctx, "windows": w, "tokens": w * (ctx - 1),
            "seconds": time.perf_counter() - t0}
