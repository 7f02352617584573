"""First table: reference vs round-to-nearest at 8/4/3/2 bits x groups 32/64/128, ours and mlx-lm's.

For each setting the same run converts the model twice — with mlx-dupq (recipe: every linear
AND the embedding/lm_head at the same bits/group, which is what ``mlx_lm.convert -q`` does) and
with mlx-lm's own ``convert(quantize=True)`` — and evaluates both on the same held-out text
with the same protocol. bpw is all-in (every stored byte / float parameter count).

    python bench/rtn_table.py --model smollm2-135m --data brown:eval --ctx 512 --windows 16
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

from mlx_dupq.config import QuantSpec, Recipe  # noqa: E402
from mlx_dupq.pipeline import convert  # noqa: E402
from mlx_dupq.eval.data import load_text  # noqa: E402
from mlx_dupq.eval.ppl import perplexity  # noqa: E402
from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.io.loader import load  # noqa: E402
from mlx_dupq.io.source import open_source, write_hf_dir  # noqa: E402


def evaluate(path, text, ctx, windows) -> dict:
    model, tok = load(str(path))
    r = perplexity(model, tok, text, ctx=ctx, windows=windows)
    del model
    mx.clear_cache()
    return r


def mlx_lm_convert(float_dir: Path, out: Path, bits: int, group: int) -> None:
    from mlx_lm.convert import convert as mlx_convert

    shutil.rmtree(out, ignore_errors=True)
    mlx_convert(str(float_dir), str(out), quantize=True, q_bits=bits, q_group_size=group, dtype="float16")


def weight_bits(path: Path) -> int:
    """Bytes of tensor data in a directory's safetensors files (headers excluded), in bits."""
    total = 0
    for f in path.glob("*.safetensors"):
        total += sum(a.nbytes for a in mx.load(str(f)).values())
    return total * 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="brown:eval")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--bits", default="8,4,3,2")
    ap.add_argument("--groups", default="32,64,128")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dupq-bench"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(__file__).parent / "results" / f"rtn_{args.model}.json"
    work = args.work / args.model
    work.mkdir(parents=True, exist_ok=True)
    text = load_text(args.data)
    src = open_source(args.model)
    float_dir = work / "float"
    if not (float_dir / "config.json").exists():
        write_hf_dir(src, float_dir, dtype="float32")

    result = {
        "command": "python bench/rtn_table.py " + " ".join(sys.argv[1:]),
        "model": args.model, "data": args.data, "ctx": args.ctx, "windows": args.windows, "rows": [],
    }

    def save():
        write_result(out, result)

    t0 = time.time()
    ref = evaluate(float_dir, text, args.ctx, args.windows)
    ref_model, _ = load(str(float_dir))
    from mlx.utils import tree_flatten

    n_params = sum(v.size for _, v in tree_flatten(ref_model.parameters()))
    del ref_model
    result["n_params"] = n_params
    result["rows"].append({"method": "reference (dequantized GGUF, fp32)", "bits": 32, "group_size": None,
                           "bits_per_weight": 32.0, **ref, "seconds": time.time() - t0})
    save()
    print(f"reference ppl {ref['ppl']:.3f}", flush=True)
    for bits in [int(b) for b in args.bits.split(",")]:
        for group in [int(g) for g in args.groups.split(",")]:
            spec = QuantSpec(bits=bits, group_size=group)
            recipe = Recipe(name=f"rtn-all-{spec.label()}", default=spec, embed=spec, lm_head=spec)
            pack = work / f"dupq-{spec.label()}"
            t0 = time.time()
            res = convert(float_dir, pack, recipe, force=True)
            r = evaluate(pack, text, args.ctx, args.windows)
            result["rows"].append({"method": "mlx-dupq rtn", "bits": bits, "group_size": group,
                                   "bits_per_weight": res.bits_per_weight, **r, "seconds": time.time() - t0})
            shutil.rmtree(pack, ignore_errors=True)
            save()
            print(f"dupq   w{bits} g{group}: bpw {res.bits_per_weight:.3f} ppl {r['ppl']:.3f}", flush=True)

            mpath = work / f"mlxlm-w{bits}g{group}"
            t0 = time.time()
            mlx_lm_convert(float_dir, mpath, bits, group)
            r = evaluate(mpath, text, args.ctx, args.windows)
            bpw = weight_bits(mpath) / n_params
            result["rows"].append({"method": "mlx-lm convert -q", "bits": bits, "group_size": group,
                                   "bits_per_weight": bpw, **r, "seconds": time.time() - t0})
            shutil.rmtree(mpath, ignore_errors=True)
            save()
            print(f"mlx-lm w{bits} g{group}: bpw {bpw:.3f} ppl {r['ppl']:.3f}", flush=True)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
