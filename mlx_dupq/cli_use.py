"""``mlx-dupq`` commands that use a pack: ``generate``, ``verify``, ``serve``, ``export`` (GGUF)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .cli_common import (MODEL_HELP, PEER_TIMEOUT_HELP, PIPELINE_HELP, command_line, lib, out, progress_bar,
                         rank_log, write_json)


# ------------------------------------------------------------------------------------ generate


def generate(
    model: str = typer.Argument(..., help=MODEL_HELP),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt."),
    max_tokens: int = typer.Option(100, "--max-tokens", "-m", min=1),
    temp: float = typer.Option(0.0, "--temp", min=0.0, help="Sampling temperature (0 = greedy)."),
    seed: int = typer.Option(0, "--seed"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Apply the tokenizer's chat template if it has one."),
    compute_dtype: str = typer.Option("float32", "--compute-dtype"),
    pipeline: bool = typer.Option(False, "--pipeline", help=PIPELINE_HELP),
    peer_timeout: float = typer.Option(300.0, "--peer-timeout", help=PEER_TIMEOUT_HELP),
):
    """Stream a completion from MODEL (chat template applied when the tokenizer has one)."""
    stream, stream_pipelined = lib("stream", "stream_pipelined")

    if pipeline:
        return stream_pipelined(model, prompt, lambda s: out.print(s, end="", markup=False, highlight=False, soft_wrap=True),
                                max_tokens=max_tokens, temp=temp, seed=seed, chat=chat, compute_dtype=compute_dtype,
                                timeout=peer_timeout, log=rank_log)
    for piece in stream(model, prompt, max_tokens=max_tokens, temp=temp, seed=seed, chat=chat,
                        compute_dtype=compute_dtype):
        out.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
    out.print()


# -------------------------------------------------------------------------------------- verify


def verify(pack: Path = typer.Argument(..., help="An mlx-dupq pack directory.")):
    """Check every file of PACK against its manifest.json (sha256 and size); exit 1 naming a damaged file."""
    verify_pack = lib("verify_pack")

    m = verify_pack(pack)
    size = sum(f["size"] for f in m["files"].values())
    recipe = (m.get("recipe") or {}).get("name", "?")
    out.print(f"[green]ok[/green] {escape(str(pack))}: {len(m['files'])} files, {size / 2**20:.1f} MiB match the "
              f"manifest (written by {escape(m.get('tool', '?'))}, recipe {escape(recipe)})", soft_wrap=True)


# --------------------------------------------------------------------------------------- serve


def serve(
    model: str = typer.Argument(..., help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="Port (0 = any free port)."),
    max_tokens: int = typer.Option(512, "--max-tokens", min=1, help="Default max_tokens of a request."),
    compute_dtype: str = typer.Option("float32", "--compute-dtype"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every request."),
):
    """Serve MODEL over an OpenAI-compatible HTTP API (mlx-lm's server; Ctrl-C stops)."""
    log_requests, make_server = lib("log_requests", "make_server")

    log_requests(verbose)
    server = make_server(model, host=host, port=port, compute_dtype=compute_dtype, max_tokens=max_tokens)
    out.print(f"[green]serving[/green] {escape(model)} at {server.url} "
              "(POST /chat/completions, /completions; GET /models, /health; Ctrl-C stops)", soft_wrap=True)
    server.serve_until_signal()
    out.print("stopped")
    sys.stdout.flush()
    sys.stderr.flush()
    # mlx-lm's BatchGenerator, run in the server's generation thread, leaves MLX worker threads that
    # abort a normal interpreter exit ("terminate called without an active exception"): skip it
    os._exit(0)


# -------------------------------------------------------------------------------------- export


def export(
    pack: Path = typer.Argument(..., help="An mlx-dupq pack."),
    gguf_out: Path = typer.Option(..., "--gguf", help="The GGUF file to write (for llama.cpp)."),
    requantize: Optional[str] = typer.Option(None, "--requantize", help="Re-quantize every quantized weight to "
                                             "this llama.cpp type (lossy): Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, Q6_K ... Q2_K."),
    fallback: str = typer.Option("F32", "--fallback", help="Type for weights no GGUF type holds exactly "
                                 "(F32 = exact; Q8_0 ... = lossy)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
    as_json: Optional[Path] = typer.Option(None, "--json", help="Also write the per-tensor record here."),
):
    """Write PACK as a GGUF file for llama.cpp: exact where a GGUF type holds the pack's numbers."""
    export_gguf = lib("export_gguf")

    with progress_bar() as cb:
        res = export_gguf(pack, gguf_out, requantize=requantize, fallback=fallback, force=force, progress=cb)
    if as_json is not None:
        write_json(as_json, {"command": command_line(), **res.to_dict()})
    types = ", ".join(f"{n} {t}" for t, n in res.type_counts().items())
    lossy = [t.name for t in res.tensors if not t.exact]
    how = "exact" if not lossy else f"lossy in {len(lossy)} of {len(res.tensors)} tensors"
    out.print(f"[green]wrote[/green] {res.path}  {res.architecture}, {how}, {res.bits_per_weight:.2f} bits/weight "
              f"({types}), {res.seconds:.1f}s", soft_wrap=True)
    inexact_f32 = [t.name for t in res.tensors if t.type == "F32" and t.source[0].isdigit()]
    if inexact_f32 and requantize is None:
        n = len(inexact_f32)
        out.print(f"note: no GGUF quantized type holds {inexact_f32[0]}{f' (and {n - 1} more)' if n > 1 else ''} "
                  "exactly: written as F32 (--fallback Q8_0: smaller, lossy)", soft_wrap=True)

