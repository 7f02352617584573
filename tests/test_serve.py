"""``mlx-dupq serve``: mlx-lm's OpenAI-compatible server on packs with our own layers, driven by the
``openai`` client on localhost (a free port, bounded timeouts)."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from mlx_lm import generate

import mlx_dupq
from mlx_dupq.config import QuantSpec, Recipe, RotationSpec
from mlx_dupq.dup.specs import DupPlan
from mlx_dupq.errors import DupqError
from mlx_dupq.layers.dup_linear import DupLinear
from mlx_dupq.serve import make_server

openai = pytest.importorskip("openai", reason="the serve tests drive the server with the openai client ([test] extra)")

TIMEOUT = 60  # seconds, per request


def _client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", timeout=TIMEOUT, max_retries=0)


@pytest.fixture(scope="module")
def custom_pack(tiny_dirs, tmp_path_factory):
    """A tiny qwen2 pack with ternary linears (our format), residual copies and an online rotation."""
    out = tmp_path_factory.mktemp("serve") / "pack"
    rec = Recipe(name="serve-test", default=QuantSpec(bits=1.58, group_size=64),
                 rotation=RotationSpec(layers=(0,), online_down=True), duplication=DupPlan(mode="residual", copies={1: 2}))
    mlx_dupq.convert(tiny_dirs["qwen2"], out, rec)
    return out


@pytest.fixture(scope="module")
def server(custom_pack):
    s = make_server(custom_pack, port=0, max_tokens=16)
    t = threading.Thread(target=s.serve_forever, daemon=True)
    t.start()
    yield s
    s.shutdown()
    t.join(timeout=TIMEOUT)


def _post(server, path: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_pack_really_has_our_layers(custom_pack):
    cfg = json.loads((custom_pack / "config.json").read_text())["mlx_dupq"]
    assert cfg["online_rotations"] and cfg["duplication"]["mode"] == "residual"
    assert {e["format"] for e in cfg["modules"].values()} >= {"dupq", "dup"}
    model, _ = mlx_dupq.load(custom_pack)
    assert any(isinstance(m, DupLinear) for _, m in model.named_modules())


def test_chat_and_text_completion_match_greedy_generation(server, custom_pack):
    c = _client(server)
    r = c.chat.completions.create(model="anything", messages=[{"role": "user", "content": "hello world"}], max_tokens=8)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens > 0

    model, tok = mlx_dupq.load(custom_pack)  # the reference: mlx-lm's greedy generation on the same pack
    prompt = "the quick brown fox"
    expected = generate(model, tok, prompt, max_tokens=6)
    t = c.completions.create(model="anything", prompt=prompt, max_tokens=6, temperature=0)
    assert t.choices[0].text == expected
    assert [m.id for m in c.models.list().data] == [str(custom_pack)]


def test_streamed_chat_equals_the_whole_answer(server):
    c = _client(server)
    msgs = [{"role": "user", "content": "the lazy dog"}]
    whole = c.chat.completions.create(model="m", messages=msgs, max_tokens=10).choices[0].message.content
    chunks = list(c.chat.completions.create(model="m", messages=msgs, max_tokens=10, stream=True))
    pieces = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    # (a random model emits partial UTF-8 bytes that the detokenizer holds back: few content chunks)
    assert len(chunks) >= 2 and "".join(pieces) == whole and whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_eight_concurrent_clients(server):
    c = _client(server)
    prompts = [f"hello {i} world" for i in range(8)]

    def ask(p):
        return c.completions.create(model="m", prompt=p, max_tokens=12)

    t0 = time.time()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, prompts))
    assert time.time() - t0 < TIMEOUT
    assert all(r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length" for r in results)
    assert len({r.id for r in results}) == 8


@pytest.mark.parametrize("body", [
    b"{not json",
    b'["a list"]',
    b'{"max_tokens": 5}',  # no messages
    b'{"messages": "hello", "max_tokens": 5}',  # messages must be a list of {role, content}
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}',
])
def test_malformed_request_is_a_4xx_and_the_server_keeps_serving(server, body):
    status, err = _post(server, "/chat/completions", body)
    assert 400 <= status < 500 and "error" in err, (status, err)
    status, ok = _post(server, "/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).encode())
    assert status == 200 and ok["usage"]["completion_tokens"] == 3


def test_prompt_longer_than_the_context_is_a_clear_400(server):
    c = _client(server)
    ctx = 512  # tiny qwen2's max_position_embeddings
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="m", prompt="x" * 2 * ctx, max_tokens=4)
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
    assert re.search(r"the prompt is \d+ tokens and this model's context is 512 tokens", e.value.message)
    # a prompt that fits but leaves 3 tokens of room: max_tokens is capped, the answer stops at the context
    n = c.completions.create(model="m", prompt="x", max_tokens=1).usage.prompt_tokens  # tokens of "x"
    long = "x" * (ctx - 3)
    r = c.completions.create(model="m", prompt=long, max_tokens=50)
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= ctx and r.choices[0].finish_reason == "length"
    assert n >= 1


def test_moe_pack_serves(tiny_dirs, tmp_path):
    mlx_dupq.convert(tiny_dirs["deepseek"], tmp_path / "moe", bits=4, group_size=32)
    s = make_server(tmp_path / "moe", port=0)
    t = threading.Thread(target=s.serve_forever, daemon=True)
    t.start()
    try:
        r = _client(s).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert r.usage.completion_tokens == 5
    finally:
        s.shutdown()
        t.join(timeout=TIMEOUT)


def test_bad_model_fails_in_one_line_before_listening(tmp_path):
    with pytest.raises(DupqError, match="config.json not found|does not exist|not"):
        make_server(tmp_path / "missing", port=0)


def test_cli_serve_answers_curl_style_requests_and_stops_on_ctrl_c(custom_pack):
    p = subprocess.Popen([sys.executable, "-m", "mlx_dupq.cli", "serve", str(custom_pack), "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()  # "serving PACK at http://127.0.0.1:PORT/v1 ..."
        m = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line)
        assert m, line + p.stderr.read()
        server = type("S", (), {"url": m.group(1)})
        status, r = _post(server, "/completions", b'{"prompt": "hello", "max_tokens": 4}')
        assert status == 200 and r["usage"]["completion_tokens"] == 4
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "stopped" in out and "terminate" not in err


def test_a_client_that_hangs_up_mid_stream_costs_nothing(server, capfd):
    body = json.dumps({"prompt": "hello", "max_tokens": 200, "stream": True}).encode()
    host, port = server.httpd.server_address[:2]
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert s.recv(64).startswith(b"HTTP/1.")  # the stream has started; hang up now
    status, ok = _post(server, "/completions", b'{"prompt": "hi", "max_tokens": 3}')
    assert status == 200 and ok["usage"]["completion_tokens"] == 3
    assert "Traceback" not in capfd.readouterr().err
