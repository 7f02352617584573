"""Weight statistics against plain numpy formulas."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_dupq import weight_stats as S


def np_reference(w: np.ndarray) -> dict:
    x = w.astype(np.float64).ravel()
    mean = x.mean()
    d = x - mean
    m2, m4 = (d**2).mean(), (d**4).mean()
    std = math.sqrt(m2)
    return {
        "mean": mean,
        "std": std,
        "kurtosis": m4 / m2**2 - 3,
        "outlier_share": float((np.abs(d) > 3 * std).mean()),
        "absmax": float(np.abs(x).max()),
        "max_over_std": float(np.abs(x).max()) / std,
        "min": float(x.min()),
        "max": float(x.max()),
    }


@pytest.mark.parametrize("dist", ["normal", "student", "offset"])
def test_weight_stats_matches_numpy(dist, monkeypatch):
    rng = np.random.default_rng(0)
    if dist == "normal":
        w = rng.normal(size=(64, 96))
    elif dist == "student":
        w = rng.standard_t(3, size=(64, 96))  # heavy tails: large kurtosis, many outliers
    else:
        w = 1.0 + 0.01 * rng.normal(size=(64, 96))  # RMSNorm-like: mean far from zero
    w = w.astype(np.float32)
    monkeypatch.setattr(S, "CHUNK", 1000)  # several chunks, last one partial
    got = S.weight_stats(mx.array(w))
    ref = np_reference(w)
    assert got["numel"] == w.size
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


def test_known_values():
    # four values -1, -1, 1, 1: mean 0, std 1, kurtosis 1 - 3 = -2, no outliers
    got = S.weight_stats(mx.array([[-1.0, -1.0], [1.0, 1.0]]))
    assert (got["mean"], got["std"], got["kurtosis"], got["outlier_share"]) == (0.0, 1.0, -2.0, 0.0)
    # one spike among many zeros is an outlier: share 1/1000
    x = np.zeros(1000, np.float32)
    x[5] = 100.0
    got = S.weight_stats(mx.array(x))
    assert got["outlier_share"] == pytest.approx(1 / 1000)
    assert got["absmax"] == 100.0


def test_gaussian_kurtosis_near_zero():
    w = mx.random.normal((512, 512), key=mx.random.key(3))
    got = S.weight_stats(w)
    assert abs(got["kurtosis"]) < 0.05
    assert got["outlier_share"] == pytest.approx(0.0027, abs=0.0006)


def test_bfloat16_and_constant():
    w = mx.array(np.linspace(-2, 2, 101, dtype=np.float32)).astype(mx.bfloat16)
    ref = np_reference(np.array(w.astype(mx.float32)))
    assert S.weight_stats(w)["std"] == pytest.approx(ref["std"], rel=1e-9)
    c = S.weight_stats(mx.ones((4, 4)))
    assert c["std"] == 0 and c["outlier_share"] == 0 and math.isnan(c["kurtosis"]) and math.isnan(c["max_over_std"])


def test_model_weight_stats_streams_and_skips_ints():
    rng = np.random.default_rng(1)

    def gen():
        yield "model.embed_tokens.weight", mx.array(rng.normal(size=(10, 8)).astype(np.float32))
        yield "model.layers.3.mlp.down_proj.weight", mx.array(rng.normal(size=(8, 16)).astype(np.float16))
        yield "model.layers.3.mlp.down_proj.codes", mx.zeros((8, 2), dtype=mx.uint32)
        yield "model.norm.weight", mx.ones((8,))

    rows = S.model_weight_stats(gen())
    assert [r["name"] for r in rows] == ["model.embed_tokens.weight", "model.layers.3.mlp.down_proj.weight", "model.norm.weight"]
    assert [r["layer"] for r in rows] == [None, 3, None]
    assert rows[1]["shape"] == [8, 16] and rows[1]["dtype"] == "float16"
    assert rows[0]["numel"] == 80 and rows[0]["std"] > 0
