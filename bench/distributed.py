"""Pipeline-parallel speed and per-rank memory of one pack on 1, 2 and 3 localhost ranks.

usage: python bench/distributed.py PACK NAME [--ranks 1,2,3] [--prompt-tokens 128] [--gen-tokens 32]
                                   [--repeats 3]

Runs ``mlx.launch -n N --backend ring -- mlx-dupq bench PACK --pipeline ...`` for each N and
writes ``bench/results/distributed_NAME.json``: every run's tokens/s, TTFT and per-rank layers,
resident bytes and peak memory, the machine's load average, and the activation bytes sent per
token across each rank boundary (hidden size x 4 bytes in float32). All ranks run on this one
machine: they share its cores (and here other jobs ran at the same time), so the figures show the
cost of the split, not the speed of several machines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlx_dupq.io.atomic import write_result
from mlx_dupq.testing import free_base_port

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pack")
    ap.add_argument("name")
    ap.add_argument("--ranks", default="1,2,3")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        raise SystemExit("mlx.launch not found (it ships with mlx)")
    config = json.loads((Path(args.pack) / "config.json").read_text())
    hidden = int(config["hidden_size"])
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, args.ranks.split(",")):
            out = Path(tmp) / f"n{n}.json"
            cmd = [sys.executable, "-m", "mlx_dupq.cli", "bench", args.pack, "--pipeline",
                   "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
                   "--repeats", str(args.repeats), "--json", str(out)]
            if n > 1:  # one rank runs without the launcher
                cmd = [launcher, "-n", str(n), "--backend", "ring", "-p", str(free_base_port(n)), "--", *cmd]
            t0 = time.time()
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if r.returncode != 0 or not out.exists():  # (mlx.launch exits 0 even when a rank failed)
                raise SystemExit(f"{n} ranks failed:\n{r.stderr[-3000:]}")
            res = json.loads(out.read_text())["results"][0]
            res["wall_s"] = time.time() - t0
            print(f"{n} ranks: prompt {res['prompt_tps']:.1f} tok/s, generation {res['generation_tps']:.2f} tok/s, "
                  f"peak MiB per rank {[round(x['peak_memory_bytes'] / 2**20, 1) for x in res['per_rank']]}")
            runs.append(res)
    result = {
        "command": " ".join(["python", "bench/distributed.py", *sys.argv[1:]]),
        "pack": args.pack,
        "model": args.name,
        "hidden_size": hidden,
        "bytes_per_token_per_boundary": hidden * 4,
        "note": ("all ranks on one machine (localhost, ring backend over TCP), sharing its "
                 f"{os.cpu_count()} cores with each other and with other jobs that ran at the same time"),
        "runs": runs,
    }
    path = ROOT / "bench" / "results" / f"distributed_{args.name}.json"
    write_result(path, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
