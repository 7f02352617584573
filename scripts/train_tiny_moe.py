"""Train the tiny DeepSeek-MoE model (mlx_dupq/moe/train.py) and write its results JSON.

    # the named model: built into the cache (or reused), results to bench/results/moe_train.json
    python scripts/train_tiny_moe.py --named --json bench/results/moe_train.json
    # a custom run into a directory
    python scripts/train_tiny_moe.py --out /tmp/moe --steps 100 --seed 1 --json /tmp/moe.json

Run with ``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3`` on Linux (fast BLAS).
Deterministic: the same seed and recipe give the same weights on the same machine and library versions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_dupq.errors import DupqError  # noqa: E402
from mlx_dupq.moe import train as T  # noqa: E402


def _progress(done: int, total: int, msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {done}/{total} {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--named", action="store_true", help="build the named model tiny-deepseek-moe into the cache")
    p.add_argument("--out", help="output directory (a Hugging Face style model directory)")
    p.add_argument("--json", help="write the results (config, loss curve, PPL vs unigram, routing) here")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--eval-windows", type=int, default=256, help="evenly spaced brown:eval windows (0: all)")
    a = p.parse_args(argv)
    try:
        if a.named:
            if a.out or a.steps or a.seed is not None or a.batch_size or a.lr:
                raise DupqError("--named builds the fixed recipe; leave out --out/--steps/--seed/--batch-size/--lr")
            from mlx_dupq.io import models

            path = models.fetch("tiny-deepseek-moe", progress=_progress)
            result = json.loads((path.parent / "result.json").read_text())
        else:
            if not a.out:
                raise DupqError("pass --out DIR (or --named for the named model)")
            over = {k: v for k, v in (("steps", a.steps), ("seed", a.seed), ("batch_size", a.batch_size), ("lr", a.lr))
                    if v is not None}
            cfg = replace(T.TINY_DEEPSEEK_MOE, **over)
            result = T.build(a.out, cfg, eval_windows=a.eval_windows or None, progress=_progress)
    except DupqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = {k: result.get(k) for k in ("path", "sha256", "train_seconds", "seconds")}
    for k in ("eval", "unigram"):
        if k in result:
            summary[f"{k}_ppl"] = round(result[k]["ppl"], 2)
    print(json.dumps(summary, indent=2))
    if a.json:
        out = Path(a.json)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.rename(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
