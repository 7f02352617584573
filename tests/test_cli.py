"""Every CLI command, and every bad input: one line on stderr, exit code 1 (2: a bad option value), no partial output."""

from __future__ import annotations

import json
import sys

import pytest

from mlx_dupq import cli


def run(monkeypatch, capsys, *args):
    """Run ``mlx-dupq ARGS`` in-process; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["mlx-dupq", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    o, e = capsys.readouterr()
    return code, o, e


def assert_one_line_error(code, err, needle, exit_code=1):
    """One ``error:`` line naming ``needle``; exit 1 (a user error) or 2 (a bad command-line value)."""
    assert code == exit_code, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err  # progress lines may precede it
    assert "Traceback" not in err
    assert needle in errors[0], errors[0]


@pytest.fixture
def wikitext_file(tmp_path):
    text = "\n = Heading = \n\n" + " The quick brown fox jumps over the lazy dog . Hello world , this is a tiny test corpus . " * 60
    p = tmp_path / "wiki.test.raw"
    p.write_text(text)
    return p


def test_convert_eval_generate_inspect_bench(monkeypatch, capsys, tiny_dirs, tmp_path, wikitext_file):
    out = tmp_path / "pack"
    code, o, e = run(monkeypatch, capsys, "convert", tiny_dirs["qwen2"], "-o", out, "--bits", "4", "--group-size", "32")
    assert code == 0, e
    assert "bits/weight" in o and out.is_dir()

    res = tmp_path / "ppl.json"
    code, o, e = run(monkeypatch, capsys, "eval", "ppl", out, "--data", wikitext_file, "--ctx", "32", "--windows", "3", "--json", res)
    assert code == 0, e
    r = json.loads(res.read_text())
    assert r["ctx"] == 32 and r["windows"] == 3 and r["tokens"] > 0 and r["ppl"] > 1
    assert r["machine"]["device"] and r["machine"]["mlx_dupq"]  # what measured it (mlx_dupq._env.machine_record)

    code, o, e = run(monkeypatch, capsys, "generate", out, "--prompt", "hello", "--max-tokens", "5")
    assert code == 0, e

    code, o, e = run(monkeypatch, capsys, "inspect", out, "--json")
    assert code == 0, e
    rep = json.loads(o)
    assert rep["bits_per_weight"] > 4 and any(t["name"].endswith("q_proj.weight") for t in rep["tensors"])
    assert {"mean", "std", "kurtosis", "outlier_share"} <= set(rep["tensors"][0])

    code, o, e = run(monkeypatch, capsys, "inspect", tiny_dirs["qwen2"])
    assert code == 0, e

    bj = tmp_path / "bench.json"
    code, o, e = run(monkeypatch, capsys, "bench", out, "--tokens-per-sec", "--against", tiny_dirs["qwen2"],
                     "--prompt-tokens", "16", "--gen-tokens", "4", "--json", bj)
    assert code == 0, e
    rows = json.loads(bj.read_text())["results"]
    assert len(rows) == 2 and rows[0]["bits_per_weight"] < rows[1]["bits_per_weight"]
    assert all(r["generation_tps"] > 0 for r in rows)
    assert json.loads(bj.read_text())["machine"]["blas"]["mapped"] is not None


def test_models_list(monkeypatch, capsys):
    code, o, e = run(monkeypatch, capsys, "models", "list", "--json")
    assert code == 0, e
    names = [r["name"] for r in json.loads(o)]
    assert "smollm2-135m" in names and "qwen2.5-coder-0.5b" in names


def test_bad_inputs(monkeypatch, capsys, tiny_dirs, tmp_path):
    out = tmp_path / "out"
    code, o, e = run(monkeypatch, capsys, "convert", tmp_path / "missing", "-o", out)
    assert_one_line_error(code, e, "does not exist")

    empty = tmp_path / "empty"
    empty.mkdir()
    code, o, e = run(monkeypatch, capsys, "convert", empty, "-o", out)
    assert_one_line_error(code, e, "config.json not found")

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)
    code, o, e = run(monkeypatch, capsys, "convert", bad, "-o", out)
    assert_one_line_error(code, e, "GGUF")

    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    import shutil
    shutil.copy(tiny_dirs["qwen2"] / "model.safetensors", weird / "model.safetensors")
    code, o, e = run(monkeypatch, capsys, "convert", weird, "-o", out)
    assert_one_line_error(code, e, "not supported")

    code, o, e = run(monkeypatch, capsys, "convert", tiny_dirs["qwen2"], "-o", out, "--bits", "7")
    assert_one_line_error(code, e, "bit width 7", exit_code=2)

    code, o, e = run(monkeypatch, capsys, "convert", tiny_dirs["qwen2"], "-o", out, "--group-size", "48")
    assert_one_line_error(code, e, "group size", exit_code=2)

    code, o, e = run(monkeypatch, capsys, "convert", tiny_dirs["qwen2"], "-o", out, "--recipe", "no-such-recipe")
    assert_one_line_error(code, e, "recipe", exit_code=2)
    assert not out.exists()

    out.mkdir()
    code, o, e = run(monkeypatch, capsys, "convert", tiny_dirs["qwen2"], "-o", out, "--bits", "4")
    assert_one_line_error(code, e, "--force", exit_code=2)


def test_disk_write_failure_leaves_no_output(monkeypatch, capsys, tiny_dirs, tmp_path):
    import errno

    import mlx.core as mx

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", full)
    out = tmp_path / "out"
    code, o, e = run(monkeypatch, capsys, "convert", tiny_dirs["qwen2"], "-o", out, "--bits", "4")
    assert_one_line_error(code, e, "No space left")
    assert not out.exists()
