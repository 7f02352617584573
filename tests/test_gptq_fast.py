"""The numpy GPTQ (mlx_dupq.quant.gptq) against the straightforward mlx implementation it replaced
(tests/gptq_reference.py: per-column mlx ops).

- the column loop is bit-identical: with the reference's inverse Cholesky, codes, scales and
  biases are equal for every mode (act-order, static/dynamic groups, ragged blocks, rows in
  chunks, zero scales, dead inputs).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_dupq.config import QuantSpec
from mlx_dupq.quant import gptq
from tests.gptq_reference import reference_gptq, reference_hessian, reference_inverse_cholesky


def _layer(n_in: int, n_out: int, tokens: int, seed: int):
    k = mx.random.normal((n_in, n_in), key=mx.random.key(seed)) * 0.3 + mx.eye(n_in)
    x = mx.random.normal((tokens, n_in), key=mx.random.key(seed + 1)) @ k
    x = x * mx.where(mx.arange(n_in) % 37 == 0, 20.0, 1.0)
    w = mx.random.normal((n_out, n_in), key=mx.random.key(seed + 2)) * 0.02
    mx.eval(x, w)
    return w, x


def _old_u(H: np.ndarray, diag: np.ndarray, damp: float) -> np.ndarray:
    return np.array(reference_inverse_cholesky(mx.array(H), diag, damp))


def _equal(a, b) -> bool:
    return a.spec == b.spec and mx.array_equal(a.codes, b.codes).item() and mx.array_equal(a.scales, b.scales).item() and (
        (a.biases is None and b.biases is None) or mx.array_equal(a.biases, b.biases).item())


SPECS = [QuantSpec(2, 64), QuantSpec(3, 128), QuantSpec(1.58, 64, True), QuantSpec(1, 32), QuantSpec(4, 32, True),
         QuantSpec(2, 0), QuantSpec(3, -1)]


@pytest.mark.parametrize("chunk", [2048, 20])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
def test_column_loop_is_bit_identical(monkeypatch, spec, chunk):
    w, x = _layer(320, 48, 700, 11)
    w = mx.concatenate([w[:-1], mx.zeros((1, 320))])  # a zero row: zero scales (code 0 everywhere)
    dead = mx.where(mx.arange(320) % 29 == 5, 0.0, 1.0)  # dead inputs: H_jj = 0
    H = reference_hessian([x * dead])
    monkeypatch.setattr(gptq, "_inverse_cholesky", _old_u)
    monkeypatch.setattr(gptq, "ROW_CHUNK", chunk)  # 20: the 48 rows in chunks of 20, 20, 8
    for act_order in (True, False):
        for static in (True, False):
            for block in (128, 48, 1):
                got = gptq.gptq_quantize(w, H, spec, act_order=act_order, static_groups=static, block_size=block)
                want = reference_gptq(w, H, spec, act_order=act_order, static_groups=static, block_size=block)
                assert _equal(got, want), (act_order, static, block)
