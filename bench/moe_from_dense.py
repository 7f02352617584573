"""Quality of the MoE cut from SmolLM2-135M (``smollm2-135m-moe``, mlx_dupq/moe/from_dense.py).

    python bench/moe_from_dense.py                        # build if needed, evaluate -> moe_smollm2_build.json
    python bench/moe_from_dense.py --ks 2,4,6,9,18 --windows 8
    python bench/moe_from_dense.py --build /tmp/smollm2-135m-moe   # the same recipe built into a directory

The build record (``result.json`` beside the cached model) brings wall and CPU seconds and the load
average of the build. Perplexity on brown:eval (non-overlapping windows of --ctx tokens, the first --windows of them,
float32 on the CPU) of the dense model, of the MoE at each top-k (the router's choice, mlx-lm's
DeepSeek gate), with the routed experts dropped (shared experts only) and with k experts drawn at
random (router scores kept: what the router's choice is worth). Each row is written as soon as
it is measured (a rerun with the same settings skips the rows already there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


from mlx_dupq._env import reexec_with_fast_blas  # noqa: E402

reexec_with_fast_blas()

from mlx_dupq.eval.data import load_text  # noqa: E402
from mlx_dupq.eval.ppl import perplexity  # noqa: E402
from mlx_dupq.io import models  # noqa: E402
from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.io.loader import load  # noqa: E402
from mlx_dupq.moe import from_dense as F  # noqa: E402
from mlx_dupq.moe import routing as R  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-moe", help="named built model or a directory")
    ap.add_argument("--dense", default="smollm2-135m")
    ap.add_argument("--ks", default="2,4,6,9,12,18")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--build", metavar="DIR", help="build the named model's recipe into DIR (and DIR.json) unless "
                    "DIR exists, then evaluate DIR (what `models fetch` does, outside the cache)")
    ap.add_argument("--skip-random", action="store_true", help="leave out the random-experts row")
    ap.add_argument("--out", default=str(RESULTS / "moe_smollm2_build.json"))
    args = ap.parse_args()
    out = Path(args.out)
    settings = {"data": "brown:eval", "ctx": args.ctx, "windows": args.windows}
    old = json.loads(out.read_text()) if out.exists() else {}
    rows = old.get("rows", []) if old.get("settings") == settings else []
    done = {r["name"] for r in rows}

    if args.build:
        if not Path(args.build).exists():
            log(f"build {args.build}")
            res = F.build(args.build, F.SMOLLM2_135M_MOE, progress=lambda d, t, m: log(f"{d}/{t} {m}"))
            write_result(args.build + ".json", res)  # the build's record: its seconds and machine
        args.model = args.build
    path = Path(args.model) if Path(args.model).exists() else models.fetch(args.model)
    build = path.parent / "result.json" if not Path(args.model).exists() else Path(str(path) + ".json")
    info = json.loads(build.read_text()) if build.exists() else {}
    text = load_text("brown:eval")

    def save():
        data = {"settings": settings, "model": "smollm2-135m-moe" if args.build else args.model, "path": str(path),
                "dense": args.dense,
                "command": "python bench/moe_from_dense.py " + " ".join(sys.argv[1:]),
                "build": {k: info[k] for k in ("config", "model_config", "calib_tokens", "seconds", "split_seconds",
                                                 "cpu_seconds", "loadavg", "finetune", "layers", "machine")
                          if k in info},
                "rows": rows}
        write_result(out, data)

    def measure(name: str, model, tok, **knobs) -> None:
        if name in done:
            return
        log(name)
        if knobs:
            R.install(model, R.Routing(**knobs))
        try:
            r = perplexity(model, tok, text, ctx=args.ctx, windows=args.windows)
        finally:
            if knobs:
                R.install(model, R.Routing())
        rows.append({"name": name, **knobs, "ppl": r["ppl"], "tokens": r["tokens"], "seconds": round(r["seconds"], 1),
                     "loadavg": [round(v, 2) for v in os.getloadavg()]})
        log(f"{name}: ppl {r['ppl']:.3f} ({r['tokens']} tokens)")
        save()

    dense, tok = load(args.dense)
    measure("dense", dense, tok)
    del dense
    moe, tok = load(path)
    blocks = R.install(moe)
    E, K = blocks[0].num_experts, blocks[0].k
    measure(f"moe top-{K} of {E}", moe, tok, k=K)  # the model as configured, then what its experts carry
    measure("routed experts dropped (shared only)", moe, tok, drop_routed=True)
    for k in [int(k) for k in args.ks.split(",") if k.strip()]:
        if 1 <= k <= E and k != K:
            measure(f"moe top-{k} of {E}", moe, tok, k=k)
    if not args.skip_random:
        measure(f"{K} random experts (router scores kept)", moe, tok, random_experts=0)
    rows.sort(key=lambda r: (r["name"] != "dense", r.get("drop_routed", False), "random" in r["name"], r.get("k", 0)))
    save()
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
