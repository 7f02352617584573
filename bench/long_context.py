"""Long-context perplexity (SPEC F7.4): the same text at 2K / 4K (/ 8K) context, and the memory it takes.

For each ``--ctx`` the first ``--tokens`` tokens of ``--data`` are cut into ``tokens // ctx``
windows (so every context length scores the same text) and scored with
:func:`mlx_dupq.eval.ppl.perplexity` (windows longer than 2048 tokens are prefilled through the KV
cache in chunks of 1024). ``--one-pass CTX`` also scores one window of that length in a single
forward pass, to compare MLX's peak memory with the chunked run. Contexts above the model's
``max_position_embeddings`` are refused.

    python bench/long_context.py smollm2-135m --ctx 2048,4096 --tokens 8192 --one-pass 4096 \
        --json bench/results/eval_longctx_smollm2.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mlx_dupq.eval.data import load_text
from mlx_dupq.eval.ppl import max_context, perplexity
from mlx_dupq.io.loader import load
from mlx_dupq.io.atomic import write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--data", default="brown:eval")
    ap.add_argument("--ctx", default="2048,4096")
    ap.add_argument("--tokens", type=int, default=8192, help="Text scored at every context length.")
    ap.add_argument("--one-pass", type=int, default=None, help="Also one window of this length in one pass.")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    ctxs = [int(c) for c in a.ctx.split(",")]
    text = load_text(a.data)
    m, tok = load(a.model)
    runs = []
    for ctx in ctxs:
        r = perplexity(m, tok, text, ctx=ctx, windows=max(1, a.tokens // ctx))
        runs.append({"mode": "default", **r})
        print(f"ctx {ctx}: PPL {r['ppl']:.3f} ({r['windows']} windows, chunk {r['chunk']}, "
              f"peak {r['peak_memory_bytes'] / 2**20:.0f} MiB, {r['seconds']:.1f}s)", flush=True)
    if a.one_pass:
        r = perplexity(m, tok, text, ctx=a.one_pass, windows=1, chunk=a.one_pass)
        c = perplexity(m, tok, text, ctx=a.one_pass, windows=1)
        runs += [{"mode": "one_pass", **r}, {"mode": "chunked", **c}]
        print(f"one window of {a.one_pass}: one pass peak {r['peak_memory_bytes'] / 2**20:.0f} MiB, "
              f"chunked ({c['chunk']}) peak {c['peak_memory_bytes'] / 2**20:.0f} MiB; "
              f"NLL {r['nll']:.6f} vs {c['nll']:.6f}", flush=True)
    out = {"kind": "eval_longctx", "model": a.model, "data": a.data, "tokens": a.tokens,
           "max_position_embeddings": max_context(m), "runs": runs,
           "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d")}
    p = Path(a.json)
    write_result(p, out)
    print(f"wrote {p}")


if __name__ == "__main__":
    main()
