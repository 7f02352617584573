"""Resident memory of opening a GGUF model and loading its float model, phase by phase.

    python bench/source_memory.py --model qwen2.5-coder-0.5b

Each variant runs in its own process (a fresh heap): ``compact`` is the source as mlx-dupq opens it
(the reader's large metadata arrays -- vocabulary, merges -- kept as values, file pages dropped after
each tensor read, freed memory given back after the load); ``full-reader`` keeps gguf's reader as
it parses (numpy views of every vocabulary entry and merge), the file pages mapped in and the freed
heap unreturned. Both dequantize large tensors by chunks of rows. Then the model is dropped and
:func:`mlx_dupq._env.release_memory` says what it gave back. Writes
``bench/results/source_memory_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from mlx_dupq._env import reexec_with_fast_blas, resident_bytes  # noqa: E402

reexec_with_fast_blas()

from mlx_dupq.eval.speed import max_rss_bytes  # noqa: E402

VARIANTS = ("compact", "full-reader")


def _status() -> dict:
    return {"rss_mb": resident_bytes() // 2**20, "peak_rss_mb": max_rss_bytes() // 2**20}


def measure(model: str, variant: str) -> dict:
    import time

    import mlx.core as mx

    import mlx_dupq.io.gguf as g
    from mlx_dupq import _env
    from mlx_dupq.io.loader import float_model
    from mlx_dupq.io.models import open_named

    if variant == "full-reader":
        g._COMPACT_PARTS = float("inf")
        g._drop_pages = lambda reader: None
        import mlx_dupq.io.loader as loader
        loader.release_memory = lambda: 0  # float_model's own release (the one below stays)
    phases, t0 = [], time.time()

    def phase(name: str, **extra) -> None:
        phases.append({"phase": name, "seconds": round(time.time() - t0, 1), **_status(),
                       "mlx_active_mb": mx.get_active_memory() // 2**20, **extra})

    phase("start")
    src = open_named(model)
    phase("source opened")
    m = float_model(src)
    phase("float model loaded")
    del m
    import gc
    gc.collect()
    mx.clear_cache()
    phase("model dropped")
    phase("release_memory()", released_mb=_env.release_memory() // 2**20)
    return {"variant": variant, "phases": phases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one measurement (a child process)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(measure(a.model, a.variant)))
        return
    from mlx_dupq.io.atomic import write_result

    rows = []
    for v in VARIANTS:
        r = subprocess.run([sys.executable, __file__, "--model", a.model, "--variant", v],
                           capture_output=True, text=True, check=True, env=os.environ)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        for p in rows[-1]["phases"]:
            print(f"{v:12s} {p['phase']:22s} rss {p['rss_mb']:6d} MB  peak {p['peak_rss_mb']:6d} MB  "
                  f"mlx {p['mlx_active_mb']:6d} MB" + (f"  released {p['released_mb']} MB" if "released_mb" in p else ""))
    out = Path(a.out or Path(__file__).parent / "results" / f"source_memory_{a.model}.json")
    write_result(out, {"command": "python bench/source_memory.py " + " ".join(sys.argv[1:]), "model": a.model,
                       "variants": rows})
    print("->", out)


if __name__ == "__main__":
    main()
