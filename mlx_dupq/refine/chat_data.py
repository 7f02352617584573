"""Chat turns for the end-to-end distillation (``[refine.e2e] chat_samples``): windows of conversations in the
model's chat template, beside the plain calibration text.

A pack distilled on plain text only never sees the context a chat user gives it (template tokens, a question,
the start of an answer), and small packs answer there with nothing or a loop even where their plain-text
PPL is close to the teacher's. The data-free remedy of LLM-QAT (Liu et al. 2023) is to train on the
teacher's own generations; mlx-lm's DWQ distils on a supervised chat set. Here:

- ``chat_data = "self"``: the float teacher answers a set of prompts (sampled at ``temp`` with top-p 0.95,
  at most ``max_tokens`` per answer, in rounds of :data:`ROUND` prompts, each round seeded), the prompts
  built from the calibration documents (never an ``:eval`` split): a passage of prose with a request about it
  (summarise, continue, explain, ask questions ...) or a piece of code with one (explain, document, review ...),
  and every third one a standalone instruction from :data:`INSTRUCTIONS` (none of them is a prompt this
  project evaluates with: see tests/test_chat_data.py). The conversations are cached as JSON lines in
  mlx-lm's chat format under the user's cache (keyed by the teacher's fingerprint, the prompt set and the
  options), so a second run with the same teacher does not generate again; a longer run extends the cache;
- ``chat_data = FILE.jsonl``: your own conversations, one ``{"messages": [{"role": ..., "content": ...}, ...]}``
  per line (mlx-lm's chat format).

Every conversation is tokenized with the tokenizer's chat template (its default system prompt included, as
``mlx-dupq generate`` sends it) and the conversations are packed end to end into one token stream, which the
e2e stage cuts into windows as it does the calibration text.

Generating needs the whole float teacher in memory (a streamed teacher is loaded whole for it, then freed):
on a machine where the float model does not fit, generate the conversations elsewhere and pass the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import batch_generate
from mlx_lm.sample_utils import make_sampler

from ..cache import cache_dir
from ..errors import DupqError
from ..io.atomic import write_text_atomic
from ..eval.data import Document, documents

Progress = Callable[[str, int, int, dict], None]

CHAT_VERSION = 1
ROUND = 16  # prompts per generation round (one batch_generate call, one seed)
TOP_P = 0.95
PASSAGE_CHARS = 700
CODE_LINES = 30

#: standalone requests, every third prompt (cycled in a seeded order). Not the prompts the project
#: evaluates generation with ("Write one sentence about the sea.", the Fibonacci function).
INSTRUCTIONS = (
    "Explain how a bicycle stays upright while it moves.",
    "Give me three tips for learning a new language.",
    "What is the difference between weather and climate?",
    "Write a short poem about autumn leaves.",
    "Describe the water cycle in simple terms.",
    "How do vaccines help the body fight disease?",
    "Write a polite email asking a colleague to reschedule a meeting.",
    "What are the main causes of inflation?",
    "Summarize the plot of a typical detective story in three sentences.",
    "Explain what a prime number is, with two examples.",
    "List five healthy breakfast ideas.",
    "Why do we have seasons on Earth?",
    "Write a two-sentence story about a lost key.",
    "What is photosynthesis?",
    "Give advice to someone who is nervous about a job interview.",
    "Explain the rules of chess in a short paragraph.",
    "What does a city council do?",
    "Describe a quiet morning in a small village.",
    "How does a refrigerator keep food cold?",
    "What are the benefits of regular exercise?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Explain the difference between a list and a tuple in Python.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that returns the largest value in a list without using max().",
    "What does the 'git commit' command do?",
    "Explain recursion to a beginner programmer.",
    "Write a SQL query that counts the orders of each customer.",
    "What is the time complexity of binary search, and why?",
    "Write a Python function that counts the words in a text.",
    "Explain what an API is in two sentences.",
    "How do I read a CSV file in Python?",
    "Write a shell command that finds all .txt files in a directory.",
    "What is a hash table?",
    "Explain the difference between a process and a thread.",
    "Write a JavaScript function that reverses an array.",
    "What is the purpose of unit tests?",
    "Describe the main parts of a plant cell.",
    "Why is the sky blue?",
    "Write a thank-you note to a teacher.",
    "What are three good habits for saving money?",
    "Compare trains and airplanes for a 500 km trip.",
    "What is democracy?",
    "Give a recipe for a simple tomato soup.",
    "Explain what gravity is.",
    "Write a haiku about a mountain.",
    "What should I pack for a weekend hiking trip?",
    "Explain the meaning of the proverb 'a stitch in time saves nine'.",
    "How does a library organise its books?",
)

PROSE_REQUESTS = (
    "Summarize the following passage in two sentences.\n\n{p}",
    "What is the main point of this text?\n\n{p}",
    "Continue this text with a few more sentences.\n\n{p}",
    "Rewrite this passage in simpler words.\n\n{p}",
    "Write three questions a reader might ask after reading this.\n\n{p}",
    "{p}\n\nWhat can we learn from this passage?",
    "Give this passage a short title and explain your choice.\n\n{p}",
    "{p}\n\nWho or what is this text about? Answer briefly.",
)

CODE_REQUESTS = (
    "Explain what this code does.\n\n```python\n{p}\n```",
    "Write a short docstring for this code.\n\n```python\n{p}\n```",
    "Is there anything in this code that could be improved?\n\n```python\n{p}\n```",
    "```python\n{p}\n```\n\nDescribe the inputs and outputs of this code.",
    "Write a test for this code.\n\n```python\n{p}\n```",
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _passage(text: str, rng: np.random.Generator) -> str:
    """A few whole sentences (at most ~PASSAGE_CHARS characters) from a random place of ``text``."""
    sents = [s.strip() for s in _SENTENCE_END.split(text.replace("\n", " ")) if s.strip()]
    if not sents:
        return text[:PASSAGE_CHARS]
    i = int(rng.integers(0, len(sents)))
    out: list[str] = []
    while i < len(sents) and sum(len(s) + 1 for s in out) + len(sents[i]) <= PASSAGE_CHARS:
        out.append(sents[i])
        i += 1
    return " ".join(out) if out else sents[i - 1][:PASSAGE_CHARS] if i else sents[0][:PASSAGE_CHARS]


def _code_piece(text: str, rng: np.random.Generator) -> str:
    """Up to CODE_LINES lines starting at a random ``def`` / ``class`` line (or the file's start)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.lstrip().startswith(("def ", "class "))] or [0]
    i = starts[int(rng.integers(0, len(starts)))]
    return "\n".join(lines[i : i + CODE_LINES]).rstrip()


def _is_code(doc: Document) -> bool:
    return doc[0].endswith(".py")


def prompts(data: str, n: int, seed: int, split: str = "calib") -> list[str]:
    """``n`` user prompts built from the documents of the calibration set ``data`` (its ``:calib`` part
    when it names a whole set) and :data:`INSTRUCTIONS`; the same ``data``, ``seed`` give the same list,
    and a longer list starts with the shorter one.

    split="eval" (benchmarks only: a held-out chat set, bench/chat_eval.py): passages of the ``:eval``
    documents and no standalone instruction."""
    name = str(data).strip().lower()
    if ":eval" in name:
        raise DupqError(f"{data} is an evaluation split; chat prompts are built from calibration text")
    if split not in ("calib", "eval"):
        raise DupqError(f"split must be calib or eval, got {split!r}")
    base = name.partition(":")[0]
    if base not in ("brown", "lee", "code", "mix"):
        if split == "eval":
            raise DupqError(f"{data} has no evaluation split; use brown, lee, code or mix")
        docs: list[Document] = []  # a file: standalone instructions only
    else:
        docs = documents(f"{base}:{split}")
    rng = np.random.default_rng(seed)
    order = [INSTRUCTIONS[i] for i in rng.permutation(len(INSTRUCTIONS))]
    out = []
    for i in range(n):
        if not docs:
            out.append(order[i % len(order)])
            continue
        if i % 3 == 2 and split == "calib":
            out.append(order[(i // 3) % len(order)])
            continue
        doc = docs[int(rng.integers(0, len(docs)))]
        if _is_code(doc):
            req = CODE_REQUESTS[int(rng.integers(0, len(CODE_REQUESTS)))]
            out.append(req.format(p=_code_piece(doc[2], rng)))
        else:
            req = PROSE_REQUESTS[int(rng.integers(0, len(PROSE_REQUESTS)))]
            out.append(req.format(p=_passage(doc[2], rng)))
    return out


# --------------------------------------------------------------------------- conversations


def read_conversations(path: str | Path) -> list[list[dict]]:
    """The conversations of a JSON-lines file in mlx-lm's chat format (one ``{"messages": [...]}`` per line)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DupqError(f"chat data {path} is not a file; pass 'self' (the teacher's own answers) or a .jsonl "
                        "file with one {\"messages\": [...]} per line")
    convs = []
    for k, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            msgs = json.loads(line)["messages"]
            ok = isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise DupqError(f"{p}:{k} is not a chat line; each line must be {{\"messages\": [{{\"role\": ..., "
                            "\"content\": ...}, ...]}")
        convs.append(msgs)
    if not convs:
        raise DupqError(f"{p} holds no conversation")
    return convs


def write_conversations(path: Path, convs: list[list[dict]]) -> None:
    """``convs`` as JSON lines in mlx-lm's chat format, written atomically."""
    write_text_atomic(path, "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in convs))


def generate_answers(model: nn.Module, tokenizer, user_prompts: list[str], max_tokens: int, temp: float,
                     seed: int, first_round: int = 0, progress: Progress | None = None,
                     done_before: int = 0, total: int | None = None) -> list[list[dict]]:
    """The model's answers to ``user_prompts`` (chat template applied), in rounds of :data:`ROUND`;
    round r is sampled with seed ``seed + first_round + r``."""
    total = len(user_prompts) if total is None else total
    convs = []
    for r, i in enumerate(range(0, len(user_prompts), ROUND)):
        batch = user_prompts[i : i + ROUND]
        ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True) for p in batch]
        mx.random.seed(seed + first_round + r)
        res = batch_generate(model, tokenizer, ids, max_tokens=max_tokens,
                             sampler=make_sampler(temp=temp, top_p=TOP_P), completion_batch_size=ROUND)
        for p, a in zip(batch, res.texts):
            convs.append([{"role": "user", "content": p}, {"role": "assistant", "content": a.strip()}])
        if progress:
            progress("chat", done_before + len(convs), total, {"unit": "answers"})
    return convs


def conversation_ids(tokenizer, convs: list[list[dict]]) -> np.ndarray:
    """The conversations in the chat template, packed end to end -> (T,) int32."""
    out = [np.asarray(tokenizer.apply_chat_template(msgs, tokenize=True), dtype=np.int32) for msgs in convs]
    return np.concatenate(out) if out else np.zeros(0, np.int32)


def _lengths(tokenizer, convs: list[list[dict]]) -> list[int]:
    return [len(tokenizer.apply_chat_template(msgs, tokenize=True)) for msgs in convs]


def cache_path(teacher_fp: str, data: str, seed: int, max_tokens: int, temp: float) -> Path:
    key = json.dumps([CHAT_VERSION, teacher_fp, str(data), seed, max_tokens, temp, INSTRUCTIONS, PROSE_REQUESTS,
                      CODE_REQUESTS, ROUND, TOP_P])
    return cache_dir() / "chat" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.jsonl"


def self_conversations(teacher_model: Callable[[], nn.Module], tokenizer, need_tokens: int, data: str,
                       seed: int, max_tokens: int, temp: float, cache: Path | None,
                       progress: Progress | None = None) -> list[list[dict]]:
    """Enough teacher conversations for ``need_tokens`` tokens in the chat template: read from ``cache``
    (a JSON-lines file, None = no cache), the rest generated by ``teacher_model()`` (called only when some are
    missing) and appended to the cache. Rounds of :data:`ROUND`, so the same options give the same list."""
    convs = read_conversations(cache) if cache is not None and cache.is_file() else []
    lengths = _lengths(tokenizer, convs)  # tokens of each conversation in the template
    model = None
    while sum(lengths) < need_tokens:
        if model is None:
            model = teacher_model()
        # one round at a time (the cache grows in whole rounds, kept after each); the total shown is
        # estimated from the mean length so far (a first guess: max_tokens per conversation)
        have, n0 = sum(lengths), len(convs)
        per = max(1, have // n0) if n0 else max_tokens
        est = n0 + max(1, -(-(need_tokens - have) // (per * ROUND))) * ROUND
        new = generate_answers(model, tokenizer, prompts(data, n0 + ROUND, seed)[n0:], max_tokens, temp, seed,
                               first_round=n0 // ROUND, progress=progress, done_before=n0, total=est)
        convs += new
        lengths += _lengths(tokenizer, new)
        if cache is not None:
            write_conversations(cache, convs)
    del model
    # the shortest prefix with at least need_tokens tokens (all of them if none has)
    n = next((i + 1 for i, t in enumerate(np.cumsum(lengths)) if t >= need_tokens), len(convs))
    return convs[:n]


def digest(convs: list[list[dict]]) -> str:
    return hashlib.sha256(json.dumps(convs, sort_keys=True).encode()).hexdigest()[:12]
