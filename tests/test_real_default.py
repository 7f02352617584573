"""The real default model end to end: fetch, convert (streaming), load in mlx-dupq and mlx-lm, evaluate."""

from __future__ import annotations

import mlx.core as mx
import pytest

import mlx_dupq
from mlx_dupq.eval.data import load_text
from mlx_dupq.eval.ppl import perplexity

pytestmark = pytest.mark.real


def test_default_model_4bit_pack(tmp_path):
    import mlx_lm

    text = load_text("brown:eval")
    ref, tok = mlx_dupq.load("default")
    ref_ppl = perplexity(ref, tok, text, ctx=256, windows=2)["ppl"]
    del ref
    out = tmp_path / "smollm2-w4"
    res = mlx_dupq.convert("default", out, bits=4, group_size=64)
    assert 4.5 < res.bits_per_weight < 6.0  # 4-bit linears + 8-bit embedding, scales counted
    q, qtok = mlx_dupq.load(out)
    q_ppl = perplexity(q, qtok, text, ctx=256, windows=2)["ppl"]
    # 4-bit RTN costs SmolLM2 tens of percent, never a collapse
    assert ref_ppl < q_ppl < 1.6 * ref_ppl, (ref_ppl, q_ppl)
    # every layer is in mlx's format: mlx-lm opens and runs the pack unchanged
    m2, tok2 = mlx_lm.load(str(out))
    text_out = mlx_lm.generate(m2, tok2, prompt="The capital of France is", max_tokens=8)
    assert isinstance(text_out, str) and text_out.strip()
    ids = mx.array([tok.encode("The capital of France is Paris.")])
    from mlx_dupq.io.pack import cast_floats

    cast_floats(m2, mx.float32)
    a, b = q(ids), m2(ids)
    assert (mx.abs(a - b).max() / mx.abs(b).max()).item() < 1e-3
