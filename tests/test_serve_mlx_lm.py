"""The mlx-lm private methods ``mlx-dupq serve`` relies on (mlx_dupq/serve.py, ``PRIVATE_API``): these tests
fail, loudly and first, when an mlx-lm release renames or changes them, or when the pin in pyproject.toml and
the installed mlx-lm disagree."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest
from mlx_lm import server as mlx_server
from packaging.specifiers import SpecifierSet

from mlx_dupq.errors import DupqError
from mlx_dupq.serve import MLX_LM_RANGE, PRIVATE_API, check_mlx_lm, make_server

ROOT = Path(__file__).resolve().parents[1]


def test_installed_mlx_lm_is_the_pinned_range():
    pinned = re.findall(r'"mlx-lm([^";]*)"', (ROOT / "pyproject.toml").read_text())
    assert pinned == [MLX_LM_RANGE]
    assert version("mlx-lm") in SpecifierSet(MLX_LM_RANGE), (
        f"mlx-lm {version('mlx-lm')} is outside {MLX_LM_RANGE}: check mlx_dupq/serve.py's PRIVATE_API against "
        "its server, then move the pin")


def test_private_methods_exist_with_their_parameters():
    check_mlx_lm()
    assert {f"{c.__name__}.{n}" for c, n in PRIVATE_API} == {"ResponseGenerator._tokenize",
                                                             "APIHandler._set_completion_headers"}


@pytest.fixture(scope="module")
def server(tiny_dirs):
    s = make_server(tiny_dirs["qwen2"], port=0)  # not serving: the generator and the handler class only
    yield s
    s.close()


def test_tokenize_builds_the_prompt_generation_uses(server):
    """``_tokenize`` returns the prompt tokens first: for a chat request, the chat template applied with
    a generation prompt; for a text request, the encoded text."""
    tok = server.generator.model_provider.tokenizer
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    chat = mlx_server.CompletionRequest("chat", "", messages, None, None)
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert server.generator.prompt_length(chat, None) == len(expected) > 0
    text = mlx_server.CompletionRequest("text", "the quick brown fox", [], None, None)
    assert server.generator.prompt_length(text, None) == len(tok.encode("the quick brown fox"))
    with pytest.raises(Exception):  # malformed messages: the caller answers 400
        server.generator.prompt_length(mlx_server.CompletionRequest("chat", "", [{"content": 3}], None, None), None)


def test_an_mlx_lm_without_them_is_refused_in_one_line(monkeypatch, tiny_dirs):
    monkeypatch.delattr(mlx_server.ResponseGenerator, "_tokenize")
    with pytest.raises(DupqError, match=r"no ResponseGenerator\._tokenize\(tokenizer, request, args\).*"
                                        + re.escape(f"pip install 'mlx-lm{MLX_LM_RANGE}'")):
        make_server(tiny_dirs["qwen2"], port=0)
