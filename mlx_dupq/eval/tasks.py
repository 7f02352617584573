"""Downstream tasks built from real held-out text (README.md, F7.2 substitutes for LAMBADA / HellaSwag).

Both tasks are built by pure, seeded functions from a list of documents ``(doc_id, genre, text)``
— by default ``brown:eval``, which shares no document with the calibration text ``brown:calib``
(:func:`mlx_dupq.eval.data.split_documents`).

**cloze** (LAMBADA-style last word, :func:`build_cloze`): every word of a document that ends a
sentence (letters only, 2+ of them, then ``.``, ``!`` or ``?`` and maybe a closing quote) and has
at least ``context_words`` words before it is a candidate; ``n`` candidates are drawn without
replacement with ``numpy.random.default_rng(seed)``. The item's ``context`` is the exact text of
the ``context_words`` words before the target (line breaks kept), the ``target`` the word without
its punctuation. :func:`run_cloze`: ``acc`` = share of items whose greedy continuation's first
word (punctuation stripped) equals the target exactly; ``target_nll`` = mean over items of the
summed NLL (nats) of the target's tokens ``" " + target`` given the context.

**mc** (next sentence among 4, HellaSwag-like, :func:`build_mc`): documents are cut into
sentences (:func:`sentences`); an item is ``context_sentences`` consecutive sentences of one
document (``context``), its true next sentence and 3 distractor sentences drawn from other
documents, options in a seeded random order (``label`` = index of the true one). Sentences used as
options have 4 to 60 words. :func:`run_mc` scores each option by the sum of its tokens' log-
likelihoods given the context (continuation ``" " + option``): ``acc`` = argmax of the sum,
``acc_norm`` = argmax of the sum divided by the continuation's length in UTF-8 bytes (as
lm-eval's ``acc_norm`` for HellaSwag).
"""

from __future__ import annotations

import re
import string
import time
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from ..errors import DupqError, UsageError
from ..refine.train_codes import codes_unpacked
from .data import Document, tokenize

TASKS = ("cloze", "mc")
_WORD = re.compile(r"\S+")
_TARGET = re.compile(r"^([A-Za-z]{2,})[.!?][\"']?$")
_SENT_END = re.compile(r"[.!?][\"')]*(?=\s|$)")
_ABBREV = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "co", "inc", "ltd", "vs", "gen", "gov", "rev", "prof",
           "sen", "rep", "mt", "ft", "no", "jan", "feb", "aug", "sept", "oct", "nov", "dec", "corp", "lt", "col"}


# --------------------------------------------------------------------------- builders (pure)


def build_cloze(docs: Sequence[Document], n: int, seed: int = 0, context_words: int = 64) -> list[dict]:
    """``n`` last-word cloze items ``{"doc_id", "context", "target"}`` (see the module docstring)."""
    if n < 1 or context_words < 1:
        raise DupqError(f"the cloze task needs n >= 1 and context_words >= 1 (got {n}, {context_words})")
    cands = []
    for d, (_, _, text) in enumerate(docs):
        words = list(_WORD.finditer(text))
        for i in range(context_words, len(words)):
            if _TARGET.match(words[i].group()):
                cands.append((d, i))
    if not cands:
        raise DupqError(f"no passage of {context_words}+ words ending a sentence in {len(docs)} documents; "
                        "use longer documents or a smaller context")
    pick = np.random.default_rng(seed).choice(len(cands), size=min(n, len(cands)), replace=False)
    items = []
    for k in pick:
        d, i = cands[int(k)]
        doc_id, _, text = docs[d]
        words = list(_WORD.finditer(text))
        start, end = words[i - context_words].start(), words[i - 1].end()
        items.append({"doc_id": doc_id, "context": text[start:end], "target": _TARGET.match(words[i].group()).group(1)})
    return items


def sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of ``text``: a sentence ends at ``.``, ``!``
    or ``?`` (with closing quotes/brackets) before whitespace, except after a known abbreviation
    (Mr., Dr., St., ...) or a single letter (initials); a line break always ends one."""
    spans = []
    pos = 0
    for line in text.split("\n"):
        start = 0
        for m in _SENT_END.finditer(line):
            before = line[start : m.start()].rsplit(None, 1)
            word = before[-1].lower().strip(string.punctuation) if before else ""
            if m.group()[0] == "." and (word in _ABBREV or len(word) == 1):
                continue
            seg = line[start : m.end()]
            if seg.strip():
                spans.append((pos + start + len(seg) - len(seg.lstrip()), pos + m.end()))
            start = m.end()
        rest = line[start:]
        if rest.strip():
            spans.append((pos + start + len(rest) - len(rest.lstrip()), pos + len(line.rstrip())))
        pos += len(line) + 1
    return spans


def _option_ok(s: str) -> bool:
    return 4 <= len(s.split()) <= 60


def build_mc(docs: Sequence[Document], n: int, seed: int = 0, context_sentences: int = 3,
             choices: int = 4) -> list[dict]:
    """``n`` next-sentence items ``{"doc_id", "context", "options", "label"}`` (see the module docstring)."""
    if n < 1 or context_sentences < 1 or choices < 2:
        raise DupqError(f"the mc task needs n >= 1, context_sentences >= 1, choices >= 2 (got {n}, {context_sentences}, {choices})")
    if len({d[0] for d in docs}) < 2:
        raise DupqError("the mc task draws distractors from other documents; pass at least 2 documents")
    sents = [[text[a:b] for a, b in sentences(text)] for _, _, text in docs]
    pool = [(d, s) for d, ss in enumerate(sents) for s in ss if _option_ok(s)]  # distractor pool
    cands = [(d, i) for d, ss in enumerate(sents) for i in range(context_sentences, len(ss)) if _option_ok(ss[i])]
    if not cands:
        raise DupqError(f"no sentence with {context_sentences} sentences before it in {len(docs)} documents; "
                        "use longer documents")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(cands), size=min(n, len(cands)), replace=False)
    items = []
    for k in pick:
        d, i = cands[int(k)]
        true = sents[d][i]
        others = [s for dd, s in pool if docs[dd][0] != docs[d][0] and s != true]
        if len(set(others)) < choices - 1:
            raise DupqError("too few sentences in other documents for the distractors; pass more documents")
        distract: list[str] = []
        while len(distract) < choices - 1:
            s = others[int(rng.integers(len(others)))]
            if s not in distract:
                distract.append(s)
        label = int(rng.integers(choices))
        options = distract[:label] + [true] + distract[label:]
        ctx = " ".join(sents[d][i - context_sentences : i])
        items.append({"doc_id": docs[d][0], "context": ctx, "options": options, "label": label})
    return items


# --------------------------------------------------------------------------- scoring


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def continuation_logprobs(model, ctx_ids: Sequence[int], conts: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Per-token log-probabilities (float32) of each continuation given the context.

    One right-padded batch ``(len(conts), len(ctx) + max_cont - 1)``; padding lies after every
    scored position, so (causal attention) it changes nothing. Returns one (len(cont),) array each."""
    if not ctx_ids:
        raise DupqError("empty context; every item needs some context text")
    longest = max(len(c) for c in conts)
    L = len(ctx_ids) + longest - 1
    x = np.zeros((len(conts), L), dtype=np.int32)
    for b, c in enumerate(conts):
        seq = list(ctx_ids) + list(c)[:-1]
        x[b, : len(seq)] = seq
    logits = model(mx.array(x)).astype(mx.float32)
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    mx.eval(lp)
    out = []
    start = len(ctx_ids) - 1
    for b, c in enumerate(conts):
        rows = lp[b, start : start + len(c)]
        picked = mx.take_along_axis(rows, mx.array(np.asarray(c, dtype=np.int32))[:, None], axis=-1)[:, 0]
        out.append(np.array(picked))
    return out


def _first_word(text: str) -> str:
    words = text.split()
    return words[0].strip(string.punctuation + "\"'") if words else ""


def run_cloze(model, tokenizer, items: Sequence[dict], max_new_tokens: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> dict:
    """``{"acc", "target_nll", "n"}`` of ``model`` on cloze ``items`` (see the module docstring).
    ``max_new_tokens``: greedy tokens generated per item (default: the target's tokens + 3)."""
    from mlx_lm.generate import generate_step

    if not items:
        raise DupqError("no cloze items to score")
    hits, nll = 0, 0.0
    for k, it in enumerate(items):
        ctx = tokenize(tokenizer, it["context"]).tolist()
        cont = _encode(tokenizer, " " + it["target"])
        nll -= float(continuation_logprobs(model, ctx, [cont])[0].sum())
        budget = max_new_tokens or len(cont) + 3
        gen = [t for t, _ in generate_step(mx.array(ctx), model, max_tokens=budget)]
        hits += _first_word(tokenizer.decode(gen)) == it["target"]
        if progress is not None:
            progress(k + 1, len(items))
    return {"acc": hits / len(items), "target_nll": nll / len(items), "n": len(items)}


def run_mc(model, tokenizer, items: Sequence[dict], progress: Callable[[int, int], None] | None = None) -> dict:
    """``{"acc", "acc_norm", "n"}`` of ``model`` on next-sentence ``items`` (see the module docstring)."""
    if not items:
        raise DupqError("no multiple-choice items to score")
    acc = acc_norm = 0
    for k, it in enumerate(items):
        ctx = tokenize(tokenizer, it["context"]).tolist()
        conts = [_encode(tokenizer, " " + o) for o in it["options"]]
        ll = np.array([float(lp.sum()) for lp in continuation_logprobs(model, ctx, conts)])
        nbytes = np.array([len((" " + o).encode("utf-8")) for o in it["options"]])
        acc += int(np.argmax(ll)) == it["label"]
        acc_norm += int(np.argmax(ll / nbytes)) == it["label"]
        if progress is not None:
            progress(k + 1, len(items))
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}


def parse_tasks(spec: str) -> list[str]:
    """``"cloze,mc"`` -> ``["cloze", "mc"]``, checked against :data:`TASKS`."""
    names = [t.strip().lower() for t in spec.split(",") if t.strip()]
    bad = [t for t in names if t not in TASKS]
    if bad or not names:
        raise UsageError(f"unknown task {', '.join(bad) or spec!r}; use a comma-separated list of {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def run_tasks(model, tokenizer, docs: Sequence[Document], tasks: Sequence[str] = TASKS, n: int = 200, seed: int = 0,
              progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Build each task from ``docs`` (seeded) and score ``model``: ``{task: {...metrics}, "seconds"}``.

    On the CPU a pack's quantized layers run their dense path from codes unpacked once for the whole
    run (:func:`mlx_dupq.refine.train_codes.codes_unpacked`): the same scores, ~2-3x faster."""
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise UsageError(f"unknown task {bad[0]!r}; use {', '.join(TASKS)}")
    t0 = time.perf_counter()
    res: dict = {}
    with codes_unpacked(model):  # ~100-token passes: weights rebuilt from unpacked codes (same values, faster)
        for t in tasks:
            cb = (lambda d, tot, t=t: progress(t, d, tot)) if progress is not None else None
            if t == "cloze":
                res[t] = run_cloze(model, tokenizer, build_cloze(docs, n, seed), progress=cb)
            else:
                res[t] = run_mc(model, tokenizer, build_mc(docs, n, seed), progress=cb)
    res["seconds"] = time.perf_counter() - t0
    return res
