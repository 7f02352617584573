"""The Hugging Face hub path, exercised offline against a hub cache laid out on disk."""

from __future__ import annotations

import shutil

import pytest

import mlx_dupq
from mlx_dupq.errors import DupqError
from mlx_dupq.io.source import HFDirSource, open_source


def _fake_hub_cache(root, repo_id, model_dir):
    """Lay out ``model_dir`` as huggingface-hub's cache holds a downloaded snapshot."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in model_dir.iterdir():
        shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    return snap


def test_hub_id_resolves_through_huggingface_hub(tmp_path, monkeypatch, tiny_dirs):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _fake_hub_cache(tmp_path, "tiny-org/tiny-qwen2", tiny_dirs["qwen2"])
    src = open_source("tiny-org/tiny-qwen2")
    assert isinstance(src, HFDirSource) and src.name == "tiny-org/tiny-qwen2"
    out = tmp_path / "pack"
    mlx_dupq.convert("tiny-org/tiny-qwen2", out, bits=4, group_size=32)
    model, tok = mlx_dupq.load(out)
    assert tok.encode("hello")


def test_unknown_hub_id_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(DupqError, match="could not download 'no-org/no-model'"):
        open_source("no-org/no-model")
