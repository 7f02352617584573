"""Learned 2-bit (issue 14): reference, mlx-lm, the old best recipe and the trained pipeline, in one run.

    python bench/learned.py --model smollm2-135m --rows reference,mlxlm:rtn:2:64,dupq:smollm2-gptq-mixed-3.0,auto:3.0
    python bench/learned.py --model smollm2-135m --rows dupq:smollm2-gptq-mixed-3.0+block \
        --block '{"samples": 8, "seq_len": 256, "epochs": 2, "batch": 1}'

Rows (each converted and evaluated in its own child process, so its peak RSS is its own):
  reference                 the float model (fp32)
  mlxlm:...                 as in ``bench/w2_compare.py`` (``mlxlm:rtn:2:64``: mlx-lm RTN 2-bit g64;
                            ``mlxlm:dwq:2:64:80 --calib mix:calib --dwq-windows e2e``: mlx-lm's DWQ on the
                            same tokens as the e2e stage of ``convert --bpw``)
  dupq:RECIPE               a recipe as shipped
  dupq:RECIPE+block         that recipe with ``[refine.block]`` = ``--block`` (JSON; defaults otherwise)
  auto:B[+cdN]              ``mlx-dupq convert --bpw B`` (``+cdN``: GPTQ with N coordinate-descent sweeps;
                            :func:`mlx_dupq.auto.plan_auto`; ``--e2e-steps N``
                            sets its end-to-end stage, 0 skips it)
  pack:ROW                  evaluate the pack an earlier row ``ROW`` left in ``--work`` as it is (no convert;
                            its convert figures are that row's)
  refine:ROW                the end-to-end stage of ``convert --bpw`` (the plan's ``[refine.e2e]`` options,
                            ``--e2e-steps``) run on the pack an earlier row ``ROW`` left in ``--work``
                            (e.g. ``refine:auto:3.0`` after ``auto:3.0 --e2e-steps 0``); its convert time is
                            the stage's own (the base row's is in that row); ``--e2e-lr`` sets its lr

``--data`` may list several texts (``brown:eval,code:eval``): each row is evaluated on each
(``eval``: {text: ppl, tokens, ...}; the top-level ``ppl`` is the first text's).

Each row: all-in bits/weight, PPL on ``--data`` (ctx, windows, tokens), convert wall time, peak RSS of
the row's process (convert + eval) and its CPU time (wall times on a shared machine are inflated by
other jobs; CPU time / cores is what an idle machine would take), per-layer block reports when there are any, and the greedy answer
(chat template) to ``--prompt``. Rows of earlier runs with the same protocol are kept in the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path


from mlx_dupq._env import machine_record, reexec_with_fast_blas  # noqa: E402

reexec_with_fast_blas()

import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_dupq.auto import _e2e, plan_auto  # noqa: E402
from mlx_dupq.config import load_recipe  # noqa: E402
from mlx_dupq.eval.data import load_text  # noqa: E402
from mlx_dupq.generate import stream  # noqa: E402
from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.io.loader import load  # noqa: E402
from mlx_dupq.io.source import open_source, write_hf_dir  # noqa: E402
from mlx_dupq.layers.cpu import DensePrefillQuantizedLinear, _dense  # noqa: E402
from mlx_dupq.refine.e2e import distill_pack  # noqa: E402
from mlx_dupq.refine.e2e_spec import E2ESpec  # noqa: E402
from mlx_dupq.pipeline import convert  # noqa: E402
from mlx_dupq.refine.spec import RefineSpec  # noqa: E402
from rtn_table import evaluate, weight_bits  # noqa: E402  (bench/, same protocol)
from w2_compare import mlxlm_row  # noqa: E402

PROMPT = "Write one sentence about the sea."


def _say(t0: float):
    def say(message: str, done: int, total: int) -> None:
        if "held-out" in message or message.startswith("quantizing layer") or "calibration" in message:
            print(f"  [{time.time() - t0:7.1f}s] {done}/{total} {message}", flush=True)
    return say


def one_row(row: str, args, float_dir: Path, work: Path) -> dict:
    """Convert (when needed) and evaluate one row; runs in the child process."""
    entry: dict = {"row": row}
    t0 = time.time()
    plain_call = nn.QuantizedLinear.__call__

    def prefill_call(self, x):  # CPU prefill for mlx-lm's packs (the packed kernel for anything else:
        # DensePrefillQuantizedLinear's own fallback is super().__call__, which is this patch itself)
        if self.mode == "affine" and _dense(x, self):
            return DensePrefillQuantizedLinear.__call__(self, x)
        return plain_call(self, x)

    parts = row.split(":", 1)
    if row == "reference":
        path = float_dir
        entry.update(method="reference (fp32)", bits_per_weight=32.0)
    elif parts[0] == "pack":
        path = work / parts[1].replace(":", "_").replace("+", "_")
        cfg = json.loads((path / "config.json").read_text()).get("mlx_dupq", {})
        entry.update(method=f"the pack of row {parts[1]} as it is", path=str(path),
                     recipe_description=json.loads(cfg["recipe"]).get("description") if isinstance(cfg.get("recipe"), str)
                     else (cfg.get("recipe") or {}).get("description"))
        if "refine" in cfg:
            entry["refine"] = cfg["refine"]
    else:
        path = work / row.replace(":", "_").replace("+", "_")
        shutil.rmtree(path, ignore_errors=True)
        if parts[0] == "dupq":
            name, _, extra = parts[1].partition("+")
            rec = load_recipe(name)
            if extra == "block":
                rec = dataclasses.replace(rec, refine=RefineSpec.from_dict({"block": json.loads(args.block)}))
            convert(float_dir, path, rec, force=True, progress=_say(t0))
            entry.update(method=f"mlx-dupq {parts[1]}", recipe_dict=rec.to_dict())
        elif parts[0] == "auto":
            kw = {} if args.auto_calib is None else {"calib_data": args.auto_calib}
            bpw, _, extra = parts[1].partition("+")
            if extra:  # auto:B+cdN: GPTQ with N coordinate-descent sweeps
                kw["cd_sweeps"] = int(extra.removeprefix("cd"))
            rec, choices = plan_auto(str(float_dir), float(bpw), e2e_steps=args.e2e_steps, **kw)
            entry["plan_seconds"] = time.time() - t0
            convert(float_dir, path, rec, force=True, progress=_say(t0))
            entry.update(method=f"mlx-dupq convert --bpw {parts[1]}", recipe_dict=rec.to_dict(),
                         choices=[dataclasses.asdict(c) for c in choices])
        elif parts[0] == "refine":
            base = work / parts[1].replace(":", "_").replace("+", "_")
            opts, choice = _e2e(args.e2e_steps)
            spec = E2ESpec.from_dict(opts if args.e2e_lr is None else dict(opts, lr=args.e2e_lr, lr_per_scale=False, relative=False))
            if args.e2e_lr is not None:  # the choice row says what ran
                choice = dataclasses.replace(choice, choice=re.sub(r"lr [^,]*,", f"lr {spec.lr:g} (absolute),", choice.choice, count=1),
                                             why=choice.why + f"; lr set by --e2e-lr {spec.lr:g} (absolute)")
            t1 = time.time()

            def log(phase, done, total, info):
                if phase != "targets" or done == total:
                    print(f"  [{time.time() - t1:7.1f}s] e2e {phase} {done}/{total} {info}", flush=True)

            res = distill_pack(base, float_dir, spec, out=path, progress=log, teacher_name=args.model)
            entry.update(method=f"mlx-dupq e2e stage of convert --bpw on {parts[1]}", base=str(base),
                         e2e_choice=dataclasses.asdict(choice), e2e=res.to_dict())
        else:  # mlx-lm's own passes (DWQ's training) with the CPU prefill, as in w2_compare (same numbers)
            nn.QuantizedLinear.__call__ = prefill_call
            entry.update(mlxlm_row(parts[1].split(":"), float_dir, path, args), method=f"mlx-lm {parts[1]}")
        entry["convert_seconds"] = time.time() - t0
        cfg = json.loads((path / "config.json").read_text()).get("mlx_dupq", {})
        if "refine" in cfg:
            entry["refine"] = cfg["refine"]
    nn.QuantizedLinear.__call__ = prefill_call
    if row != "reference":
        n_params = sum(v.size for _, v in tree_flatten(load(str(float_dir))[0].parameters()))
        entry["bits_per_weight"] = weight_bits(path) / n_params
    entry["eval"] = {}
    for name in args.data.split(","):
        t1 = time.time()
        r = evaluate(path, load_text(name), args.ctx, args.windows)
        entry["eval"][name] = {**r, "wall_seconds": time.time() - t1, "loadavg": os.getloadavg()}
        print(f"  {row} {name}: PPL {r['ppl']:.3f} on {r['tokens']} tokens", flush=True)
    entry.update(entry["eval"][args.data.split(",")[0]])
    nn.QuantizedLinear.__call__ = plain_call
    entry["generation"] = "".join(stream(str(path), args.prompt, max_tokens=40))
    entry["loadavg_end"] = os.getloadavg()
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default="reference,mlxlm:rtn:2:64,dupq:smollm2-gptq-mixed-3.0,auto:3.0")
    ap.add_argument("--block", default="{}", help="[refine.block] options (JSON) of the dupq:RECIPE+block rows")
    ap.add_argument("--data", default="brown:eval")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--calib", default="brown:calib")  # mlx-lm rows' calibration (w2_compare's options)
    ap.add_argument("--auto-calib", default=None, help="auto:B rows: calibration text of the plan and GPTQ "
                    "(default: convert --bpw's)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--dwq-lr", type=float, default=1e-5)
    ap.add_argument("--dwq-windows", choices=("calib", "e2e"), default="calib",
                    help="mlxlm:dwq rows' data: --calib-samples windows of --calib (calib) or the e2e stage's windows of --calib (e2e)")
    ap.add_argument("--e2e-steps", type=int, default=None, help="auto:B / refine:ROW rows: e2e steps (0 skips)")
    ap.add_argument("--e2e-lr", type=float, default=None, help="refine:ROW rows: the e2e stage's lr in absolute units (default: convert --bpw's, relative to each group's |scale|)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dupq-learned"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: one row -> JSON on stdout's last line
    args = ap.parse_args()
    work = args.work / args.model
    work.mkdir(parents=True, exist_ok=True)
    float_dir = work / "float"
    if args.one is not None:
        print("ROW " + json.dumps({**one_row(args.one, args, float_dir, work), "machine": machine_record()}), flush=True)
        return
    if not (float_dir / "config.json").exists():
        write_hf_dir(open_source(args.model), float_dir, dtype="float32")
    out = args.out or Path(__file__).parent / "results" / f"learned_{args.model}.json"
    protocol = {"model": args.model, "data": args.data, "ctx": args.ctx, "windows": args.windows, "prompt": args.prompt}
    command = "python bench/learned.py " + " ".join(sys.argv[1:])
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        child = [sys.executable, __file__, *sys.argv[1:], "--one", row]
        proc = subprocess.Popen(child, stdout=subprocess.PIPE, text=True)
        last = ""
        for line in proc.stdout:
            if line.startswith("ROW "):
                last = line[4:]
            else:
                print(line, end="", flush=True)
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0 or not last:
            print(f"{row}: failed (status {status})", flush=True)
            continue
        entry = json.loads(last)
        entry["peak_rss_mb"] = usage.ru_maxrss / 1024
        entry["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # the row's process, all threads (the
        # machine is shared: wall times are inflated by other jobs, CPU time is not)
        entry["command"] = command
        data = dict(protocol, rows=[])
        if out.exists():
            old = json.loads(out.read_text())
            if all(old.get(k) == v for k, v in protocol.items()):
                data["rows"] = [r for r in old["rows"] if r["row"] != row]
        data["rows"].append(entry)
        write_result(out, data)
        print(f"{row}: bpw {entry['bits_per_weight']:.3f} ppl {entry['ppl']:.3f} "
              f"convert {entry.get('convert_seconds', 0):.0f}s rss {entry['peak_rss_mb']:.0f} MB | "
              f"{entry['generation'][:60]!r}", flush=True)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
