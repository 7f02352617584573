"""Packs written by the release before the layered architecture (commit 921eedc) still load and give
the same logits: one pack per module format (mlx, dupq, dup, moe_mixed), serial copies, online
rotations, static activation ranges. Fixtures: tests/fixtures/make_old_packs.py."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_dupq
from tests.tiny import TOKENS, logits

OLD = Path(__file__).resolve().parent / "fixtures" / "old_packs"
EXPECTED = json.loads((OLD / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_old_pack_loads_with_the_same_logits(name):
    model, tok = mlx_dupq.load(OLD / name)
    got = np.array(logits(model, TOKENS)[0, :, :64].astype(mx.float32))
    np.testing.assert_allclose(got, np.array(EXPECTED[name]["logits"]), atol=2e-4, rtol=1e-4)
    assert tok.encode("hello")  # the tokenizer files load too
