"""Short controlled e2e runs on one pack (docs/e2e.md, "What moves a 3-bit SmolLM2 pack").

    python bench/e2e_study.py A_lr1e-4 '{"lr": 1e-4}' B_lr1e-3 '{"lr": 1e-3}'
    python bench/e2e_study.py C_rel3e-3 '{"lr": 3e-3, "relative": true, "steps": 6, "samples": 6}' \
        D_lr1e-4_T2 '{"lr": 1e-4, "temperature": 2.0, "steps": 6, "samples": 6}'

Each NAME OPTIONS pair runs :func:`mlx_dupq.refine.e2e.distill_pack` on ``--pack`` (default: the
``convert --bpw 3.0`` pack ``bench/learned.py`` leaves in /tmp/dupq-learned) with ``BASE`` updated by
OPTIONS (JSON of E2ESpec fields), one after the other in this process (the teacher is loaded once),
one thread of OpenBLAS. The validation KL (nats/token, temperature 1, top-256 + rest, the same 4 x 256
``mix:calib`` windows for every run: same seed and seq_len) is the figure to compare; each row also
has its wall and CPU seconds and the load average. Rows are appended to ``--out``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from mlx_dupq._env import machine_record, reexec_with_fast_blas  # noqa: E402

reexec_with_fast_blas()

from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.io.loader import load_model  # noqa: E402
from mlx_dupq.refine.e2e import distill_pack  # noqa: E402
from mlx_dupq.refine.e2e_spec import E2ESpec  # noqa: E402

BASE = dict(steps=12, lr=1e-4, samples=12, valid_samples=4, seq_len=256, batch=1, eval_every=6, patience=0,
            data="mix:calib")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    args = sys.argv[1:]
    pack, model = "/tmp/dupq-learned/smollm2-135m/auto_3.0", "smollm2-135m"
    out = Path(__file__).parent / "results" / "e2e_study_smollm2-135m.json"
    while args and args[0].startswith("--"):
        flag, value, args = args[0], args[1], args[2:]
        pack, model, out = (value, model, out) if flag == "--pack" else (pack, value, out) if flag == "--model" \
            else (pack, model, Path(value))
    teacher, _, _ = load_model(model)
    command = "python bench/e2e_study.py " + " ".join(f"'{a}'" if "{" in a else a for a in sys.argv[1:])
    for name, opts in zip(args[::2], args[1::2]):
        spec = E2ESpec(**{**BASE, **json.loads(opts)})
        t0, c0 = time.time(), _cpu()

        def log(phase, done, total, info):
            if phase != "targets":
                print(f"  {name} {time.time() - t0:6.0f}s {phase} {done}/{total} {info}", flush=True)

        r = distill_pack(pack, teacher, spec, out=f"/tmp/e2e/exp_{name}", progress=log, teacher_name=model)
        row = dict(name=name, options=json.loads(opts), spec=spec.to_dict(), wall=time.time() - t0, cpu=_cpu() - c0,
                   load=os.getloadavg(), command=command, pack=pack, **r.to_dict(), machine=machine_record())
        data = json.loads(out.read_text()) if out.exists() else {"model": model, "base": BASE, "rows": []}
        data["rows"] = [x for x in data["rows"] if x["name"] != name] + [row]
        write_result(out, data)
        print("RESULT", json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
