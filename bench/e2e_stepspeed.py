"""Time of the training steps of ``distill_pack`` (the ``refine`` stage) on a pack, per step.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=<checkout> python bench/e2e_stepspeed.py PACK TEACHER OUT.json [STEPS] [LABEL]

Runs :func:`mlx_dupq.refine.e2e.distill_pack` of the ``mlx_dupq`` found on ``PYTHONPATH`` (so the same
script times an older checkout: the "before" of a speed change) for STEPS (default 3) steps of one
256-token ``mix:calib`` window, validation on one window before and after; records each step's wall
and CPU seconds (this process, all threads) the peak RSS and the load average, and appends a row to OUT.json
(rows of other LABELs are kept). The output pack goes to a temporary directory and is deleted.
Wall times on the shared 2 cores depend on the others' load: compare the CPU seconds.

Small pack (SmolLM2-135M, 3-bit RTN, ternary embedding = tied head; 15 s to make):

    mlx-dupq convert smollm2-135m -o /tmp/e2espeed/pack --recipe bench/e2e_stepspeed_rtn3t.toml --force
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlx_dupq._env import reexec_with_fast_blas

reexec_with_fast_blas()

import mlx_dupq  # noqa: E402
from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.refine.e2e import distill_pack  # noqa: E402
from mlx_dupq.refine.e2e_spec import E2ESpec  # noqa: E402


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    pack, teacher, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    label = sys.argv[5] if len(sys.argv) > 5 else "run"
    spec = E2ESpec(steps=steps, samples=steps, valid_samples=1, batch=1, seq_len=256, eval_every=1000, patience=0)
    marks: list[tuple[str, float, float]] = []

    def progress(phase, done, total, info):
        marks.append((phase, time.time(), _cpu()))

    src = Path(mlx_dupq.__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no", "mlx_dupq"],
                           capture_output=True, text=True).stdout.strip()
    commit += "+uncommitted" if dirty else ""
    t0, c0 = time.time(), _cpu()
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        res = distill_pack(pack, teacher, spec, out=Path(d) / "out", progress=progress)
    total_wall, total_cpu = time.time() - t0, _cpu() - c0
    # the step times: from the mark before each "train" mark (validation or the previous step) to it
    step_rows = []
    for i, (phase, w, c) in enumerate(marks):
        if phase == "train" and i > 0:
            step_rows.append({"wall_s": round(w - marks[i - 1][1], 2), "cpu_s": round(c - marks[i - 1][2], 2)})
    row = {"label": label, "mlx_dupq": str(src), "commit": commit, "steps": step_rows,
           "total_wall_s": round(total_wall, 1), "total_cpu_s": round(total_cpu, 1),
           "valid_kl_before": res.valid_kl_before, "train_tokens_per_step": spec.seq_len * spec.batch,
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "loadavg": os.getloadavg(), "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS")}
    print(json.dumps(row), flush=True)
    old = json.loads(out.read_text()) if out.exists() else {}
    rows = [r for r in old.get("rows", []) if r.get("label") != label] + [row]
    cmds = {**old.get("commands", {}), label: f"OPENBLAS_NUM_THREADS={row['openblas_threads']} PYTHONPATH={src} "
            f"nice -n 10 python bench/e2e_stepspeed.py {' '.join(sys.argv[1:])}"}
    write_result(out, {"pack": pack, "teacher": teacher, "spec": spec.to_dict(), "commands": cmds, "rows": rows})


if __name__ == "__main__":
    main()
