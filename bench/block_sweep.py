"""Several ``[refine.block]`` settings on the same real decoder layer: its held-out error before / after.

    python bench/block_sweep.py --model smollm2-135m --recipe smollm2-gptq-mixed-3.0 --layer model.layers.1 \
        --configs '[{"lr": 1e-3}, {"lr": 1e-4}, {"lr": 1e-3, "trainable": ["norms"]}]'

The recipe's conversion runs up to ``--layer`` (earlier layers quantized as the recipe says, not
trained), then every config is trained on that layer from the same initialisation and inputs
(each config starts from the recipe's quantized layer, not from the previous config's result; the
float-stream targets are the stage's own, the ``target = "quantized"`` ones the float layer on the
quantized stream), and
the conversion stops. Writes bench/results/block_sweep_<model>.json (rows of earlier runs with
another layer/recipe are kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from mlx_dupq._env import reexec_with_fast_blas  # noqa: E402

reexec_with_fast_blas()

import mlx.core as mx  # noqa: E402

from mlx_dupq.input_stats import run_layer  # noqa: E402
from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.config import load_recipe  # noqa: E402
from mlx_dupq.pipeline import convert  # noqa: E402
from mlx_dupq.refine import stage  # noqa: E402
from mlx_dupq.refine.spec import BlockSpec, RefineSpec  # noqa: E402


class _Done(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="smollm2-gptq-mixed-3.0")
    ap.add_argument("--layer", default="model.layers.1")
    ap.add_argument("--configs", required=True, help="JSON list of [refine.block] option tables")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dupq-block-sweep"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    configs = json.loads(args.configs)
    out = args.out or Path(__file__).parent / "results" / f"block_sweep_{args.model}.json"
    rows: list[dict] = []
    real = stage.refine_layer

    def sweep(layer, prefix, arrays, entries, x, y, spec, storage, wrapped, say, fixed=None):
        if prefix != args.layer:  # earlier layers: the recipe's quantization, untrained
            return real(layer, prefix, arrays, entries, x, y, dataclasses.replace(spec, steps=0), storage, wrapped, say,
                        fixed=fixed)
        saved = {k: v for k, v in layer.parameters().items()}
        y_quantized = run_layer(layer, x)  # the float layer on the quantized stream's input
        for c in configs:
            layer.update(saved)  # every config from the same float layer
            t, cpu = time.time(), time.process_time()
            spec = BlockSpec(**c)
            target = y if spec.target == "float" else y_quantized
            _, _, rep = real(layer, prefix, arrays, entries, x, target, spec, storage, wrapped, None, fixed=fixed)
            rows.append({"config": BlockSpec(**c).to_dict(), **rep.to_dict(), "wall_seconds": time.time() - t,
                         "cpu_seconds": time.process_time() - cpu})
            print(f"{c}: {rep.init_error:.4f} -> {rep.trained_error:.4f} ({time.time() - t:.0f}s)", flush=True)
        raise _Done

    stage.refine_layer = sweep
    rec = dataclasses.replace(load_recipe(args.recipe), refine=RefineSpec(block=BlockSpec(samples=None)))
    try:
        convert(args.model, args.work / args.model, rec, force=True)
    except _Done:
        pass
    mx.clear_cache()
    data = {"model": args.model, "runs": []}
    if out.exists():
        data = json.loads(out.read_text())
    key = {"recipe": args.recipe, "layer": args.layer}
    data["runs"] = [r for r in data["runs"] if {k: r[k] for k in key} != key]
    data["runs"].append({**key, "command": "python bench/block_sweep.py " + " ".join(sys.argv[1:]), "rows": rows})
    write_result(out, data)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
