"""Rotation kinds: orthogonality, apply == explicit matrix, determinism, dict round trip, DFRot."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_dupq.errors import DupqError
from mlx_dupq.rotation import (
    angular_distance,
    block_hadamard,
    dfrot,
    greedy_diverse,
    hadamard_supported,
    make_rotation,
    most_dissimilar_pair,
)
from mlx_dupq.rotation.dfrot import massive_tokens, objective, per_token_quantizer, token_errors
from mlx_dupq.rotation.hadamard import hadamard, hadamard_matrix, sylvester_matrix

# hidden / intermediate widths of SmolLM2-135M (576, 1536), Qwen2.5-0.5B (896, 4864), Qwen2.5-1.5B
# (1536, 8960), Qwen2-7B (18944) and tiny test models (64, 96)
WIDTHS = [64, 96, 576, 896, 1536, 4864, 8960, 18944]
HADAMARD_WIDTHS = [w for w in WIDTHS if hadamard_supported(w)]
DENSE_WIDTHS = [64, 96, 576, 896]  # O(n^3) to build; the big widths take tens of seconds


def check_orthogonal_and_apply(rot, n, full=True):
    """R R^T = I (all rows, or 128 random rows for the big widths) and apply(x) == x @ R."""
    m = rot.matrix()
    assert m.shape == (n, n) and m.dtype == mx.float32
    rows = np.arange(n) if full else np.sort(np.random.default_rng(0).choice(n, 128, replace=False))
    gram = m[mx.array(rows)] @ m.T
    target = mx.array((rows[:, None] == np.arange(n)[None, :]).astype(np.float32))
    assert float(mx.max(mx.abs(gram - target))) < 1e-5
    x = mx.random.normal((3, 2, n), key=mx.random.key(1))
    want = x @ m
    got = rot.apply(x)
    assert float(mx.max(mx.abs(got - want))) < 1e-4 * max(1.0, float(mx.max(mx.abs(want))))


def test_hadamard_support_table():
    # mx.hadamard_transform silently miscomputes 36 and crashes on 576: we must say no first
    assert [n for n in (12, 20, 28, 48, 64, 96, 896, 1536) if not hadamard_supported(n)] == []
    assert [n for n in (36, 576, 4864, 8960, 18944, 0) if hadamard_supported(n)] == []
    with pytest.raises(ValueError):
        hadamard(mx.zeros((1, 576)))
    with pytest.raises(ValueError):
        block_hadamard(mx.zeros((1, 576)), 128)


@pytest.mark.parametrize("n", [2, 64, 128])
def test_hadamard_is_sylvester_for_powers_of_two(n):
    assert np.abs(np.array(hadamard_matrix(n)) - sylvester_matrix(n)).max() < 1e-6


@pytest.mark.parametrize("n", [12, 20, 28, 112, 96])
def test_hadamard_orthonormal_for_non_power_bases(n):
    h = np.array(hadamard_matrix(n), dtype=np.float64)
    assert np.abs(h @ h.T - np.eye(n)).max() < 1e-5
    assert np.allclose(np.abs(h), 1 / math.sqrt(n), atol=1e-6)  # a true Hadamard: +-1/sqrt(n)


@pytest.mark.parametrize("n", WIDTHS)
def test_block_hadamard_every_width(n):
    rot = make_rotation({"kind": "block_hadamard", "seed": 3}, n)
    assert n % rot.block == 0 and hadamard_supported(rot.block)
    check_orthogonal_and_apply(rot, n, full=n <= 1536)


@pytest.mark.parametrize("n,block", [(576, 64), (896, 128), (4864, 256), (18944, 512), (8960, 1280), (96, 32)])
def test_block_hadamard_explicit_blocks(n, block):
    rot = make_rotation({"kind": "block_hadamard", "seed": 0, "block": block}, n)
    assert rot.block == block
    check_orthogonal_and_apply(rot, n, full=n <= 1536)
    # block diagonal: nothing outside the diagonal blocks
    if n <= 4864:
        m = np.abs(np.array(rot.matrix()))
        blocks = np.arange(n) // block
        assert m[blocks[:, None] != blocks[None, :]].max() == 0


@pytest.mark.parametrize("kind", ["hadamard", "randomized_hadamard"])
@pytest.mark.parametrize("n", HADAMARD_WIDTHS)
def test_full_hadamard_kinds(kind, n):
    check_orthogonal_and_apply(make_rotation({"kind": kind, "seed": 1}, n) if kind != "hadamard"
                               else make_rotation(kind, n), n)


@pytest.mark.parametrize("kind", ["hadamard", "randomized_hadamard"])
@pytest.mark.parametrize("n", [576, 4864, 8960, 18944])
def test_full_hadamard_refuses_unsupported_widths(kind, n):
    with pytest.raises(DupqError, match="block_hadamard"):
        make_rotation(kind, n)


@pytest.mark.parametrize("kind,n", [(k, n) for k in ("random_orthogonal", "perturbed", "identity")
                                    for n in DENSE_WIDTHS if not (k == "perturbed" and n > 576)])
def test_dense_kinds(kind, n):
    check_orthogonal_and_apply(make_rotation({"kind": kind, "seed": 2} if kind != "identity" else kind, n), n)


SEEDED = [
    {"kind": "randomized_hadamard"},
    {"kind": "block_hadamard", "block": 32},
    {"kind": "random_orthogonal"},
    {"kind": "perturbed", "eps": 0.1},
]


@pytest.mark.parametrize("spec", SEEDED, ids=lambda s: s["kind"])
def test_seeded_determinism_and_dict_round_trip(spec):
    n = 96
    a = make_rotation({**spec, "seed": 7}, n)
    b = make_rotation({**spec, "seed": 7}, n)
    c = make_rotation({**spec, "seed": 8}, n)
    assert np.array_equal(np.array(a.matrix()), np.array(b.matrix()))
    assert not np.allclose(np.array(a.matrix()), np.array(c.matrix()))
    d = json.loads(json.dumps(a.to_dict()))  # what config.json holds
    assert d["kind"] == spec["kind"] and d["size"] == n and d["seed"] == 7
    again = make_rotation(d, n)
    assert again.to_dict() == a.to_dict()
    assert np.array_equal(np.array(again.matrix()), np.array(a.matrix()))
    assert a.arrays() == {}


def test_perturbed_eps_zero_is_the_base_and_eps_measures_distance():
    n = 128
    base = {"kind": "randomized_hadamard", "seed": 4}
    h = make_rotation(base, n)
    p0 = make_rotation({"kind": "perturbed", "seed": 4, "eps": 0.0, "base": base}, n)
    assert np.abs(np.array(p0.matrix()) - np.array(h.matrix())).max() < 1e-7
    dists = [angular_distance(h, make_rotation({"kind": "perturbed", "seed": 4, "eps": e, "base": base}, n))
             for e in (0.01, 0.05, 0.2, 0.5)]
    assert dists == sorted(dists) and 0 < dists[0] < 0.05 and dists[-1] < math.pi / 2
    # default base: a randomized Hadamard where the width allows, block Hadamard otherwise
    assert make_rotation({"kind": "perturbed", "eps": 0.0}, 576).to_dict()["base"]["block"] == 192


@pytest.mark.parametrize(
    "spec,n,match",
    [
        ({"kind": "spin"}, 64, "unknown rotation kind"),
        ({"kind": "perturbed", "eps": 0.7}, 64, "eps"),
        ({"kind": "block_hadamard", "block": 100}, 896, "does not tile"),
        ({"kind": "block_hadamard", "size": 128}, 64, "width 128"),
        ({"kind": "block_hadamard"}, 4865, "random_orthogonal"),
        ({"kind": "random_orthogonal", "epsilon": 1}, 64, "unknown option"),
        ({"kind": "dfrot", "gamma": 100}, 64, "stored matrix"),
        (3, 64, "neither a kind name nor a dict"),
    ],
)
def test_bad_specs_raise_one_line_errors(spec, n, match):
    with pytest.raises(DupqError, match=match) as e:
        make_rotation(spec, n)
    assert "\n" not in str(e.value)


def outlier_activations(tokens=1024, n=128, n_massive=16, seed=0):
    x = np.random.default_rng(seed).standard_normal((tokens, n)).astype(np.float32)
    x[:n_massive, 5] = 400.0  # massive activations on one channel (like the BOS token)
    x[:, 17] *= 8.0  # an ordinary outlier channel
    return mx.array(x)


def test_dfrot_reduces_its_objective_from_the_randomized_hadamard_start():
    x = outlier_activations()
    q = per_token_quantizer(4)
    mask = massive_tokens(x)
    assert int(mx.sum(mask)) == 16
    rot = dfrot(x, gamma=100, steps=40, seed=1)
    d = rot.to_dict()
    w = mx.where(mask, 100.0**2, 1.0)
    start = make_rotation(d["start"], 128)
    assert start.kind == "block_hadamard" and start.block == 128  # a full randomized Hadamard
    l0 = objective(x, start.matrix(), w, q)
    l1 = objective(x, rot.matrix(), w, q)
    assert l0 == pytest.approx(d["objective_start"], rel=1e-3)
    assert l1 == pytest.approx(d["objective_end"], rel=1e-3)
    assert l1 < 0.8 * l0
    # and the massive tokens, which a randomized Hadamard hurts, got better
    e0 = token_errors(start.apply(x), q)
    e1 = token_errors(rot.apply(x), q)
    assert float(mx.sum(mx.where(mask, e1, 0))) < 0.8 * float(mx.sum(mx.where(mask, e0, 0)))
    check_orthogonal_and_apply(rot, 128)


def test_dfrot_round_trip_needs_its_matrix_and_adaptive_gamma_is_in_range():
    x = outlier_activations(tokens=256, n=64, n_massive=4, seed=2)
    rot = dfrot(x, gamma="adaptive", steps=5)
    d = json.loads(json.dumps(rot.to_dict()))
    assert d["gamma"] == "adaptive" and 50 <= d["gamma_used"] <= 200 and d["massive_tokens"] == 4
    again = make_rotation(d, 64, arrays=rot.arrays())
    assert np.array_equal(np.array(again.matrix()), np.array(rot.matrix()))
    # learning from the dict + calibration data reproduces it (same seed, same data)
    learned = make_rotation(d, 64, calib=x)
    assert np.abs(np.array(learned.matrix()) - np.array(rot.matrix())).max() < 1e-6
    with pytest.raises(DupqError, match="gamma"):
        dfrot(x, gamma=0.5)


def test_dfrot_custom_quantizer_callback():
    x = outlier_activations(tokens=256, n=64, n_massive=4, seed=3)
    calls = []

    def two_bit(y):
        calls.append(y.shape)
        s = mx.max(mx.abs(y), axis=-1, keepdims=True) / 1.5
        return mx.clip(mx.round(y / s + 1.5), 0, 3) * s - 1.5 * s

    rot = dfrot(x, two_bit, steps=3)
    assert calls and calls[0] == (256, 64)
    assert rot.to_dict()["quantizer"] == "two_bit" and "bits" not in rot.to_dict()
    assert rot.to_dict()["objective_end"] <= rot.to_dict()["objective_start"]


def test_diversity_selection():
    n = 64
    rots = [make_rotation({"kind": "perturbed", "seed": 0, "eps": e, "base": {"kind": "hadamard"}}, n)
            for e in (0.0, 0.02, 0.05)]
    rots.append(make_rotation({"kind": "random_orthogonal", "seed": 9}, n))
    assert angular_distance(rots[0], rots[0]) == pytest.approx(0.0, abs=1e-3)
    assert angular_distance(rots[0], rots[3]) == pytest.approx(math.pi / 2, abs=0.3)
    assert most_dissimilar_pair(rots) in ((0, 3), (1, 3), (2, 3))
    picked = greedy_diverse(rots, 3)
    assert 3 in picked and len(set(picked)) == 3
