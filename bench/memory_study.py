"""Decoding speed and memory study (SPEC F7.5), see :mod:`mlx_dupq.eval.memory` for every definition.

Batch-size scaling of decode tokens/s with the float KV cache; the KV cache in float, 8-bit and
4-bit (mlx-lm's QuantizedKVCache) with its bytes per position, decode speed and its effect on
PPL / next-token agreement over ``--windows`` held-out windows of ``--ctx`` tokens; peak memory;
bytes moved per decoded token and bandwidth utilisation against ``--peak-gbps`` (none without it;
a 256 MiB float32 matrix-vector product's GB/s on this machine is recorded for reference).

    python bench/memory_study.py smollm2-135m --batches 1,2,4,8 --prompt-tokens 128 --gen-tokens 16 \
        --windows 2 --ctx 256 --repeats 3 --json bench/results/eval_memory_smollm2.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mlx_dupq.eval.data import load_text, tokenize
from mlx_dupq.eval.memory import memory_study
from mlx_dupq.eval.ppl import windows_of
from mlx_dupq.io.loader import load
from mlx_dupq.io.atomic import write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--kv-bits", default="8,4")
    ap.add_argument("--kv-group-size", type=int, default=64)
    ap.add_argument("--data", default="brown:eval")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--peak-gbps", type=float, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="Runs per decode configuration; the fastest is kept.")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    m, tok = load(a.model)
    wins = windows_of(tokenize(tok, load_text(a.data)), a.ctx, a.windows) if a.windows else None
    res = memory_study(m, tok, wins, batches=[int(b) for b in a.batches.split(",")], prompt_tokens=a.prompt_tokens,
                       gen_tokens=a.gen_tokens, kv_bits=[int(b) for b in a.kv_bits.split(",")], peak_gbps=a.peak_gbps,
                       chunk=a.chunk, kv_group_size=a.kv_group_size, repeats=a.repeats,
                       progress=lambda what, d, t: print(f"{what} {d}/{t}", flush=True))
    out = {"kind": "eval_memory", "model": a.model, "data": a.data, **res,
           "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d")}
    for r in res["batch"]:
        print(f"batch {r['batch']}: {r['decode_tps']:.1f} tok/s, {r['bytes_per_token'] / 2**20:.1f} MiB/token, "
              f"{r['achieved_gbps']:.2f} GB/s", flush=True)
    for r in res["kv_cache"]:
        print(f"kv {r['kv']}: {r['kv_bytes_per_position']:.0f} B/position, {r['decode_tps']:.1f} tok/s"
              + (f", PPL {r['ppl_float']:.3f} -> {r['ppl_quant']:.3f}, top-1 {r['top1_agreement']:.4f}, KL {r['kl']:.2e}"
                 if "ppl_quant" in r else ""), flush=True)
    p = Path(a.json)
    write_result(p, out)
    print(f"wrote {p}")


if __name__ == "__main__":
    main()
