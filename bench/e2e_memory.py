"""Memory of the e2e stage (:func:`mlx_dupq.refine.e2e.distill_pack`) on a pack, phase by phase.

    OPENBLAS_NUM_THREADS=1 python bench/e2e_memory.py --pack /tmp/dupq-learned/smollm2-135m/auto_3.0 \\
        --teacher /tmp/dupq-learned/smollm2-135m/float --steps 3

The teacher is built as convert's ``[refine.e2e]`` stage builds it (``float_model`` of the source) and
handed over without another reference. At the end of the teacher targets and at every step and
validation: resident memory (now and peak, ``ru_maxrss``), MLX's active / peak / cache memory, and
whether the teacher is still alive. Then the peak of the whole run, CPU and wall seconds, the load
and the sha256 of the refined pack (a change that only saves memory must leave it identical).
Writes ``bench/results/e2e_memory_<name>.json`` (``--name``, default ``smollm2-135m``).

The options are ``convert --bpw``'s e2e stage (``mlx_dupq.auto.E2E_DEFAULTS``, also ``mlx-dupq refine``'s)
with ``--steps`` steps, each window seen once; ``--grad-checkpoint`` / ``--no-grad-checkpoint``: each decoder
layer recomputed in the backward pass or not (``E2ESpec.grad_checkpoint``; default: the stage's). (``e2e_memory_smollm2-135m.json`` was measured with
``E2ESpec``'s class defaults of then: batch 4, 64 + 8 windows, its ``e2e`` field says so.)

    python bench/e2e_memory.py --pack /tmp/dupq-quiet/qwen2.5-coder-0.5b/auto_2.5 \
        --teacher qwen2.5-coder-0.5b --steps 6 --eval-every 6 --name qwen2.5-coder-0.5b --no-grad-checkpoint
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import time
import weakref
from pathlib import Path

from mlx_dupq._env import reexec_with_fast_blas, resident_bytes  # noqa: E402

reexec_with_fast_blas()

import mlx.core as mx  # noqa: E402

from mlx_dupq.auto import _e2e  # noqa: E402
from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.io.loader import float_model  # noqa: E402
from mlx_dupq.io.source import open_source  # noqa: E402
from mlx_dupq.refine.e2e import distill_pack  # noqa: E402
from mlx_dupq.refine.e2e_spec import E2ESpec  # noqa: E402


def rss_mb() -> float:
    return resident_bytes() / 2**20


def tree_sha256(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", required=True)
    ap.add_argument("--teacher", required=True, help="The float source of the pack (a name or a directory).")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("/tmp/e2e_memory/refined"))
    ap.add_argument("--name", default="smollm2-135m")
    ap.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=None,
                    help="recompute each decoder layer in the backward pass (default: the stage's)")
    ap.add_argument("--eval-every", type=int, default=None, help="validation every N steps (default: the stage's)")
    args = ap.parse_args()
    opts, _ = _e2e(args.steps)  # convert --bpw's stage at these steps (every window seen once)
    if args.grad_checkpoint is not None:
        opts["grad_checkpoint"] = args.grad_checkpoint
    if args.eval_every:
        opts["eval_every"] = args.eval_every
    spec = E2ESpec.from_dict(opts)
    t0, ref, phases, steps = time.time(), {}, [], []
    c0 = resource.getrusage(resource.RUSAGE_SELF)

    def snap(tag: str) -> None:
        row = {"phase": tag, "seconds": round(time.time() - t0, 1), "rss_mb": round(rss_mb()),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "mlx_active_mb": round(mx.get_active_memory() / 2**20), "mlx_peak_mb": round(mx.get_peak_memory() / 2**20),
               "mlx_cache_mb": round(mx.get_cache_memory() / 2**20),
               "teacher_alive": ref["t"]() is not None if "t" in ref else None}
        phases.append(row)
        print(json.dumps(row), flush=True)

    def progress(phase: str, done: int, total: int, info: dict) -> None:
        if phase != "targets" or done == total:
            snap(f"{phase} {done}/{total}")
            if phase == "train":
                steps.append(time.time())

    def handed_over(model):
        ref["t"] = weakref.ref(model)
        return model

    snap("start")
    res = distill_pack(args.pack, handed_over(float_model(open_source(args.teacher))), spec, out=args.out,
                       progress=progress, teacher_name=args.teacher)
    snap("end")
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "command": (f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']} " if "OPENBLAS_NUM_THREADS" in os.environ
                    else "") + "python bench/e2e_memory.py " + " ".join(sys.argv[1:]),
        "pack": args.pack, "teacher": args.teacher, "e2e": spec.to_dict(),
        "valid_kl": [res.valid_kl_before, res.valid_kl_after], "kept": res.kept,
        "refined_pack_sha256": tree_sha256(args.out), "peak_rss_mb": round(c1.ru_maxrss / 1024),
        "mlx_peak_mb": round(mx.get_peak_memory() / 2**20), "cpu_seconds": round(c1.ru_utime + c1.ru_stime
                                                                                  - c0.ru_utime - c0.ru_stime, 1),
        "wall_seconds": round(time.time() - t0, 1), "phases": phases,
        # wall seconds per training step after the first (a validation pass falls between some of them)
        "step_seconds": [round(b - a, 1) for a, b in zip(steps, steps[1:])],
    }
    out = Path(__file__).parent / "results" / f"e2e_memory_{args.name}.json"
    write_result(out, result)
    print(f"peak RSS {result['peak_rss_mb']} MB, MLX peak {result['mlx_peak_mb']} MB -> {out}")


if __name__ == "__main__":
    main()
