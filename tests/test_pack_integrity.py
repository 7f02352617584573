"""Pack manifest: convert writes it last; `verify` catches any changed, missing or extra file;
`load` names a truncated or missing shard; an interrupted conversion never passes verification."""

from __future__ import annotations

import json

import pytest

import mlx_dupq
from mlx_dupq.io import pack as packio
from mlx_dupq.io.manifest import MANIFEST, PackDamaged, check_sizes, verify_pack
from tests.test_cli import assert_one_line_error, run
from tests.tiny import interrupt_after


@pytest.fixture
def pack(tiny_dirs, tmp_path):
    out = tmp_path / "pack"
    mlx_dupq.convert(str(tiny_dirs["qwen2"]), out, bits=4, group_size=32)
    return out


def test_manifest_lists_every_file_with_hash_size_version_recipe(pack):
    m = json.loads((pack / MANIFEST).read_text())
    on_disk = sorted(p.name for p in pack.iterdir() if p.name != MANIFEST)
    assert sorted(m["files"]) == on_disk and any(f.endswith(".safetensors") for f in on_disk)
    for name, rec in m["files"].items():
        assert rec["size"] == (pack / name).stat().st_size and len(rec["sha256"]) == 64
    assert m["tool"] == f"mlx-dupq {mlx_dupq.__version__}" and m["recipe"]["default"]["bits"] == 4
    assert verify_pack(pack)["files"] == m["files"]


def test_verify_catches_one_flipped_byte_in_any_shard(pack, monkeypatch, capsys):
    code, o, e = run(monkeypatch, capsys, "verify", pack)
    assert code == 0 and "ok" in o, e
    shards = sorted(pack.glob("model-*.safetensors"))
    assert len(shards) > 1
    for shard in shards:
        data = bytearray(shard.read_bytes())
        i = len(data) // 2
        data[i] ^= 0x01
        shard.write_bytes(bytes(data))
        code, o, e = run(monkeypatch, capsys, "verify", pack)
        assert_one_line_error(code, e, shard.name)
        assert "sha256" in e
        data[i] ^= 0x01
        shard.write_bytes(bytes(data))
    assert run(monkeypatch, capsys, "verify", pack)[0] == 0


def test_verify_names_missing_and_extra_files(pack, monkeypatch, capsys):
    (pack / "notes.txt").write_text("x")
    code, o, e = run(monkeypatch, capsys, "verify", pack)
    assert_one_line_error(code, e, "notes.txt")
    (pack / "notes.txt").unlink()
    (pack / "tokenizer.json").unlink()
    code, o, e = run(monkeypatch, capsys, "verify", pack)
    assert_one_line_error(code, e, "missing tokenizer.json")


def test_load_names_a_truncated_or_missing_shard(pack, monkeypatch, capsys, tmp_path):
    shard = sorted(pack.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(PackDamaged, match=shard.name):
        check_sizes(pack)
    code, o, e = run(monkeypatch, capsys, "generate", pack, "-p", "hi", "-m", "2")
    assert_one_line_error(code, e, f"{shard.name} is damaged")
    shard.unlink()
    text = tmp_path / "text.txt"
    text.write_text("hello world " * 50)
    code, o, e = run(monkeypatch, capsys, "eval", "ppl", pack, "--data", text, "--ctx", "8")
    assert_one_line_error(code, e, f"missing {shard.name}")


def test_interrupted_conversion_never_verifies(tiny_dirs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pack"
    real = interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        mlx_dupq.convert(str(tiny_dirs["qwen2"]), out, bits=4, group_size=32)
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and partial.is_dir()
    for target in (out, partial):
        code, o, e = run(monkeypatch, capsys, "verify", target)
        assert code == 1 and "error:" in e
    monkeypatch.setattr(packio.PartialState, "write_group", real)
    mlx_dupq.convert(str(tiny_dirs["qwen2"]), out, bits=4, group_size=32, resume=True)
    assert verify_pack(out)["files"]


def test_a_pack_without_manifest_loads_but_does_not_verify(pack, monkeypatch, capsys):
    (pack / MANIFEST).unlink()
    check_sizes(pack)  # packs written before manifests existed still load
    code, o, e = run(monkeypatch, capsys, "verify", pack)
    assert_one_line_error(code, e, "no manifest.json")
    shard = sorted(pack.glob("model-*.safetensors"))[0]
    shard.unlink()  # without a manifest, the index still names a missing shard
    code, o, e = run(monkeypatch, capsys, "generate", pack, "-p", "hi", "-m", "2")
    assert_one_line_error(code, e, f"missing {shard.name}")
