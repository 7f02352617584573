"""How long does ``mlx-dupq convert`` take, per group, and did a code change alter the pack?

    python bench/convert_time.py --model qwen2.5-coder-0.5b --recipe w2-t3 --base d5af4c3,58aac02

Runs ``mlx-dupq convert MODEL -o OUT --recipe RECIPE --force`` with the code of each ``--base`` commit
(exported with ``git archive`` into a scratch directory) and then with this checkout, one after the
other, each as a child process with ``PYTHONPATH`` set to its code. Records the seconds of every
group from the progress lines (each line is stamped when it arrives), the wall and CPU seconds of the
child (``getrusage``), the load average before and after; then the perplexity of both packs
(``mlx-dupq eval ppl PACK --data brown:eval --ctx 512 --windows 4``, this checkout's code) and how
many stored codes, scales and other tensors of each pack are identical to the first one's. The machine is shared: judge the wall
times by the load average and the CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlx_dupq._env import reexec_with_fast_blas  # noqa: E402

reexec_with_fast_blas()

import mlx.core as mx  # noqa: E402

from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.io.pack import load_weights, read_config  # noqa: E402
from mlx_dupq.quant.bitpack import unpack  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STEP = re.compile(r"^(quantizing \S+|writing config and tokenizer|calibration:)")


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def run_timed(cmd: list[str], code: Path, log: Path) -> dict:
    """Run ``cmd`` with ``PYTHONPATH=code``; per-step seconds from its progress lines, wall, CPU, load."""
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0, t0 = loadavg(), time.time()
    steps: list[tuple[str, float]] = []
    # cwd = the code: ``python -m`` puts the working directory first on sys.path
    with open(log, "w") as f, subprocess.Popen(cmd, env=env, cwd=code, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True, bufsize=1) as p:
        for line in p.stdout:
            f.write(f"{time.time() - t0:8.1f} {line}")
            m = STEP.match(line.strip())
            if m:
                steps.append((m.group(1), time.time() - t0))
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {p.returncode}); see {log}")
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    marks = steps + [("end", wall)]
    per_step = {name: round(marks[i + 1][1] - t, 1) for i, (name, t) in enumerate(steps)}
    layers = [v for k, v in per_step.items() if re.match(r"quantizing layer\.\d+$", k)]
    return {
        "wall_s": round(wall, 1),
        "cpu_user_s": round(after.ru_utime - before.ru_utime, 1),
        "cpu_sys_s": round(after.ru_stime - before.ru_stime, 1),
        "loadavg_before": load0,
        "loadavg_after": loadavg(),
        "setup_s": round(steps[0][1], 1) if steps else None,
        "layer_s_mean": round(sum(layers) / len(layers), 1) if layers else None,
        "layer_s_min": min(layers) if layers else None,
        "per_step_s": per_step,
    }


def ppl(pack: Path, args, log: Path) -> dict:
    out = log.with_suffix(".json")
    cmd = [sys.executable, "-m", "mlx_dupq.cli", "eval", "ppl", str(pack), "--data", args.data, "--ctx", str(args.ctx),
           "--windows", str(args.windows), "--json", str(out)]
    with open(log, "w") as f:
        subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                       check=True)
    return json.loads(out.read_text())


def compare(a: Path, b: Path) -> dict:
    """Identical codes (unpacked), scales/biases and other tensors of two packs of the same model."""
    ea, eb = read_config(a)["mlx_dupq"]["modules"], read_config(b)["mlx_dupq"]["modules"]
    if ea.keys() != eb.keys():
        return {"same_modules": False}
    wa, wb = load_weights(a), load_weights(b)
    total = same = 0
    params_equal, differing = True, []
    for path, entry in ea.items():
        # a module behind an online rotation stores its tensors under <path>.linear (io.pack.online_key)
        pick = lambda w: {s: w[f"{q}.{s}"] for q in (path, f"{path}.linear")  # noqa: E731
                          for s in ("weight", "scales", "biases") if f"{q}.{s}" in w}
        qa, qb = unpack(pick(wa), entry), unpack(pick(wb), eb[path])
        eq = mx.sum(qa.codes == qb.codes).item()
        total, same = total + qa.codes.size, same + eq
        params_equal &= mx.array_equal(qa.scales, qb.scales).item() and (
            qa.biases is None or mx.array_equal(qa.biases, qb.biases).item())
        differing.append((1 - eq / qa.codes.size, path))
    others = [k for k in wa if k.rsplit(".", 1)[0].removesuffix(".linear") not in ea]
    differing.sort(reverse=True)
    return {
        "same_modules": True,
        "codes": total,
        "codes_identical": same,
        "fraction_identical": same / total,
        "scales_and_biases_identical": bool(params_equal),
        "other_tensors_identical": all(k in wb and mx.array_equal(wa[k], wb[k]).item() for k in others),
        "most_changed_modules": [{"module": p, "fraction_differing": round(f, 6)} for f, p in differing[:5]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--recipe", default="w2-t3")
    ap.add_argument("--base", default="", help="commits to time first, comma-separated (git archive of their mlx_dupq/)")
    ap.add_argument("--data", default="brown:eval")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory for the packs and logs")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or ROOT / "bench" / "results" / f"convert_time_{args.model}_{args.recipe}.json"
    work = args.work or Path(tempfile.mkdtemp(prefix="convert_time_"))
    work.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    runs = []
    for base in filter(None, args.base.split(",")):
        code = work / f"code-{base}"
        code.mkdir(exist_ok=True)
        archive = subprocess.run(["git", "archive", base, "mlx_dupq"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
        runs.append((base, code))
    runs.append((head, ROOT))
    result = {"command": "python " + " ".join([f"bench/{Path(__file__).name}", *sys.argv[1:]]), "model": args.model,
              "recipe": args.recipe, "cpus": os.cpu_count(),
              "convert": f"mlx-dupq convert {args.model} -o OUT --recipe {args.recipe} --force",
              "eval": f"mlx-dupq eval ppl OUT --data {args.data} --ctx {args.ctx} --windows {args.windows}",
              "env": {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE") if k in os.environ},
              "runs": []}
    packs = []
    for label, code in runs:
        pack = work / f"pack-{label}"
        cmd = [sys.executable, "-m", "mlx_dupq.cli", "convert", args.model, "-o", str(pack), "--recipe", args.recipe,
               "--force"]
        print(f"convert with {label} ...", flush=True)
        row = {"code": label, **run_timed(cmd, code, work / f"convert-{label}.log")}
        cpu = row["cpu_user_s"] + row["cpu_sys_s"]
        print(f"  {row['wall_s']} s wall, {cpu:.0f} s CPU, layer mean {row['layer_s_mean']} s", flush=True)
        p = ppl(pack, args, work / f"ppl-{label}.log")
        row["ppl"], row["tokens"] = p.get("ppl"), p.get("tokens")
        print(f"  PPL {row['ppl']} on {row['tokens']} tokens", flush=True)
        result["runs"].append(row)
        packs.append(pack)
    for row, pack in zip(result["runs"][1:], packs[1:]):
        row["pack_vs_first"] = compare(packs[0], pack)
    write_result(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
