"""Chat windows for the end-to-end distillation (mlx_dupq.refine.chat_data, E2ESpec.chat_*)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_dupq
from mlx_dupq.errors import DupqError, UsageError
from mlx_dupq.io.loader import load
from mlx_dupq.refine import chat_data
from mlx_dupq.refine.e2e import chat_windows, distill_pack
from mlx_dupq.refine.e2e_spec import E2ESpec

ROOT = Path(__file__).resolve().parent.parent
TEXT = ("the quick brown fox jumps over the lazy dog. hello world, this is a tiny test corpus. " * 30
        + "numbers 1 2 3 and more words here, said the cat to the dog.\n") * 6


@pytest.fixture(scope="module")
def chat_env(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    text = root / "calib.txt"
    text.write_text(TEXT)
    src = tiny_dirs["qwen2"]
    mlx_dupq.convert(src, root / "w2", bits=2, group_size=32)
    return src, root / "w2", text


def _spec(data, **kw) -> E2ESpec:
    d = dict(steps=4, lr=1e-4, samples=8, valid_samples=2, seq_len=32, batch=2, top_k=32, eval_every=2,
             patience=0, data=str(data), chat_samples=4, chat_max_tokens=12)
    d.update(kw)
    return E2ESpec(**d)


def test_prompts_are_calibration_text_and_never_the_evaluated_prompts():
    ps = chat_data.prompts("mix:calib", 60, seed=0)
    assert len(ps) == 60 and len(set(ps)) > 50
    assert chat_data.prompts("mix:calib", 30, seed=0) == ps[:30]  # a longer list starts with the shorter one
    assert chat_data.prompts("mix:calib", 30, seed=1) != ps[:30]
    assert sum("```python" in p for p in ps) >= 3  # code requests from the code documents
    assert sum(p in chat_data.INSTRUCTIONS for p in ps) == 20
    assert chat_data.prompts(__file__, 5, seed=0) == [chat_data.prompts(__file__, 48, 0)[i] for i in range(5)]
    assert len(set(chat_data.prompts(__file__, 48, seed=0))) == 48  # a file: every instruction once
    # the prompts the quickstart, README and benches generate with are not trained on
    evaluated = (ROOT / "scripts" / "quickstart.sh").read_text()
    assert "Write one sentence about the sea." in evaluated
    for p in chat_data.INSTRUCTIONS:
        assert not re.search(r"\bsea\b|fibonacci", p, re.I), p
    # passages come from the calibration documents, never the evaluation split
    from mlx_dupq.eval.data import documents
    calib, evals = (" ".join(t.replace("\n", " ") for _, _, t in documents(f"mix:{s}")) for s in ("calib", "eval"))
    passages = [max(p.split("\n\n"), key=len) for p in ps if p not in chat_data.INSTRUCTIONS and "```" not in p]
    assert len(passages) >= 20
    for body in passages:
        assert body[:200] in calib and body[:200] not in evals, body
    with pytest.raises(DupqError, match="evaluation split"):
        chat_data.prompts("brown:eval", 3, seed=0)


def test_spec_options_and_errors(tmp_path):
    s = _spec("mix:calib")
    assert E2ESpec.from_dict(s.to_dict()) == s
    assert s.chat_valid() == 1 and E2ESpec().chat_valid() == 0
    assert _spec("mix:calib", chat_samples=80, samples=80, valid_samples=4).chat_valid() == 4
    for kw, words in [(dict(chat_samples=-1), "chat_samples must be >= 0"),
                      (dict(chat_max_tokens=0), "chat_max_tokens must be >= 1"),
                      (dict(chat_temp=-0.5), "chat_temp must be >= 0"),
                      (dict(chat_data=""), "chat_data must be")]:
        with pytest.raises(UsageError, match=words):
            _spec("mix:calib", **kw)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"text": "no"}\n')
    with pytest.raises(DupqError, match=r"bad.jsonl:2 is not a chat line"):
        chat_data.read_conversations(bad)
    with pytest.raises(DupqError, match="is not a file"):
        chat_data.read_conversations(tmp_path / "missing.jsonl")


def test_self_conversations_generated_once_cached_and_extended(chat_env, tmp_path):
    src, _, text = chat_env
    model, tok = load(src)
    calls = []

    def teacher():
        calls.append(1)
        return model

    cache = tmp_path / "c.jsonl"
    a = chat_data.self_conversations(teacher, tok, 200, str(text), 0, 12, 0.7, cache)
    assert calls == [1] and cache.is_file()
    assert all(m[0]["role"] == "user" and m[1]["role"] == "assistant" for m in a)
    assert len(chat_data.conversation_ids(tok, a)) >= 200
    # the same request: read from the cache, the teacher never built
    b = chat_data.self_conversations(teacher, tok, 200, str(text), 0, 12, 0.7, cache)
    assert b == a and calls == [1]
    # more tokens: the cached ones kept (the same first conversations), new rounds appended
    c = chat_data.self_conversations(teacher, tok, 2000, str(text), 0, 12, 0.7, cache)
    assert c[: len(a)] == a and len(c) > len(a) and calls == [1, 1]
    assert len(chat_data.conversation_ids(tok, c)) >= 2000
    # deterministic: a fresh cache gives the same conversations
    d = chat_data.self_conversations(lambda: model, tok, 200, str(text), 0, 12, 0.7, tmp_path / "d.jsonl")
    assert d == a


def test_distill_with_chat_windows_records_them(chat_env, tmp_path, monkeypatch):
    src, w2, text = chat_env
    monkeypatch.setenv("MLX_DUPQ_CACHE", str(tmp_path / "cache"))  # (a source teacher's answers are cached)
    spec = _spec(text)
    model, tok = load(src)
    tr, va, name = chat_windows(model, tok, spec)
    assert tr.shape == (4, 33) and va.shape == (1, 33) and name.startswith("chat:self[")
    # the windows are in the chat template: the tiny template ends each message with a newline
    res = distill_pack(w2, src, spec, out=tmp_path / "r")
    rec = json.loads((tmp_path / "r" / "config.json").read_text())["mlx_dupq"]["refine"]["e2e"]
    assert rec["data"].startswith(f"{text}+chat:self[") and rec["options"]["chat_samples"] == 4
    assert res.train_tokens == (8 + 4) * 32 and res.valid_tokens == (2 + 1) * 32
    assert np.isfinite(res.valid_kl_before) and res.valid_kl_after <= res.valid_kl_before


def test_chat_file_and_too_little_chat_data(chat_env, tmp_path):
    src, w2, text = chat_env
    conv = tmp_path / "chats.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"question {i} about the lazy dog"},
                           {"role": "assistant", "content": "the quick brown fox jumps over the lazy dog. " * 3}]}
             for i in range(12)]
    conv.write_text("".join(json.dumps(x) + "\n" for x in lines))
    model, tok = load(src)
    tr, va, name = chat_windows(model, tok, _spec(text, chat_data=str(conv)))
    assert name.startswith("chat:chats.jsonl[12 conversations") and tr.shape == (4, 33)
    with pytest.raises(DupqError, match="is not a file"):  # named, so checked even with no chat windows
        distill_pack(w2, src, _spec(text, chat_samples=0, chat_data=str(tmp_path / "nope.jsonl")), out=tmp_path / "out")
    conv.write_text(json.dumps(lines[0]) + "\n")
    with pytest.raises(DupqError, match=r"the chat data \(1 conversations\) has .* windows"):
        chat_windows(model, tok, _spec(text, chat_data=str(conv)))
    assert not (tmp_path / "out").exists()


def test_convert_with_chat_windows_caches_the_teachers_answers(chat_env, tmp_path, monkeypatch):
    """[refine.e2e] chat_samples through convert: the source teacher is loaded whole to answer, the answers
    are cached under the user's cache (a second convert generates nothing), the stage's messages say so."""
    from mlx_dupq.config import Recipe
    from mlx_dupq.refine.spec import RefineSpec
    from mlx_dupq.specs import QuantSpec

    src, _, text = chat_env
    monkeypatch.setenv("MLX_DUPQ_CACHE", str(tmp_path / "cache"))
    opts = _spec(text).to_dict()
    rec = Recipe(name="e2e-chat", default=QuantSpec(bits=2, group_size=32), refine=RefineSpec(e2e=opts))
    seen = []
    mlx_dupq.convert(src, tmp_path / "p", rec, progress=lambda m, d, t: seen.append(m))
    cached = list((tmp_path / "cache" / "chat").glob("*.jsonl"))
    assert len(cached) == 1 and chat_data.read_conversations(cached[0])
    assert any("the teacher's answers for the chat data" in m for m in seen)
    assert any("+ 4 windows of chat, self" in m for m in seen)
    meta = json.loads((tmp_path / "p" / "config.json").read_text())["mlx_dupq"]["refine"]["e2e"]
    assert "+chat:self[" in meta["data"]
    import mlx_dupq.refine.e2e as e2e_mod

    def no_teacher(*a, **kw):
        raise AssertionError("the cached answers should have been used")
    monkeypatch.setattr(e2e_mod, "_generator", no_teacher)
    seen.clear()
    mlx_dupq.convert(src, tmp_path / "q", rec, progress=lambda m, d, t: seen.append(m))
    meta_q = json.loads((tmp_path / "q" / "config.json").read_text())["mlx_dupq"]["refine"]["e2e"]
    assert meta_q["data"] == meta["data"] and not any("answers for the chat data" in m for m in seen)


def test_two_ranks_share_rank0s_chat_windows(chat_env, tmp_path, monkeypatch):
    """Under mlx.launch rank 0 generates the conversations and sends them: the 2-rank pack records the same
    chat data and ends at the one-process run's validation KL."""
    import shutil
    import sys

    from mlx_dupq.testing import mlx_launch

    if shutil.which("mlx.launch") is None:
        pytest.skip("mlx.launch is not on PATH (it ships with mlx)")
    src, w2, text = chat_env
    monkeypatch.setenv("MLX_DUPQ_CACHE", str(tmp_path / "cache"))
    spec = _spec(text, batch=2, steps=4)
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_dict()))
    one = distill_pack(w2, src, spec, out=tmp_path / "one")
    worker = Path(__file__).resolve().parent / "e2e_dp_worker.py"
    try:
        r = mlx_launch(2, [sys.executable, str(worker), str(w2), str(src), str(tmp_path / "spec.json"),
                           str(tmp_path / "two")], timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    except RuntimeError:
        pytest.skip("no free consecutive ports on localhost")
    assert (tmp_path / "two" / "config.json").exists(), r.stdout[-3000:] + r.stderr[-3000:]
    recs = [json.loads((tmp_path / k / "config.json").read_text())["mlx_dupq"]["refine"]["e2e"]
            for k in ("one", "two")]
    assert recs[1]["processes"] == 2 and recs[1]["data"] == recs[0]["data"] and "+chat:self[" in recs[0]["data"]
    assert recs[1]["valid_kl_after"] == pytest.approx(one.valid_kl_after, rel=1e-4)


def test_no_chat_template_trains_on_text_and_says_so(chat_env, tmp_path):
    """A base model (no chat template) asked for chat windows, as convert --bpw does by default: the text
    windows train, the record says the chat windows were skipped."""
    import shutil

    src, w2, text = chat_env
    pack = tmp_path / "base"
    shutil.copytree(w2, pack)
    cfg = pack / "tokenizer_config.json"
    tc = json.loads(cfg.read_text())
    tc.pop("chat_template", None)
    cfg.write_text(json.dumps(tc))
    (pack / "chat_template.jinja").unlink(missing_ok=True)
    from mlx_dupq.io.manifest import read_manifest, write_manifest
    write_manifest(pack, read_manifest(pack)["recipe"])  # (an edited pack: hashed again)
    assert not getattr(load(pack)[1], "chat_template", None)
    res = distill_pack(pack, src, _spec(text), out=tmp_path / "r")
    rec = json.loads((tmp_path / "r" / "config.json").read_text())["mlx_dupq"]["refine"]["e2e"]
    assert rec["data"] == f"{text} (no chat template: the 4 chat windows skipped)"
    assert res.train_tokens == 8 * 32 and res.valid_tokens == 2 * 32
