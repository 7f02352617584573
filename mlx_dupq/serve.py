"""``mlx-dupq serve``: an OpenAI-compatible HTTP server for any model mlx-dupq loads.

Built on mlx-lm's server (:mod:`mlx_lm.server`: the HTTP API, continuous batching, the prompt
cache, streaming, sampling, stop words, logprobs). Four things differ, each a small subclass:

- the model comes from :func:`mlx_dupq.io.loader.load` (packs with our own layers -- ternary,
  online rotations, duplicated copies, MoE --, mlx packs, float models, GGUF files), loaded once
  before the port opens (:class:`PackProvider`);
- every request is answered by that model, whatever its ``model`` field says: a client cannot
  make the server load another path (mlx-lm's server would load any path or hub id it is sent);
- a prompt that does not fit the model's context (``max_position_embeddings``) is refused with
  HTTP 400 ``context_length_exceeded``, and ``max_tokens`` is capped to the room left; a request
  whose prompt cannot be built (e.g. malformed ``messages``) is refused with HTTP 400 instead of
  mlx-lm's 404 (:class:`PackHandler`);
- ``GET /v1/models`` lists the served model only (mlx-lm's lists the Hugging Face cache).

Endpoints (mlx-lm's): ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with
``"stream": true``), ``GET /v1/models``, ``GET /health``.

mlx-lm has no public way to build a request's prompt before the request is queued, so the context
check calls its private ``ResponseGenerator._tokenize`` (the one mlx-lm's generation thread calls);
the 400s are written with ``APIHandler._set_completion_headers``. pyproject pins mlx-lm to
:data:`MLX_LM_RANGE`, :func:`check_mlx_lm` refuses in one line an mlx-lm without them, and
tests/test_serve_mlx_lm.py fails when either changes.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from importlib.metadata import version
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

from mlx_lm import server as mlx_server
from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache

from .errors import DupqError
from .eval.ppl import max_context
from .io.loader import load

#: the mlx-lm versions whose server has :data:`PRIVATE_API` (also the requirement in pyproject.toml)
MLX_LM_RANGE = ">=0.32,<0.33"
#: mlx-lm's private methods used here, with their parameters
PRIVATE_API = {
    (mlx_server.ResponseGenerator, "_tokenize"): ("self", "tokenizer", "request", "args"),
    (mlx_server.APIHandler, "_set_completion_headers"): ("self", "status_code"),
}


def check_mlx_lm() -> None:
    """Raise :class:`DupqError` (one line) when the installed mlx-lm's server lacks a method of
    :data:`PRIVATE_API` or takes other parameters."""
    for (cls, name), params in PRIVATE_API.items():
        fn = getattr(cls, name, None)
        if not callable(fn) or tuple(inspect.signature(fn).parameters) != params:
            raise DupqError(f"mlx-lm {version('mlx-lm')}'s server has no {cls.__name__}.{name}({', '.join(params[1:])}), "
                            f"which mlx-dupq serve uses; pip install 'mlx-lm{MLX_LM_RANGE}'")


def server_options(model_name: str, **overrides) -> argparse.Namespace:
    """mlx-lm's server settings (its command-line defaults) with ``overrides`` applied."""
    opts = dict(
        model=model_name, adapter_path=None, draft_model=None, num_draft_tokens=3,
        trust_remote_code=False, chat_template="", use_default_chat_template=False, chat_template_args={},
        allowed_origins=["*"], temp=0.0, top_p=1.0, top_k=0, min_p=0.0, max_tokens=512,
        decode_concurrency=32, prompt_concurrency=8, prefill_step_size=2048,
        prompt_cache_size=10, prompt_cache_bytes=None,
        kv_bits=None, kv_group_size=64, quantized_kv_start=mlx_server.DEFAULT_QUANTIZED_KV_START,
        pipeline=False,
    )
    unknown = set(overrides) - set(opts)
    if unknown:
        raise DupqError(f"unknown server option(s) {sorted(unknown)}; known: {', '.join(sorted(opts))}")
    opts.update(overrides)
    return argparse.Namespace(**opts)


class PackProvider(mlx_server.ModelProvider):
    """mlx-lm's ModelProvider holding one model loaded by mlx-dupq, whatever a request names."""

    def __init__(self, cli_args: argparse.Namespace, model, tokenizer):
        super().__init__(cli_args)
        self._served = (model, tokenizer)
        self._install()

    def _install(self) -> None:
        self.model, self.tokenizer = self._served
        self.model_key = (self.cli_args.model, None, None)
        self.processor = None  # text models only
        self.draft_model = None
        self.is_batchable = all(hasattr(c, "merge") for c in make_prompt_cache(self.model))

    def load(self, model_path, adapter_path=None, draft_model_path=None):
        if adapter_path is not None:
            raise ValueError("adapters are not supported by mlx-dupq serve")
        if self.model is None:  # after mlx-lm's reset()
            self._install()
        return self.model, self.tokenizer

    def load_default(self):
        self.load(None)


class PackResponseGenerator(mlx_server.ResponseGenerator):
    """mlx-lm's generation loop, plus the prompt length of a request (for :class:`PackHandler`)."""

    def __init__(self, provider: PackProvider, prompt_cache: LRUPromptCache, context_length: int | None):
        super().__init__(provider, prompt_cache)
        self.context_length = context_length
        # the generation thread uses the provider's tokenizer; request threads count tokens with
        # their own copy (a Hugging Face fast tokenizer is not safe to share across threads)
        self._count_tokenizer = copy.deepcopy(provider.tokenizer)
        self._count_lock = threading.Lock()

    def prompt_length(self, request: mlx_server.CompletionRequest, chat_template_kwargs: dict | None) -> int:
        """Number of prompt tokens mlx-lm will build for ``request`` (raises if it cannot build it)."""
        with self._count_lock:
            prompt = self._tokenize(self._count_tokenizer, request,
                                    SimpleNamespace(chat_template_kwargs=chat_template_kwargs))[0]
        return len(prompt)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."


class PackHandler(mlx_server.APIHandler):
    """mlx-lm's request handler with a context check, 400s for bad prompts, and one model listed."""

    def _send_error(self, status: int, message: str, code: str) -> None:
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}}).encode()
        self._set_completion_headers(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def handle_completion(self, request, stop_words):
        gen: PackResponseGenerator = self.response_generator
        if self.requested_model == "default_model":  # the client named no model: answer with the served one's name
            self.requested_model = gen.cli_args.model
        try:
            n = gen.prompt_length(request, self.chat_template_kwargs)
        except Exception as e:  # whatever the tokenizer or chat template raise on bad input
            self._send_error(400, f"could not build a prompt from the request ({_one_line(e)})", "invalid_prompt")
            return
        ctx = gen.context_length
        if ctx is not None:
            if n >= ctx:
                self._send_error(
                    400,
                    f"the prompt is {n} tokens and this model's context is {ctx} tokens; shorten the prompt",
                    "context_length_exceeded",
                )
                return
            self.max_tokens = min(self.max_tokens, ctx - n)
        super().handle_completion(request, stop_words)

    def handle_models_request(self):
        name = self.response_generator.cli_args.model
        body = json.dumps({"object": "list", "data": [{"id": name, "object": "model", "created": self.created,
                                                       "owned_by": "mlx-dupq"}]}).encode()
        self._set_completion_headers(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def log_message(self, format, *args):  # one line per request through logging, not stderr prints
        logging.info("%s %s", self.address_string(), format % args)


def log_requests(verbose: bool) -> None:
    """Log one line per request (``verbose``) or only warnings, on stderr."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(message)s")


@dataclass
class Server:
    """A running (or ready) server: ``serve_forever()`` blocks, ``shutdown()`` stops it cleanly."""

    httpd: ThreadingHTTPServer
    generator: PackResponseGenerator
    name: str

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self.httpd.server_address[0]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/v1"

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.close()

    def serve_until_signal(self) -> None:
        """Serve until SIGINT (Ctrl-C) or SIGTERM, then stop cleanly (call from the main thread).

        The signal asks ``serve_forever`` to return instead of raising KeyboardInterrupt inside
        it: an interrupt there leaves MLX's worker threads to abort the process at exit.
        """
        stop = lambda *_: threading.Thread(target=self.httpd.shutdown, daemon=True).start()
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.serve_forever()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def shutdown(self) -> None:
        """Stop serve_forever (from another thread) and the generation thread."""
        self.httpd.shutdown()
        self.close()

    def close(self) -> None:
        if self.generator.generation_available():
            self.generator.stop_and_join()
        self.httpd.server_close()


def make_server(model: str | Path, host: str = "127.0.0.1", port: int = 8080, name: str | None = None,
                compute_dtype: str = "float32", **options) -> Server:
    """Load ``model`` and bind an OpenAI-compatible server to ``host:port`` (0 = a free port).

    ``options`` are mlx-lm server settings (:func:`server_options`: ``max_tokens``, ``temp``,
    ``decode_concurrency``, ...). The model is loaded before the port is bound, so a bad MODEL
    fails with a one-line :class:`DupqError` and no socket.
    """
    check_mlx_lm()
    name = name or str(model)
    cli_args = server_options(name, **options)
    m, tokenizer = load(model, compute_dtype=compute_dtype)
    provider = PackProvider(cli_args, m, tokenizer)
    generator = PackResponseGenerator(provider, LRUPromptCache(cli_args.prompt_cache_size), max_context(m))
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        generator.stop_and_join()
        raise DupqError(f"cannot resolve host {host!r} ({e.strerror}); pass --host 127.0.0.1") from None

    class _HTTPServer(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

        def handle_error(self, request, client_address):  # one log line, not socketserver's traceback
            exc = sys.exc_info()[1]
            if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                logging.info("%s closed the connection before the answer was complete", client_address[0])
            else:
                logging.error("request from %s failed: %s", client_address[0], _one_line(exc))

    fingerprint = mlx_server.get_system_fingerprint()
    try:
        httpd = _HTTPServer(address, lambda *a, **k: PackHandler(generator, *a, system_fingerprint=fingerprint, **k))
    except OSError as e:
        generator.stop_and_join()
        raise DupqError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port") from None
    return Server(httpd=httpd, generator=generator, name=name)
