"""Agreement of a (quantized) model with its reference (README.md, F7.3).

Two parts, both against the reference model run in the same process:

1. **Greedy generations** on a fixed prompt set (:data:`DEFAULT_PROMPTS`, or the user's): each
   prompt is tokenized as plain text (no chat template; the tokenizer's default special tokens)
   and both models continue it greedily (argmax, mlx-lm's ``generate_step``) for ``max_tokens``
   tokens, stopping after an EOS token. The two token sequences are compared by
   - ``first_divergence``: the length of their common prefix (``max_tokens`` when identical);
   - ``identical_share``: positions with the same token / the longer sequence's length;
   - ``bleu4``: sentence BLEU-4 of the model's tokens against the reference's (:func:`bleu`);
   - ``rouge_l``: ROUGE-L F1 (longest common subsequence, :func:`rouge_l`).
   All four are computed on token ids (both models share the tokenizer), averaged over prompts.
2. **Next-token distributions** on held-out text (``brown:eval`` by default): the text is
   tokenized once and cut into ``windows`` non-overlapping windows of ``ctx`` tokens (as in
   :mod:`mlx_dupq.eval.ppl`); at every position both models' log-softmax is taken in float32
   (``x - logsumexp(x)``), and we report ``top1_agreement`` (same argmax) and
   ``kl`` = mean over positions of KL(ref || model) = sum_v p_ref (log p_ref - log p_model), in nats.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from ..errors import DupqError
from .ppl import windows_of
from ..io.loader import load
from ..refine.train_codes import codes_unpacked
from .data import load_text, tokenize

DEFAULT_PROMPTS = (
    "The history of the printing press begins",
    "Water boils at a lower temperature at high altitude because",
    "A recipe for a simple loaf of bread:",
    "The main differences between a city and a village are",
    "In the morning, the train station was",
    "To learn a new language quickly, you should",
    "The committee met on Tuesday to discuss",
    "Once upon a time, in a small house near the river,",
)


# --------------------------------------------------------------------------- sequence metrics


def _ngrams(seq: Sequence, n: int) -> Counter:
    return Counter(tuple(seq[i : i + n]) for i in range(len(seq) - n + 1))


def bleu(candidate: Sequence, reference: Sequence, max_n: int = 4) -> float:
    """Sentence BLEU-``max_n`` of ``candidate`` against one ``reference`` (sequences of tokens).

    Clipped n-gram precisions p_n = matches_n / candidate_ngrams_n, geometric mean with
    uniform weights, times the brevity penalty ``exp(1 - r/c)`` when ``c < r`` (c, r = lengths).
    Smoothing (Lin & Och 2004, "add-one" for n >= 2, sacrebleu's ``add-k`` with k = 1):
    p_n = (matches_n + 1) / (candidate_ngrams_n + 1) for n >= 2, so a short or partly matching
    output does not score 0 and identical sequences score 1. An empty candidate, or one with no
    unigram in the reference, scores 0 (both empty: 1)."""
    c, r = len(candidate), len(reference)
    if c == 0:
        return 1.0 if r == 0 else 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        cand, ref = _ngrams(candidate, n), _ngrams(reference, n)
        matches = sum(min(k, ref[g]) for g, k in cand.items())
        total = max(c - n + 1, 0)
        if n == 1:
            if matches == 0:
                return 0.0
            p = matches / total
        else:
            p = (matches + 1) / (total + 1)
        log_p += math.log(p) / max_n
    bp = 1.0 if c >= r else math.exp(1 - r / c)
    return bp * math.exp(log_p)


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (O(len(a) * len(b)))."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: Sequence, reference: Sequence) -> float:
    """ROUGE-L F1: P = LCS / len(candidate), R = LCS / len(reference), F = 2PR / (P + R).
    Both empty: 1; one empty: 0."""
    if not candidate and not reference:
        return 1.0
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return 2 * p * r / (p + r)


def first_divergence(a: Sequence, b: Sequence) -> int:
    """Length of the common prefix of ``a`` and ``b``."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def identical_share(a: Sequence, b: Sequence) -> float:
    """Positions holding the same token / ``max(len(a), len(b))`` (1 when both are empty)."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    return sum(x == y for x, y in zip(a, b)) / longest


# --------------------------------------------------------------------------- generation


def greedy_tokens(model, tokenizer, prompt: str, max_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt`` (plain text): up to ``max_tokens`` ids, EOS included."""
    from mlx_lm.generate import generate_step

    ids = mx.array(tokenize(tokenizer, prompt))
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [])
    out: list[int] = []
    for tok, _ in generate_step(ids, model, max_tokens=max_tokens):
        out.append(int(tok))
        if tok in eos:
            break
    return out


# --------------------------------------------------------------------------- distributions


def next_token_stats(ref_model, model, ids: np.ndarray) -> tuple[int, int, float]:
    """(positions, top-1 agreements, sum of KL(ref || model)) over (B, L) windows ``ids``."""
    x = mx.array(ids)
    ref = ref_model(x).astype(mx.float32)
    got = model(x).astype(mx.float32)
    if ref.shape[-1] != got.shape[-1]:
        raise DupqError(f"the models' vocabularies differ ({ref.shape[-1]} vs {got.shape[-1]} logits); "
                        "compare models that share a tokenizer")
    lp_ref = ref - mx.logsumexp(ref, axis=-1, keepdims=True)
    lp = got - mx.logsumexp(got, axis=-1, keepdims=True)
    kl = (mx.exp(lp_ref) * (lp_ref - lp)).sum(axis=-1)  # (B, L)
    agree = (mx.argmax(ref, axis=-1) == mx.argmax(got, axis=-1)).sum()
    mx.eval(kl, agree)
    return int(kl.size), int(agree.item()), float(mx.maximum(kl, 0).sum().item())


# --------------------------------------------------------------------------- entry points


def agreement(
    ref_model,
    model,
    tokenizer,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    max_tokens: int = 32,
    texts: str | None = None,
    ctx: int = 256,
    windows: int = 4,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Agreement of ``model`` with ``ref_model`` (see the module docstring).

    ``texts``: held-out text for the next-token part (skipped when None: its keys are None).
    Returns ``{"prompts", "max_tokens", "first_divergence", "identical_share", "bleu4",
    "rouge_l", "exact_match", "per_prompt": [...], "top1_agreement", "kl", "ctx", "windows",
    "positions", "seconds"}`` (prompt metrics are means over prompts)."""
    if not prompts:
        raise DupqError("the prompt set is empty; pass a file with one prompt per line")
    if max_tokens < 1:
        raise DupqError(f"--max-tokens {max_tokens} must be at least 1")
    if ctx < 2 or windows < 1:
        raise DupqError(f"--ctx {ctx} must be at least 2 and --windows {windows} at least 1")
    t0 = time.perf_counter()
    rows = []
    for i, p in enumerate(prompts):
        ref = greedy_tokens(ref_model, tokenizer, p, max_tokens)
        got = greedy_tokens(model, tokenizer, p, max_tokens)
        rows.append({
            "prompt": p,
            "first_divergence": first_divergence(ref, got) if ref != got else max_tokens,
            "identical_share": identical_share(ref, got),
            "bleu4": bleu(got, ref),
            "rouge_l": rouge_l(got, ref),
            "exact_match": ref == got,
            "reference": tokenizer.decode(ref),
            "output": tokenizer.decode(got),
        })
        if progress is not None:
            progress("generations", i + 1, len(prompts))
    res = {"prompts": len(rows), "max_tokens": max_tokens}
    for k in ("first_divergence", "identical_share", "bleu4", "rouge_l", "exact_match"):
        res[k] = float(np.mean([r[k] for r in rows]))
    res.update({"top1_agreement": None, "kl": None, "ctx": ctx, "windows": 0, "positions": 0})
    if texts is not None:
        wins = windows_of(tokenize(tokenizer, texts), ctx, windows)
        n = agree = 0
        kl = 0.0
        with codes_unpacked(ref_model, model):  # one short pass per window: see mlx_dupq.refine.train_codes
            for w in range(len(wins)):
                dn, da, dk = next_token_stats(ref_model, model, wins[w : w + 1])
                n, agree, kl = n + dn, agree + da, kl + dk
                if progress is not None:
                    progress("windows", w + 1, len(wins))
        res.update({"top1_agreement": agree / n, "kl": kl / n, "windows": len(wins), "positions": n})
    res["per_prompt"] = rows
    res["seconds"] = time.perf_counter() - t0
    return res


def read_prompts(path) -> list[str]:
    """A prompt file: one prompt per non-empty line."""
    from pathlib import Path

    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DupqError(f"could not read prompts from {p} ({type(e).__name__}); pass a UTF-8 file, one prompt per line") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise DupqError(f"{p} holds no prompts; write one prompt per line")
    return prompts


def vocab_size(model, tokenizer) -> tuple[int, int]:
    """(tokenizer vocabulary incl. added tokens, model logits width)."""
    inner = getattr(tokenizer, "tokenizer_of", tokenizer)
    logits = model(mx.array([[0]]))
    return len(inner), int(logits.shape[-1])


def agree_models(reference: str, model: str, prompts: Sequence[str] = DEFAULT_PROMPTS, max_tokens: int = 32,
                 data: str | None = "brown:eval", ctx: int = 256, windows: int = 4, compute_dtype: str = "float32",
                 progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Load REFERENCE and MODEL (any form :func:`mlx_dupq.io.loader.load` takes), check that they
    share a tokenizer, and run :func:`agreement` on them (``data``: a text set or file, or None)."""
    texts = load_text(data) if data else None
    ref_m, ref_tok = load(reference, compute_dtype=compute_dtype)
    m, tok = load(model, compute_dtype=compute_dtype)
    (rt, rl), (mt, ml) = vocab_size(ref_m, ref_tok), vocab_size(m, tok)
    if rt != mt or rl != ml:
        raise DupqError(
            f"{reference} and {model} do not share a tokenizer (vocab {rt} / {rl} logits vs {mt} / {ml}); "
            "compare a quantized model with its own reference"
        )
    res = agreement(ref_m, m, ref_tok, prompts, max_tokens=max_tokens, texts=texts, ctx=ctx, windows=windows,
                    progress=progress)
    return {"reference": str(reference), "model": str(model), "data": data, **res}
