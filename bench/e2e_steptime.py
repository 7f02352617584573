"""Cost of one e2e distillation step (forward + backward) on a pack, per shape.

    OPENBLAS_NUM_THREADS=1 python bench/e2e_steptime.py 256x1 256x4 512x2

For each SEQxBATCH: the teacher's forward (full log-softmax), then ``mx.value_and_grad`` of the
top-256 + rest loss (:func:`mlx_dupq.refine.e2e.kl_loss`) and of the full-vocabulary KL, twice each,
over the pack's scales, biases and norms; wall and CPU seconds of this process, peak RSS.
Writes ``bench/results/e2e_steptime_smollm2-135m.json``.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

from mlx_dupq._env import reexec_with_fast_blas  # noqa: E402

reexec_with_fast_blas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from mlx_lm.tuner.losses import kl_div_loss  # noqa: E402

from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.io.loader import load, load_model  # noqa: E402
from mlx_dupq.refine.e2e import kl_loss, mark_trainable  # noqa: E402

PACK = "/tmp/dupq-learned/smollm2-135m/auto_3.0"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    student, _ = load(PACK)
    mark_trainable(student, ("scales", "biases", "norms"))
    teacher, _, _ = load_model("smollm2-135m")
    params = {k: v.astype(mx.float32) for k, v in tree_flatten(student.trainable_parameters())}

    def topk(p, x, tl, ti):
        student.update(tree_unflatten(list(p.items())))
        return kl_loss(student, x, tl, ti, 1.0)

    def full(p, x, tlogp):
        student.update(tree_unflatten(list(p.items())))
        return kl_div_loss(nn.log_softmax(student(x).astype(mx.float32), axis=-1), tlogp).mean()

    rng = np.random.default_rng(0)
    rows = []
    for shape in sys.argv[1:]:
        seq, batch = (int(v) for v in shape.split("x"))
        x = mx.array(rng.integers(0, 49152, (batch, seq)).astype(np.int32))
        t0, c0 = time.time(), _cpu()
        lt = nn.log_softmax(teacher(x).astype(mx.float32), -1)
        mx.eval(lt)
        row = {"seq_len": seq, "batch": batch, "teacher_wall": time.time() - t0, "teacher_cpu": _cpu() - c0}
        idx = mx.argpartition(lt, kth=-256, axis=-1)[..., -256:]
        vals = mx.take_along_axis(lt, idx, -1)
        for name, fn, a in (("topk", mx.value_and_grad(topk), (x, vals, idx)), ("full", mx.value_and_grad(full), (x, lt))):
            for rep in range(2):
                t0, c0 = time.time(), _cpu()
                mx.eval(*fn(params, *a))
                row[f"{name}{rep}_wall"], row[f"{name}{rep}_cpu"] = time.time() - t0, _cpu() - c0
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row["loadavg"] = os.getloadavg()
        rows.append(row)
        print(row, flush=True)
    out = Path(__file__).parent / "results" / "e2e_steptime_smollm2-135m.json"
    write_result(out, {"pack": PACK, "command": "OPENBLAS_NUM_THREADS=1 python bench/e2e_steptime.py "
                       + " ".join(sys.argv[1:]), "rows": rows})


if __name__ == "__main__":
    main()
