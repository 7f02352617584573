"""Which 2-bit decode GEMV mlx offers fastest on the CPU: one token (1, in) x W (out, in).

Paths per layer shape, float32 activations, group 64 (affine):
  qmm        mx.quantized_matmul on the packed codes (what the layers run for decode)
  deq_blas   mx.dequantize, then x @ W.T through BLAS (per call: no cached float weight)
  dense_f32  x @ W.T with a float32 weight held in memory (the float model; 16x the 2-bit bytes)
at 2 and 4 bits. Median of ``--iters`` timed calls after warm-up; shapes are SmolLM2-135M's MLP
and lm_head and Qwen2.5-0.5B's MLP.

    python bench/kernel_cpu_decode.py --json bench/results/kernel_cpu_decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from mlx_dupq._env import reexec_with_fast_blas  # noqa: E402

reexec_with_fast_blas()

import mlx.core as mx  # noqa: E402

from mlx_dupq.io.atomic import write_result  # noqa: E402

SHAPES = {"smollm2 gate/up": (1536, 576), "smollm2 down": (576, 1536), "smollm2 lm_head": (49152, 576),
          "qwen2.5-0.5b gate/up": (4864, 896)}


def timed(fn, iters: int) -> float:
    for _ in range(3):
        mx.eval(fn())
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--json", type=Path, default=Path("bench/results/kernel_cpu_decode.json"))
    args = ap.parse_args()
    mx.set_default_device(mx.cpu)
    mx.random.seed(0)
    rows = []
    for name, (out, n) in SHAPES.items():
        w = mx.random.normal((out, n))
        x = mx.random.normal((1, n))
        row = {"layer": name, "out": out, "in": n, "dense_f32_ms": timed(lambda: x @ w.T, args.iters)}
        for bits in (2, 4):
            q, s, b = mx.quantize(w, group_size=args.group, bits=bits)
            mx.eval(q, s, b)
            row[f"qmm{bits}_ms"] = timed(lambda: mx.quantized_matmul(x, q, s, b, transpose=True, group_size=args.group,
                                                                      bits=bits), args.iters)
            row[f"deq_blas{bits}_ms"] = timed(lambda: x @ mx.dequantize(q, s, b, group_size=args.group, bits=bits).T,
                                              max(3, args.iters // 5))
        rows.append(row)
        print(json.dumps(row))
    res = {"command": "python " + " ".join(sys.argv), "device": str(mx.default_device()), "cpu_count": os.cpu_count(),
           "load_avg_1min": os.getloadavg()[0], "group_size": args.group, "rows": rows}
    write_result(args.json, res)


if __name__ == "__main__":
    main()
