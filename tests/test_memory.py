"""Speed/memory study: KV cache sizes by hand, bytes per token by hand, quantized-cache effect."""

from __future__ import annotations

import pytest

from mlx_dupq.errors import DupqError
from mlx_dupq.eval.data import tokenize
from mlx_dupq.eval.memory import (bytes_per_token, decode_run, kv_bytes_formula, kv_position_bytes, kv_quant_effect,
                                  make_cache, memory_study, weight_bytes)
from mlx_dupq.eval.ppl import perplexity, windows_of
from mlx_dupq.io.loader import load
from tests.tiny import VOCAB, make_hf_dir

TEXT = "The quick brown fox jumps over the lazy dog. Hello world, this is a tiny test corpus. " * 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny llama with head_dim 32 (2 layers, 2 KV heads), so 32-wide KV quantization groups fit."""
    d = make_hf_dir(tmp_path_factory.mktemp("hd32") / "m", "llama", hidden_size=128, num_attention_heads=4,
                    num_key_value_heads=2)
    return load(d)


def test_kv_sizes_by_hand(tiny):
    m, _ = tiny
    # 2 (K and V) x 2 layers x 2 kv heads x 32 dims = 256 elements per position
    assert kv_bytes_formula(m, 10, 2.0) == 256 * 10 * 2
    assert kv_position_bytes(m) == 256 * 4  # float32 cache on the CPU
    assert kv_position_bytes(m, 8, 32) == 256 * (1 + 2 * 4 / 32)  # 8 bits + float32 scale and bias per 32
    assert kv_position_bytes(m, 4, 64) == 256 * (0.5 + 2 * 4 / 64)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_decode_run_cache_bytes(tiny, bits):
    m, tok = tiny
    r = decode_run(m, tok, batch=2, prompt_tokens=20, gen_tokens=4, kv_bits=bits, kv_group_size=32)
    # mlx-lm allocates 256 positions at a time: 24 positions -> 256 slots per sequence
    assert r["kv_cache_bytes"] == 2 * 256 * kv_position_bytes(m, bits, 32)
    assert r["decode_tps"] == pytest.approx(2 * r["per_seq_tps"]) and r["peak_memory_bytes"] > 0
    assert r["kv"] == ("float32" if bits is None else f"q{bits}")


def test_bytes_per_token_by_hand(tiny):
    m, _ = tiny
    w = weight_bytes(m)
    # untied llama: embedding left out; hand count 4 bytes x (all parameters - VOCAB x 128)
    from mlx.utils import tree_flatten
    assert w == 4 * (sum(v.size for _, v in tree_flatten(m.parameters())) - VOCAB * 128)
    run = {"batch": 2, "prompt_tokens": 10, "gen_tokens": 5, "kv_bytes_per_position": 100.0, "decode_tps": 4.0}
    b = bytes_per_token(m, run, peak_gbps=2.0)
    assert b["kv_read_bytes_per_token"] == 100.0 * 12  # mean history over steps 10..14
    assert b["bytes_per_token"] == w / 2 + 1200
    assert b["achieved_gbps"] == pytest.approx((w / 2 + 1200) * 4 / 1e9)
    assert b["utilisation"] == pytest.approx(b["achieved_gbps"] / 2.0)


def test_kv_quant_effect(tiny):
    m, tok = tiny
    wins = windows_of(tokenize(tok, TEXT), 96, 2)
    r8, r4 = kv_quant_effect(m, wins, 8, chunk=32, kv_group_size=32), kv_quant_effect(m, wins, 4, chunk=32, kv_group_size=32)
    ref = perplexity(m, tok, TEXT, ctx=96, windows=2)
    assert r8["positions"] == 2 * 95
    assert r8["nll_float"] == pytest.approx(ref["nll"], rel=1e-5)  # the float half is plain perplexity
    assert 0 <= r8["kl"] < r4["kl"] and r8["top1_agreement"] >= r4["top1_agreement"] > 0.5
    assert r8["nll_quant"] != r8["nll_float"]


def test_errors_and_study(tiny):
    m, tok = tiny
    with pytest.raises(DupqError, match="does not divide the head dimension 32"):
        make_cache(m, 4, 64)
    with pytest.raises(DupqError, match="use 4 or 8"):
        make_cache(m, 3, 32)
    r = memory_study(m, tok, None, batches=(1, 2), prompt_tokens=16, gen_tokens=3, peak_gbps=10.0, kv_group_size=32)
    assert [x["batch"] for x in r["batch"]] == [1, 2] and [x["kv"] for x in r["kv_cache"]] == ["float32", "q4", "q8"]
    assert r["bandwidth"]["peak_source"] == "stated" and r["batch"][0]["utilisation"] is not None
