"""What ``convert --bpw B`` would run: :func:`mlx_dupq.auto.plan_auto` at several budgets, no conversion.

    python bench/auto_plan.py --model qwen2.5-coder-0.5b --bpw 2.5,2.25

Records per budget the planned all-in bits/weight, the spec each module gets (by path and counted by label), the
embedding and head specs, and the Choice rows ``convert --bpw`` prints (or the one-line refusal), with
wall and CPU seconds and the load average (the CPU is shared). Rows of an existing file for the same
model are replaced budget by budget.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time
from pathlib import Path

from mlx_dupq._env import reexec_with_fast_blas  # noqa: E402

reexec_with_fast_blas()

from mlx_dupq.auto import plan_auto  # noqa: E402
from mlx_dupq.config import EMBED_PATTERN, LM_HEAD_PATTERN  # noqa: E402
from mlx_dupq.errors import DupqError  # noqa: E402
from mlx_dupq.io.atomic import write_result  # noqa: E402


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def row(model: str, bpw: float) -> dict:
    t0, c0, load0 = time.perf_counter(), cpu_seconds(), os.getloadavg()[0]
    out = {"bpw": bpw}
    try:
        rec, choices = plan_auto(model, bpw, e2e_steps=0)
    except DupqError as e:
        out["refused"] = str(e)
    else:
        counts: dict[str, int] = {}
        heads = {}
        for r in rec.rules:
            lab = r.spec.label() if r.spec is not None else "float"
            counts[lab] = counts.get(lab, 0) + 1
            path = r.pattern.strip("^$").replace("\\", "")
            if re.search(EMBED_PATTERN, path) or re.search(LM_HEAD_PATTERN, path):
                heads[path] = lab
        alloc = next(c for c in choices if c.step == "allocation")
        planned = re.search(r"([0-9.]+) planned", alloc.why)
        out.update(planned_bpw=float(planned.group(1)) if planned else None, rotation=rec.rotation is not None,
                   specs=counts, embedding_head=heads,
                   modules={r.pattern.strip("^$").replace("\\", ""): r.spec.label() if r.spec is not None else "float"
                            for r in rec.rules},
                   choices=[{"step": c.step, "choice": c.choice, "why": c.why} for c in choices])
    out.update(seconds=round(time.perf_counter() - t0, 1), cpu_seconds=round(cpu_seconds() - c0, 1),
               load_avg_1min=[round(load0, 2), round(os.getloadavg()[0], 2)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bpw", default="3.0", help="comma-separated all-in budgets")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(__file__).parent / "results" / f"auto_plan_{args.model}.json"
    result = {"commands": [], "model": args.model, "rows": []}
    if out.exists():
        result = json.loads(out.read_text())
        if result.get("model") != args.model:
            raise SystemExit(f"{out} holds plans of {result.get('model')}; pass --out for a new file")
    budgets = [float(b) for b in args.bpw.split(",") if b.strip()]
    result["commands"].append("python bench/auto_plan.py " + " ".join(sys.argv[1:]))
    for b in budgets:
        r = row(args.model, b)
        print(json.dumps(r), flush=True)
        result["rows"] = sorted([x for x in result["rows"] if x["bpw"] != b] + [r], key=lambda x: x["bpw"])
        write_result(out, result)


if __name__ == "__main__":
    main()
