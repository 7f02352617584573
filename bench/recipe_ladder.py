"""PPL and all-in bpw of one model under a list of recipes, in one run (issue 4's technique table).

    python bench/recipe_ladder.py --model smollm2-135m --recipes rtn2,gptq2,rot-rtn2,rot-gptq2 \
        --data brown:eval --ctx 512 --windows 8

Calibrated recipes read their calibration text from the recipe (``brown:calib`` in the shipped
ones), disjoint from the ``:eval`` text measured here. Each row records the conversion time.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from mlx_dupq._env import reexec_with_fast_blas  # noqa: E402

reexec_with_fast_blas()

import mlx.core as mx  # noqa: E402

from mlx_dupq.config import load_recipe  # noqa: E402
from mlx_dupq.eval.data import load_text  # noqa: E402
from mlx_dupq.eval.ppl import perplexity  # noqa: E402
from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.io.loader import load  # noqa: E402
from mlx_dupq.pipeline import convert  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default="rtn2,gptq2")
    ap.add_argument("--data", default="brown:eval")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dupq-ladder"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()
    out = args.out or Path(__file__).parent / "results" / f"ladder_{args.model}.json"
    text = load_text(args.data)
    result = {"command": "python bench/recipe_ladder.py " + " ".join(sys.argv[1:]), "model": args.model,
              "data": args.data, "ctx": args.ctx, "windows": args.windows, "rows": []}

    def save():
        write_result(out, result)

    if not args.no_reference:
        model, tok = load(args.model)
        r = perplexity(model, tok, text, ctx=args.ctx, windows=args.windows)
        result["rows"].append({"recipe": "reference (dequantized GGUF, fp32)", "bits_per_weight": 32.0, **r})
        del model
        save()
        print(f"reference: ppl {r['ppl']:.3f}", flush=True)
    for name in args.recipes.split(","):
        recipe = load_recipe(name)
        pack = args.work / f"{args.model}-{name}"
        t0 = time.time()
        res = convert(args.model, pack, recipe, force=True)
        convert_s = time.time() - t0
        model, tok = load(str(pack))
        r = perplexity(model, tok, text, ctx=args.ctx, windows=args.windows)
        del model
        mx.clear_cache()
        result["rows"].append({"recipe": name, "description": recipe.description, "recipe_dict": recipe.to_dict(),
                               "bits_per_weight": res.bits_per_weight, "convert_seconds": convert_s, **r})
        shutil.rmtree(pack, ignore_errors=True)
        save()
        print(f"{name}: bpw {res.bits_per_weight:.3f} ppl {r['ppl']:.3f} (convert {convert_s:.0f}s)", flush=True)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
