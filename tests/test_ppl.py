"""Perplexity against a numpy hand computation on a tiny random llama model."""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import llama
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mlx_dupq.errors import DupqError
from mlx_dupq import metrics
from mlx_dupq.eval import ppl as P
from mlx_dupq.eval.data import tokenize

WORDS = "the cat sat on a mat and dog ran to big red house in park with tree".split()


def tiny_tokenizer(bos: bool = False) -> TokenizerWrapper:
    vocab = {"[UNK]": 0, "<bos>": 1, "<eos>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<bos>", eos_token="<eos>")
    return TokenizerWrapper(fast)


def tiny_model(vocab: int = 32, seed: int = 0) -> llama.Model:
    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def sample_text(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=n_words))


def numpy_nll(model, ids: np.ndarray, ctx: int, windows: int | None) -> tuple[float, int]:
    """Independent reference: float64 log-softmax with numpy on the model's logits."""
    n = len(ids) // ctx if windows is None else min(windows, len(ids) // ctx)
    total, count = 0.0, 0
    for w in range(n):
        x = ids[w * ctx : (w + 1) * ctx]
        logits = np.array(model(mx.array(x)[None])[0].astype(mx.float32), dtype=np.float64)
        for t in range(1, ctx):
            row = logits[t - 1]
            m = row.max()
            logp = row[x[t]] - (m + math.log(np.exp(row - m).sum()))
            total -= logp
            count += 1
    return total / count, count


@pytest.mark.parametrize("ctx,windows,batch", [(16, None, 1), (16, 3, 2), (7, None, 3)])
def test_ppl_matches_numpy(ctx, windows, batch):
    tok, model = tiny_tokenizer(), tiny_model()
    text = sample_text(75)
    ids = tokenize(tok, text)
    assert len(ids) == 75
    ref_nll, count = numpy_nll(model, ids, ctx, windows)
    seen = []
    r = P.perplexity(model, tok, text, ctx=ctx, windows=windows, batch_size=batch, progress=lambda d, t: seen.append((d, t)))
    n_win = 75 // ctx if windows is None else windows
    assert r["windows"] == n_win
    assert r["ctx"] == ctx
    assert r["tokens"] == n_win * (ctx - 1) == count
    assert r["text_tokens"] == 75
    assert r["nll"] == pytest.approx(ref_nll, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(ref_nll), rel=1e-5)
    assert r["seconds"] > 0
    assert seen[-1] == (n_win, n_win) and len(seen) == math.ceil(n_win / batch)


def test_windows_are_non_overlapping_and_drop_remainder():
    ids = np.arange(23, dtype=np.int32)
    w = P.windows_of(ids, 5)
    assert w.shape == (4, 5)
    assert w[1].tolist() == [5, 6, 7, 8, 9]
    assert P.windows_of(ids, 5, windows=2).shape == (2, 5)
    assert P.windows_of(ids, 5, windows=99).shape == (4, 5)  # clamped; the result reports 4


def test_more_windows_than_available_reports_actual_count():
    tok, model = tiny_tokenizer(), tiny_model()
    r = P.perplexity(model, tok, sample_text(40), ctx=16, windows=10)
    assert r["windows"] == 2 and r["tokens"] == 30


def test_token_nll_sum_chunked_and_low_precision(monkeypatch):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 9, 11)).astype(np.float32) * 5
    tgt = rng.integers(0, 11, size=(2, 9))
    ref = 0.0
    for b in range(2):
        for t in range(9):
            row = logits[b, t].astype(np.float64)
            ref += math.log(np.exp(row - row.max()).sum()) + row.max() - row[tgt[b, t]]
    monkeypatch.setattr(metrics, "CHUNK_BYTES", 4 * 11 * 2)  # 2 rows per chunk
    got = P.token_nll_sum(mx.array(logits), mx.array(tgt))
    assert got == pytest.approx(ref, rel=1e-6)
    # bfloat16 logits are upcast per chunk: the result matches float64 on the same values
    big = mx.array(logits * 300).astype(mx.bfloat16)
    vals = np.array(big.astype(mx.float32), dtype=np.float64)
    ref16 = sum(
        math.log(np.exp(vals[b, t] - vals[b, t].max()).sum()) + vals[b, t].max() - vals[b, t, tgt[b, t]]
        for b in range(2)
        for t in range(9)
    )
    assert P.token_nll_sum(big, mx.array(tgt)) == pytest.approx(ref16, rel=1e-6)


def test_bos_only_at_stream_start():
    tok = tiny_tokenizer(bos=True)
    ids = tokenize(tok, sample_text(30))
    assert ids[0] == 1 and (ids[1:] != 1).all() and len(ids) == 31


def test_text_shorter_than_one_window():
    tok, model = tiny_tokenizer(), tiny_model()
    with pytest.raises(DupqError, match="fewer than one window of 64"):
        P.perplexity(model, tok, sample_text(20), ctx=64)


@pytest.mark.parametrize("kw,msg", [({"ctx": 1}, "too short"), ({"windows": 0}, "at least 1"), ({"batch_size": 0}, "at least 1")])
def test_bad_arguments(kw, msg):
    tok, model = tiny_tokenizer(), tiny_model()
    with pytest.raises(DupqError, match=msg):
        P.perplexity(model, tok, sample_text(40), **kw)
