"""Tasks from held-out text: seeded builders, answers correct by construction, scoring, the CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import mlx_dupq
from mlx_dupq.errors import DupqError
from mlx_dupq.eval import data as datamod
from mlx_dupq.eval import tasks as tasksmod
from mlx_dupq.eval.data import split_documents, tokenize
from mlx_dupq.eval.tasks import (build_cloze, build_mc, continuation_logprobs, parse_tasks, run_cloze, run_mc,
                                 run_tasks, sentences)
from mlx_dupq.io.loader import load
from mlx_dupq.refine import train_codes
from tests.test_cli import assert_one_line_error, run

SUBJECTS = ["The farmer", "Mr. Jones", "The old teacher", "A young sailor", "The mayor", "Her brother", "The doctor"]
VERBS = ["walked to", "looked at", "spoke about", "wrote to", "thought of", "waited near", "painted"]
OBJECTS = ["the river", "the market", "the station", "the church", "the harbor", "the garden", "the school"]
ENDS = ["yesterday.", "at noon.", "in silence!", "with care.", "once again?", "before dinner.", "every morning."]


def _doc(i: int, n_sent: int = 30) -> str:
    lines, para = [], []
    for s in range(n_sent):
        k = i * 31 + s * 7
        para.append(f"{SUBJECTS[k % 7]} {VERBS[(k // 7) % 7]} {OBJECTS[(k // 3 + i) % 7]} {ENDS[(k + s) % 7]}")
        if len(para) == 4:
            lines.append(" ".join(para))
            para = []
    lines.append(" ".join(para))
    return "\n".join(l for l in lines if l)


@pytest.fixture(scope="module")
def docs():
    """20 small documents in 2 genres, as (doc_id, genre, text)."""
    return [(f"c{'ab'[i % 2]}{i:02d}", "ab"[i % 2], _doc(i)) for i in range(20)]


def test_sentences():
    t = 'Mr. Smith went to Washington. He said "Hello!" Then he left\nA new line here. J. F. Kennedy too? Yes.'
    assert [t[a:b] for a, b in sentences(t)] == [
        "Mr. Smith went to Washington.", 'He said "Hello!"', "Then he left", "A new line here.",
        "J. F. Kennedy too?", "Yes."]


def test_cloze_deterministic_and_correct(docs):
    a = build_cloze(docs, 15, seed=3, context_words=20)
    assert a == build_cloze(docs, 15, seed=3, context_words=20)
    assert a != build_cloze(docs, 15, seed=4, context_words=20)
    assert len(a) == 15
    texts = {d: t for d, _, t in docs}
    for it in a:
        assert len(it["context"].split()) == 20
        # the target is the passage's true last word: the context is followed in the document by it
        text = texts[it["doc_id"]]
        hit = re.search(re.escape(it["context"]) + r"\s+" + re.escape(it["target"]) + r"[.!?]", text)
        assert hit is not None, it
        assert it["target"].isalpha()


def test_mc_deterministic_and_correct(docs):
    a = build_mc(docs, 12, seed=0)
    assert a == build_mc(docs, 12, seed=0) and a != build_mc(docs, 12, seed=1)
    texts = {d: t for d, _, t in docs}
    labels = set()
    for it in a:
        assert len(it["options"]) == 4 and len(set(it["options"])) == 4
        text = texts[it["doc_id"]]
        sents = [text[x:y] for x, y in sentences(text)]
        true = it["options"][it["label"]]
        # the true option is the sentence right after the context's three sentences
        assert any(sents[i] == true and " ".join(sents[i - 3 : i]) == it["context"] for i in range(3, len(sents)))
        # distractors come from other documents
        for j, o in enumerate(it["options"]):
            if j != it["label"]:
                assert any(o in t for d, t in texts.items() if d != it["doc_id"])
        labels.add(it["label"])
    assert len(labels) > 1  # the answer position is shuffled


def test_builders_disjoint_from_calibration(docs):
    calib, evals = split_documents(docs)
    calib_ids, eval_ids = {d for d, _, _ in calib}, {d for d, _, _ in evals}
    for it in build_cloze(evals, 10, seed=0, context_words=20) + build_mc(evals, 10, seed=0):
        assert it["doc_id"] in eval_ids and it["doc_id"] not in calib_ids
    for it in build_mc(evals, 10, seed=0):  # distractors too
        for o in it["options"]:
            assert any(o in t for _, _, t in evals)


def test_builder_errors(docs):
    with pytest.raises(DupqError, match="no passage"):
        build_cloze(docs[:1], 5, context_words=10_000)
    with pytest.raises(DupqError, match="at least 2 documents"):
        build_mc(docs[:1], 5)
    with pytest.raises(DupqError, match="unknown task"):
        parse_tasks("cloze,mmlu")
    assert parse_tasks("mc, cloze,mc") == ["mc", "cloze"]


def test_run_on_tiny_model(tiny_dirs, docs):
    m, tok = load(tiny_dirs["qwen2"])
    r = run_cloze(m, tok, build_cloze(docs, 4, seed=0, context_words=12))
    assert 0.0 <= r["acc"] <= 1.0 and r["target_nll"] > 0 and r["n"] == 4
    r = run_mc(m, tok, build_mc(docs, 4, seed=0))
    assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0 and r["n"] == 4


@pytest.fixture(scope="module")
def tiny_packs(tiny_dirs, tmp_path_factory):
    """A 2-bit mlx-format pack (mlx's quantized layers) and a ternary dupq-format one (DupqLinear,
    DupqEmbedding as the tied head) of the tiny qwen2 model."""
    root = tmp_path_factory.mktemp("task_packs")
    mlx_dupq.convert(tiny_dirs["qwen2"], root / "w2", bits=2, group_size=32)
    mlx_dupq.convert(tiny_dirs["qwen2"], root / "t", bits=1.58, group_size=64, symmetric=True)
    return {"w2": root / "w2", "ternary": root / "t"}


@pytest.mark.parametrize("which", ["w2", "ternary"])
def test_pack_tasks_take_the_unpacked_codes_path_with_the_same_scores(tiny_packs, docs, monkeypatch, which):
    """run_tasks runs a pack's dense matmuls from unpacked codes (the fast path) and scores exactly as the
    plain dense path (mx.dequantize every pass) of run_cloze / run_mc called on their own."""
    m, tok = load(tiny_packs[which])
    kinds = {type(x).__name__ for _, x in m.named_modules()}
    assert kinds & {"DensePrefillQuantizedLinear", "DupqLinear", "DupqEmbedding"}, kinds
    cloze, mc = build_cloze(docs, 4, seed=0), build_mc(docs, 4, seed=0)
    it = mc[0]
    ctx = tokenize(tok, it["context"]).tolist()
    assert len(ctx) >= 16  # inputs big enough for the dense path
    conts = [list(tok.encode(" " + o, add_special_tokens=False)) for o in it["options"]]
    slow = {"cloze": run_cloze(m, tok, cloze), "mc": run_mc(m, tok, mc), "lp": continuation_logprobs(m, ctx, conts)}

    calls = []
    plain_from_codes = train_codes.from_codes
    monkeypatch.setattr(train_codes, "from_codes", lambda *a: calls.append(1) or plain_from_codes(*a))
    seen = {}
    plain_mc = tasksmod.run_mc

    def spy_mc(model, tokenizer, items, progress=None):
        seen["lp"] = continuation_logprobs(model, ctx, conts)
        return plain_mc(model, tokenizer, items, progress=progress)

    monkeypatch.setattr(tasksmod, "run_mc", spy_mc)
    fast = run_tasks(m, tok, docs, n=4, seed=0)
    assert calls, "no layer took the unpacked-codes path"
    assert not any(hasattr(x, train_codes.CODES) for _, x in m.named_modules())  # restored afterwards
    assert fast["cloze"] == slow["cloze"] and fast["mc"] == slow["mc"]
    for a, b in zip(seen["lp"], slow["lp"]):
        np.testing.assert_array_equal(a, b)


def test_cli_eval_tasks(monkeypatch, capsys, tiny_dirs, tmp_path, docs):
    seen = []

    def fake_documents(name):
        seen.append(name)
        return split_documents(docs)[1] if name.endswith(":eval") else docs

    monkeypatch.setattr(datamod, "documents", fake_documents)
    res = tmp_path / "tasks.json"
    code, o, e = run(monkeypatch, capsys, "eval", "tasks", tiny_dirs["qwen2"], "--tasks", "cloze,mc", "--n", "3",
                     "--seed", "1", "--json", res)
    assert code == 0, e
    r = json.loads(res.read_text())
    assert seen == ["brown:eval"] and r["cloze"]["n"] == 3 and r["mc"]["n"] == 3
    assert 0 <= r["cloze"]["acc"] <= 1 and 0 <= r["mc"]["acc_norm"] <= 1
    assert r["command"].startswith("mlx-dupq eval tasks") and "cloze" in o

    code, o, e = run(monkeypatch, capsys, "eval", "tasks", tiny_dirs["qwen2"], "--data", "brown:calib")
    assert_one_line_error(code, e, "not a held-out set", exit_code=2)
    code, o, e = run(monkeypatch, capsys, "eval", "tasks", tiny_dirs["qwen2"], "--tasks", "arc")
    assert_one_line_error(code, e, "unknown task", exit_code=2)
