"""How packs answer in chat: held-out conversations of the float teacher, and greedy answers to fixed prompts.

    python bench/chat_eval.py --teacher smollm2-135m --packs /tmp/a,/tmp/b --labels plain,chat \
        --out bench/results/chat_eval_smollm2-135m.json [--conversations 32] [--max-tokens 256]

- **held-out chat set**: prompts built from the ``mix:eval`` documents (a passage with a request, or a piece
  of code with one: :func:`mlx_dupq.refine.chat_data.prompts` with ``split="eval"``, never what the e2e
  stage trains on, which uses ``:calib`` documents and standalone instructions), answered by the float
  teacher (sampled at ``--temp``, top-p 0.95, seeded; kept in ``--conversations-file`` so a rerun scores the
  same answers). Each model is scored on the assistant tokens of those conversations in the chat template:
  the mean ``KL(teacher || model)`` per token, top-1 agreement with the teacher, and the perplexity of the
  teacher's answers (the teacher's own row is the floor);
- **greedy answers** of the teacher and every pack to ``--prompts`` (``;``-separated; default: the
  quickstart's prompt and two more), ``--gen-tokens`` tokens each.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from mlx_dupq._env import reexec_with_fast_blas

reexec_with_fast_blas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from mlx_dupq.errors import DupqError  # noqa: E402
from mlx_dupq.generate import stream_model  # noqa: E402
from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.io.loader import load  # noqa: E402
from mlx_dupq.refine import chat_data  # noqa: E402

PROMPTS = ("Write one sentence about the sea.;What is the capital of France?;"
           "Give two reasons why people keep dogs as pets.")


def held_out(teacher, tok, n: int, seed: int, max_tokens: int, temp: float, path: Path | None) -> list[list[dict]]:
    if path is not None and path.is_file():
        convs = chat_data.read_conversations(path)
        if len(convs) >= n:
            return convs[:n]
    ps = chat_data.prompts("mix:calib", n, seed, split="eval")
    convs = chat_data.generate_answers(teacher, tok, ps, max_tokens, temp, seed)
    if path is not None:
        chat_data.write_conversations(path, convs)
    return convs


def answer_span(tok, msgs: list[dict]) -> tuple[np.ndarray, int]:
    """(token ids of the whole conversation, index of the first assistant token)."""
    full = np.asarray(tok.apply_chat_template(msgs, tokenize=True), np.int32)
    head = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True)
    if list(full[: len(head)]) != list(head):
        raise DupqError("the chat template's prompt is not a prefix of the conversation; cannot find the answer")
    return full, len(head)


def score(models: dict[str, nn.Module], teacher: nn.Module, tok, convs: list[list[dict]]) -> dict[str, dict]:
    sums = {k: {"kl": 0.0, "agree": 0, "nll": 0.0} for k in models}
    n = 0
    for msgs in convs:
        ids, start = answer_span(tok, msgs)
        if len(ids) - start < 2:
            continue
        x = mx.array(ids[None, :-1])
        y = mx.array(ids[start:])
        sl = slice(start - 1, len(ids) - 1)
        tl = nn.log_softmax(teacher(x)[0, sl].astype(mx.float32), axis=-1)
        t1 = mx.argmax(tl, axis=-1)
        for k, m in models.items():
            ql = nn.log_softmax(m(x)[0, sl].astype(mx.float32), axis=-1)
            kl = (mx.exp(tl) * (tl - ql)).sum(axis=-1).sum()
            agree = (mx.argmax(ql, axis=-1) == t1).sum()
            nll = -mx.take_along_axis(ql, y[:, None], axis=-1).sum()
            mx.eval(kl, agree, nll)
            sums[k]["kl"] += float(kl.item())
            sums[k]["agree"] += int(agree.item())
            sums[k]["nll"] += float(nll.item())
        n += len(ids) - start
    return {k: {"answer_tokens": n, "kl": v["kl"] / n, "top1_agree": v["agree"] / n,
                "answer_ppl": math.exp(v["nll"] / n)} for k, v in sums.items()}


def greedy(m, tok, prompt: str, max_tokens: int) -> str:
    return "".join(stream_model(m, tok, prompt, max_tokens=max_tokens)).strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--packs", required=True, help="comma-separated pack directories")
    ap.add_argument("--labels", default=None, help="comma-separated labels (default: the directory names)")
    ap.add_argument("--conversations", type=int, default=32)
    ap.add_argument("--conversations-file", type=Path, default=None)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temp", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--prompts", default=PROMPTS)
    ap.add_argument("--gen-tokens", type=int, default=60)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    packs = [p for p in a.packs.split(",") if p]
    labels = a.labels.split(",") if a.labels else [Path(p).name for p in packs]
    if len(labels) != len(packs):
        raise SystemExit("--labels needs one label per pack")
    t0 = time.perf_counter()
    teacher, tok = load(a.teacher)
    convs = held_out(teacher, tok, a.conversations, a.seed, a.max_tokens, a.temp, a.conversations_file)
    models = {"teacher": teacher, **{lab: load(p)[0] for lab, p in zip(labels, packs)}}
    rows = score(models, teacher, tok, convs)
    prompts = [p.strip() for p in a.prompts.split(";") if p.strip()]
    for lab, m in models.items():
        rows[lab]["generation"] = {p: greedy(m, tok, p, a.gen_tokens) for p in prompts}
        rows[lab]["model"] = a.teacher if lab == "teacher" else packs[labels.index(lab)]
        print(f"{lab:>12}  KL {rows[lab]['kl']:.4f}  top-1 {rows[lab]['top1_agree']:.3f}  "
              f"answer PPL {rows[lab]['answer_ppl']:.2f}")
        for p, g in rows[lab]["generation"].items():
            print(f"{'':14}{p} -> {g[:150]!r}")
    out = {"command": "python bench/chat_eval.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "teacher": a.teacher, "conversations": len(convs), "answer_tokens": rows["teacher"]["answer_tokens"],
           "held_out": "prompts from mix:eval passages (chat_data.prompts split=eval), teacher answers sampled at "
                       f"temp {a.temp}, top-p {chat_data.TOP_P}, seed {a.seed}, <= {a.max_tokens} tokens",
           "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    write_result(a.out, out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
