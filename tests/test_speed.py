"""Speed bench on a tiny model: positive finite numbers, exact token counts, sizes on disk."""

import math
import os

import mlx.core as mx
import pytest
from mlx_lm.models import llama
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mlx_dupq.errors import DupqError
from mlx_dupq.eval import speed as S
from mlx_dupq.eval.data import tokenize


def tiny_tokenizer() -> TokenizerWrapper:
    words = sorted(set(S.PROMPT_TEXT.replace(",", " ").replace(".", " ").split()))
    vocab = {"[UNK]": 0, "<eos>": 1, ",": 2, ".": 3}
    for w in words:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>"))


def tiny_model(vocab: int) -> llama.Model:
    mx.random.seed(0)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=vocab,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def test_bench_prompt_is_fixed_and_exact():
    tok = tiny_tokenizer()
    a = S.bench_prompt(tok, 150)
    b = S.bench_prompt(tok, 150)
    assert a.shape == (150,) and a.tolist() == b.tolist()
    assert a[:20].tolist() == tokenize(tok, S.PROMPT_TEXT)[:20].tolist()
    assert (a != 0).all()  # every word of the prompt is in the tiny vocabulary


def test_bench_speed_tiny_model():
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size)
    r = S.bench_speed(model, tok, prompt_tokens=32, gen_tokens=12, repeats=2)
    assert r["prompt_tokens"] == 32 and r["gen_tokens"] == 12 and len(r["runs"]) == 2
    assert all(run["generated"] == 12 for run in r["runs"])  # EOS never cuts a run short
    for k in ("prompt_tps", "generation_tps", "generation_cpu_tps", "ttft_s"):
        assert math.isfinite(r[k]) and r[k] > 0, k
    assert r["peak_memory_bytes"] > 0 and r["max_rss_bytes"] > 0
    assert len(r["load_avg_1min"]) == 2 and r["cpu_count"] >= 1
    assert r["peak_memory_mib"] == r["peak_memory_bytes"] / 2**20
    # llama KV cache: layers x (k + v) x kv_heads x steps x head_dim x 4 bytes, allocated in blocks of 256
    assert r["kv_cache_bytes"] == 2 * 2 * 2 * 256 * 16 * 4
    assert r["ttft_s"] == pytest.approx(32 / r["prompt_tps"])


def test_bench_speed_bad_arguments():
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size)
    with pytest.raises(DupqError, match="too few"):
        S.bench_speed(model, tok, gen_tokens=1)
    with pytest.raises(DupqError, match="at least 1"):
        S.bench_speed(model, tok, prompt_tokens=0)


def test_dir_size_bytes(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 23)
    os.symlink(tmp_path / "a.bin", tmp_path / "sub" / "link.bin")  # counted with its target's size
    os.symlink(tmp_path / "missing", tmp_path / "broken")  # skipped
    assert S.dir_size_bytes(tmp_path) == 223
    assert S.dir_size_bytes(tmp_path / "a.bin") == 100
    with pytest.raises(DupqError, match="does not exist"):
        S.dir_size_bytes(tmp_path / "nope")


def test_linear_macs_and_duplication_overhead():
    import mlx.nn as nn

    from mlx_dupq.layers.dup_linear import DupLinear

    model = tiny_model(50)
    per_layer = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 128 * 64  # q, k+v (2 kv heads of 16), o, gate/up/down
    tied_head = 50 * 64 if model.args.tie_word_embeddings else 0
    base = S.linear_macs(model)
    assert base == {"linear_macs": 2 * per_layer + (tied_head or 50 * 64), "dup_extra_macs": 0}
    mlp = model.model.layers[1].mlp
    mlp.down_proj = DupLinear([mlp.down_proj, nn.Linear(128, 64, bias=False), nn.Linear(128, 64, bias=False)],
                              "residual")
    dup = S.linear_macs(model)
    assert dup == {"linear_macs": base["linear_macs"] + 2 * 64 * 128, "dup_extra_macs": 2 * 64 * 128}
    results = [{"model": "base", "generation_tps": 10.0, "generation_cpu_tps": 5.0},
               {"model": "dup", "generation_tps": 8.0, "generation_cpu_tps": 4.5},
               {"model": "other", "generation_tps": 20.0, "generation_cpu_tps": 10.0}]
    cmp = S.decode_comparison(results, "base", load_fn=lambda name: (model if name == "dup" else tiny_model(50), None))
    assert cmp["decode_ratio"] == {"dup": 1.25, "other": 0.5}
    assert cmp["decode_ratio_cpu_time"] == {"dup": pytest.approx(5 / 4.5), "other": 0.5}
    (row,) = cmp["duplication"]  # "other" has no copies
    assert row["model"] == "dup" and row["decode_overhead"] == pytest.approx(0.25)
    assert row["decode_overhead_cpu_time"] == pytest.approx(5 / 4.5 - 1)
    assert row["dup_flop_share"] == pytest.approx(2 * 64 * 128 / base["linear_macs"])
    assert row["overhead_within_share"] == (0.25 <= row["dup_flop_share"])
    with pytest.raises(DupqError, match="not one of the measured"):
        S.decode_comparison(results, "missing")
