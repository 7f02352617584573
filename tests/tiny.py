"""Test helpers: the tiny models live in the package (:mod:`mlx_dupq.testing`, re-exported here for the
tests' imports); ``interrupt_after`` needs pytest's monkeypatch, so it stays with the tests."""

from __future__ import annotations

from mlx_dupq.testing import (  # noqa: F401  (re-exported)
    CONFIGS,
    TOKENS,
    VOCAB,
    _hf_names,
    build_model,
    logits,
    make_hf_dir,
    make_tokenizer,
    rel_err,
    unstack_experts,
)


def interrupt_after(monkeypatch, groups: int):
    """Make a conversion die (KeyboardInterrupt) after ``groups`` groups were written.

    Returns the real ``PartialState.write_group`` so the test can put it back and resume.
    """
    from mlx_dupq.io import pack as packio

    real = packio.PartialState.write_group
    calls = {"n": 0}

    def flaky(self, *a, **k):
        if calls["n"] == groups:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(packio.PartialState, "write_group", flaky)
    return real
