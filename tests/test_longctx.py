"""Long-context perplexity: chunked prefill through the KV cache equals one full pass; context limit."""

from __future__ import annotations

import json

import pytest

from mlx_dupq.errors import DupqError
from mlx_dupq.eval.ppl import max_context, perplexity
from mlx_dupq.io.loader import load
from tests.test_cli import assert_one_line_error, run

TEXT = "The quick brown fox jumps over the lazy dog. Hello world, this is a tiny test corpus. " * 80


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_chunked_equals_one_pass(tiny_dirs, kind):
    m, tok = load(tiny_dirs[kind])
    full = perplexity(m, tok, TEXT, ctx=256, windows=2)
    assert full["chunk"] == 256
    for chunk in (64, 100, 255):
        r = perplexity(m, tok, TEXT, ctx=256, windows=2, chunk=chunk)
        assert r["chunk"] == chunk and r["tokens"] == full["tokens"] == 2 * 255
        assert r["nll"] == pytest.approx(full["nll"], rel=1e-5)
    assert full["peak_memory_bytes"] > 0


def test_context_limit(tiny_dirs, monkeypatch, capsys):
    m, tok = load(tiny_dirs["llama"])
    assert max_context(m) == 512
    with pytest.raises(DupqError, match="longer than the model's context .512"):
        perplexity(m, tok, TEXT * 4, ctx=1024)
    code, o, e = run(monkeypatch, capsys, "eval", "ppl", tiny_dirs["llama"], "--data", "brown:eval", "--ctx", "4096")
    assert_one_line_error(code, e, "--ctx 4096 is longer than the model's context", exit_code=2)


def test_cli_chunk(tiny_dirs, tmp_path, monkeypatch, capsys):
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    js = tmp_path / "p.json"
    code, o, e = run(monkeypatch, capsys, "eval", "ppl", tiny_dirs["llama"], "--data", f, "--ctx", "512", "--chunk", "128",
                     "--windows", "1", "--json", js)
    assert code == 0, e
    r = json.loads(js.read_text())
    assert r["ctx"] == 512 and r["chunk"] == 128 and r["windows"] == 1
