"""Per-module sensitivity on tiny random models: complete, sane, and the model is left unchanged."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_dupq.config import QuantSpec, Recipe
from mlx_dupq.search.sensitivity import (
    fake_quantize,
    measure_sensitivity,
    quantizable_modules,
    relative_output_error,
)
from tests.tiny import VOCAB, build_model


def tokens(n=2, L=16, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, VOCAB, (n, L)).astype(np.int32))


@pytest.mark.parametrize("model_type", ["qwen2", "llama", "deepseek"])
def test_table_complete_and_sane(model_type):
    model, _ = build_model(model_type)
    x = tokens()
    before = model(x)
    s = measure_sensitivity(model, x, bits=(2, 4, 8))
    mods = quantizable_modules(model, Recipe())
    assert set(s.kl) == set(s.proxy) == set(s.bits) == set(mods)
    labels = {"w2g64", "w4g64", "w8g64"}
    for p in mods:
        assert set(s.kl[p]) == set(s.proxy[p]) == set(s.bits[p]) == labels
        assert all(v >= -1e-6 for v in s.kl[p].values()), s.kl[p]
        assert all(v >= 0 for v in s.proxy[p].values())
        assert s.proxy[p]["w2g64"] > s.proxy[p]["w4g64"] > s.proxy[p]["w8g64"]
        assert s.bits[p]["w2g64"] < s.bits[p]["w4g64"] < s.bits[p]["w8g64"]
        assert s.params[p] == mods[p][0].weight.size
    assert sum(s.kl[p]["w2g64"] for p in mods) > 10 * sum(s.kl[p]["w8g64"] for p in mods)
    assert s.extra["tail_cached"]  # the per-layer re-run reproduced the full forward
    assert s.tokens == x.size and s.n_params > sum(s.params.values())
    assert mx.array_equal(model(x), before)  # every weight was put back


def test_tail_rerun_matches_full_forward():
    """KL from the cached layer inputs equals KL from full forward passes."""
    from mlx_dupq.adapter import LayerTail

    model, _ = build_model("llama")
    x = tokens()
    fast = measure_sensitivity(model, x, bits=(2,), measures=("kl",))
    orig = LayerTail.__init__

    def no_cache(self, *a, **k):
        orig(self, *a, **k)
        self.hidden = None

    LayerTail.__init__ = no_cache
    try:
        slow = measure_sensitivity(model, x, bits=(2,), measures=("kl",))
    finally:
        LayerTail.__init__ = orig
    assert not slow.extra["tail_cached"]
    for p in fast.kl:
        assert fast.kl[p]["w2g64"] == pytest.approx(slow.kl[p]["w2g64"], rel=1e-3, abs=1e-7), p


def test_relative_output_error_forms_agree():
    rng = np.random.default_rng(1)
    w = mx.array(rng.standard_normal((32, 64)).astype(np.float32))
    x = mx.array(rng.standard_normal((40, 64)).astype(np.float32))
    w_hat, nbits = fake_quantize(w, QuantSpec(bits=2, group_size=32))
    a = relative_output_error(w, w_hat, x=x)
    b = relative_output_error(w, w_hat, hessian=x.T @ x)
    assert a == pytest.approx(b, rel=1e-4)
    assert relative_output_error(w, w) == 0.0
    # 2-bit codes + fp16 scale and bias per group of 32
    assert nbits == 32 * 64 * 2 + 32 * 2 * 2 * 16


def test_bad_inputs():
    from mlx_dupq.errors import DupqError

    model, _ = build_model("llama")
    with pytest.raises(DupqError, match="measure"):
        measure_sensitivity(model, tokens(), measures=("ppl",))
    with pytest.raises(DupqError, match=r"\(n, L\)"):
        measure_sensitivity(model, tokens()[0])


def test_path_bits_give_some_modules_their_own_candidates():
    """A ternary spec (taken as it is: symmetric) only for the embedding and head; the layers keep ``bits``."""
    model, _ = build_model("llama")
    ternary = QuantSpec(1.58, 128, symmetric=True)
    s = measure_sensitivity(model, tokens(), bits=((2, 64), (4, 64)), measures=("proxy",),
                            path_bits={r"embed_tokens$|lm_head$": (ternary, (2, 64))})
    assert set(s.bits["model.embed_tokens"]) == set(s.bits["lm_head"]) == {"wtg128s", "w2g64"}
    assert set(s.bits["model.layers.0.mlp.down_proj"]) == {"w2g64", "w4g64"}
    assert s.specs["wtg128s"] == ternary
    assert s.bits["lm_head"]["wtg128s"] < s.bits["lm_head"]["w2g64"]
    assert s.proxy["lm_head"]["wtg128s"] > s.proxy["lm_head"]["w2g64"] > 0
    assert s.extra["path_bits"][r"embed_tokens$|lm_head$"][0] == ternary.to_dict()


def test_a_tied_embedding_is_priced_as_the_head_too():
    """The tiny qwen2 ties its embedding: its proxy adds the head's output error on the final states,
    so it exceeds the row-weighted input error alone (what an untied embedding gets)."""
    from mlx_dupq.search.sensitivity import _tied_head_states

    model, _ = build_model("qwen2")
    x = tokens()
    s = measure_sensitivity(model, x, bits=(2,), measures=("proxy",))
    w = model.model.embed_tokens.weight
    counts = mx.zeros((w.shape[0],)).at[x.reshape(-1)].add(1.0)
    w_hat = fake_quantize(w, QuantSpec(2, 64))[0]
    alone = relative_output_error(w, w_hat, row_weights=counts)
    head = relative_output_error(w, w_hat, x=_tied_head_states(model, x))
    assert head > 0 and s.proxy["model.embed_tokens"]["w2g64"] == pytest.approx(alone + head, rel=1e-5)
    untied, _ = build_model("llama")
    assert _tied_head_states(untied, x) is None
