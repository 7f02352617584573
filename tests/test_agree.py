"""Generation agreement: BLEU-4 / ROUGE-L by hand, identical and perturbed tiny models, the CLI."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dupq.errors import DupqError
import mlx_dupq
from mlx_dupq.eval.agree import (agreement, bleu, first_divergence, identical_share, lcs_length, next_token_stats,
                                 read_prompts, rouge_l)
from mlx_dupq.eval.data import tokenize
from mlx_dupq.eval.ppl import windows_of
from mlx_dupq.io.loader import load
from mlx_dupq.refine import train_codes
from tests.test_cli import assert_one_line_error, run
from tests.tiny import make_hf_dir

TEXT = "the quick brown fox jumps over the lazy dog. hello world, this is a tiny test corpus. " * 30


def test_bleu_by_hand():
    ref = "the cat sat on the mat".split()
    assert bleu(ref, ref) == pytest.approx(1.0)
    # p1 = 4/4, p2 = (2+1)/(3+1), p3 = (0+1)/(2+1), p4 = (0+1)/(1+1); BP = exp(1 - 6/4)
    cand = "the cat the mat".split()
    want = math.exp(1 - 6 / 4) * (1 * 0.75 * (1 / 3) * 0.5) ** 0.25
    assert bleu(cand, ref) == pytest.approx(want)
    # clipping: the reference has "the" twice -> p1 = 2/3; bigrams (0+1)/(2+1); trigram (0+1)/(1+1); no 4-gram: 1/1
    want = math.exp(1 - 6 / 3) * ((2 / 3) * (1 / 3) * (1 / 2) * (1 / 1)) ** 0.25
    assert bleu("the the the".split(), ref) == pytest.approx(want)
    assert bleu("dog".split(), ref) == 0.0 and bleu([], ref) == 0.0 and bleu([], []) == 1.0
    # short identical outputs still score 1 thanks to the add-one smoothing
    assert bleu([1, 2], [1, 2]) == pytest.approx(1.0)
    # longer candidate, no brevity penalty: p1 = 6/7, p2 = (5+1)/(6+1), p3 = (4+1)/(5+1), p4 = (3+1)/(4+1)
    assert bleu(ref + ["now"], ref) == pytest.approx((6 / 7 * 6 / 7 * 5 / 6 * 4 / 5) ** 0.25)


def test_rouge_l_by_hand():
    assert lcs_length("abcd", "acedf") == 3
    # LCS(a b c d, a c e d f) = a c d: P = 3/4, R = 3/5, F = 2PR/(P+R) = 2/3
    assert rouge_l("a b c d".split(), "a c e d f".split()) == pytest.approx(2 / 3)
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l([1], [2]) == 0.0 and rouge_l([], [1]) == 0.0 and rouge_l([], []) == 1.0


def test_prefix_metrics():
    assert first_divergence([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert identical_share([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    assert identical_share([1, 2], [1, 2, 3, 4]) == 0.5
    assert identical_share([], []) == 1.0


@pytest.fixture(scope="module")
def qwen(tiny_dirs):
    return load(tiny_dirs["qwen2"])


def test_identical_models_agree(qwen):
    m, tok = qwen
    r = agreement(m, m, tok, ["hello world", "the quick"], max_tokens=8, texts=TEXT, ctx=32, windows=2)
    assert r["identical_share"] == 1.0 and r["bleu4"] == pytest.approx(1.0) and r["rouge_l"] == 1.0
    assert r["exact_match"] == 1.0 and r["first_divergence"] == 8
    assert r["top1_agreement"] == 1.0 and r["kl"] == pytest.approx(0.0, abs=1e-6)
    assert r["windows"] == 2 and r["positions"] == 64 and len(r["per_prompt"]) == 2


def test_perturbed_model_agrees_less(tiny_dirs, qwen):
    m, tok = qwen
    p, _ = load(tiny_dirs["qwen2"])
    rng = np.random.default_rng(1)
    noisy = [(k, v + mx.array(rng.standard_normal(v.shape).astype(np.float32)) * 0.05)
             for k, v in tree_flatten(p.parameters()) if v.ndim == 2]
    p.load_weights(noisy, strict=False)
    r = agreement(m, p, tok, ["hello world", "the quick", "this is"], max_tokens=12, texts=TEXT, ctx=32, windows=2)
    assert r["kl"] > 1e-4 and r["top1_agreement"] < 1.0
    assert r["identical_share"] < 1.0 and r["bleu4"] < 1.0 and r["first_divergence"] < 12
    for k in ("identical_share", "bleu4", "rouge_l", "top1_agreement"):
        assert 0.0 <= r[k] <= 1.0


def test_pack_windows_take_the_unpacked_codes_path_with_the_same_stats(tiny_dirs, qwen, tmp_path, monkeypatch):
    """agreement() runs a pack's next-token windows on the unpacked-codes dense path and gets exactly
    the top-1 agreement and KL of the plain dense path (mx.dequantize every pass)."""
    m, tok = qwen
    mlx_dupq.convert(tiny_dirs["qwen2"], tmp_path / "w2", bits=2, group_size=32)
    p, _ = load(tmp_path / "w2")
    wins = windows_of(tokenize(tok, TEXT), 32, 2)
    n = agree = kl = 0
    for w in range(len(wins)):  # the slow path, window by window as agreement() runs them
        dn, da, dk = next_token_stats(m, p, wins[w : w + 1])
        n, agree, kl = n + dn, agree + da, kl + dk
    calls = []
    plain_from_codes = train_codes.from_codes
    monkeypatch.setattr(train_codes, "from_codes", lambda *a: calls.append(1) or plain_from_codes(*a))
    r = agreement(m, p, tok, ["hello"], max_tokens=2, texts=TEXT, ctx=32, windows=2)
    assert calls, "no layer took the unpacked-codes path"
    assert not any(hasattr(x, train_codes.CODES) for _, x in p.named_modules())  # restored afterwards
    assert kl > 0 and r["positions"] == n == 64
    assert r["top1_agreement"] == agree / n and r["kl"] == kl / n


def test_no_text_skips_next_token_part(qwen):
    m, tok = qwen
    r = agreement(m, m, tok, ["hello"], max_tokens=4)
    assert r["top1_agreement"] is None and r["kl"] is None and r["windows"] == 0
    with pytest.raises(DupqError, match="prompt set is empty"):
        agreement(m, m, tok, [], max_tokens=4)


def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("one\n\n  two  \n")
    assert read_prompts(f) == ["one", "two"]
    (tmp_path / "e.txt").write_text("\n \n")
    with pytest.raises(DupqError, match="no prompts"):
        read_prompts(tmp_path / "e.txt")


def test_cli_eval_agree(monkeypatch, capsys, tiny_dirs, tmp_path):
    data = tmp_path / "held.txt"
    data.write_text(TEXT)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\nthe quick brown\n")
    res = tmp_path / "agree.json"
    code, o, e = run(monkeypatch, capsys, "eval", "agree", tiny_dirs["qwen2"], tiny_dirs["qwen2"], "--prompts", prompts,
                     "--max-tokens", "6", "--data", data, "--ctx", "32", "--windows", "2", "--json", res)
    assert code == 0, e
    r = json.loads(res.read_text())
    assert r["prompts"] == 2 and r["bleu4"] == pytest.approx(1.0) and r["top1_agreement"] == 1.0
    assert r["command"].startswith("mlx-dupq eval agree")
    assert "BLEU-4" in o and "top-1" in o

    other = make_hf_dir(tmp_path / "other", "qwen2", vocab_size=384)
    code, o, e = run(monkeypatch, capsys, "eval", "agree", tiny_dirs["qwen2"], other, "--max-tokens", "2", "--data", data)
    assert_one_line_error(code, e, "do not share a tokenizer")
