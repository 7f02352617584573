"""How much do the input embedding and the output head cost at low bits, alone? (sizes the w2 recipe)

    python bench/head_sensitivity.py --model qwen2.5-coder-0.5b --windows 4

Starting from the float reference, only one tensor is quantized (then dequantized in place) and the
perplexity measured: the embedding or lm_head with MSE scale search at 2/3 bits, and lm_head with
GPTQ against the Hessian of the final normed hidden states of ``--calib-samples`` x ``--calib-len``
calibration tokens — what ``quantizer.calib_head`` does inside ``convert``. Needs an untied lm_head.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mlx_dupq._env import reexec_with_fast_blas  # noqa: E402

reexec_with_fast_blas()

import mlx.core as mx  # noqa: E402

from mlx_dupq.config import QuantSpec, parse_bits  # noqa: E402
from mlx_dupq.eval.data import calibration_batches, load_text  # noqa: E402
from mlx_dupq.eval.ppl import perplexity  # noqa: E402
from mlx_dupq.io.loader import load  # noqa: E402
from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.quant.gptq import HessianAccumulator, gptq_quantize  # noqa: E402
from mlx_dupq.quant.qtensor import dequantize  # noqa: E402
from mlx_dupq.quant.scales import mse_scale_search  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--data", default="brown:eval")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--calib", default="brown:calib")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--specs", default="2:128,3:128",
                    help="bits:group[:sym] specs to try; bits may be 'ternary' (e.g. ternary:128:sym)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(__file__).parent / "results" / f"head_sensitivity_{args.model}.json"
    model, tok = load(args.model)
    if not hasattr(model, "lm_head"):
        raise SystemExit(f"{args.model} has a tied embedding (no separate lm_head); use a model with an lm_head")
    text = load_text(args.data)
    specs = [parse_spec(s) for s in args.specs.split(",")]
    setup = {"model": args.model, "data": args.data, "ctx": args.ctx, "windows": args.windows, "calib": args.calib,
             "calib_samples": args.calib_samples, "calib_len": args.calib_len}
    result = {"commands": [], **setup, "rows": []}
    if out.exists():  # a rerun with other specs adds rows to the same measurement setup
        old = json.loads(out.read_text())
        if any(old.get(k) != v for k, v in setup.items()):
            raise SystemExit(f"{out} was measured with another setup; pass --out for a new file")
        result["rows"] = old["rows"]
        result["commands"] = old.get("commands") or [old["command"]]
    result["commands"].append("python bench/head_sensitivity.py " + " ".join(sys.argv[1:]))
    done = {_key(r) for r in result["rows"]}

    def measure(row: dict) -> None:
        if _key(row) in done:
            return
        t = time.time()
        r = perplexity(model, tok, text, ctx=args.ctx, windows=args.windows)
        result["rows"].append({**row, "ppl": r["ppl"], "tokens": r["tokens"], "seconds": time.time() - t})
        write_result(out, result)
        print(result["rows"][-1], flush=True)

    measure({"module": "none (reference)", "method": "-", "bits": 32, "group_size": None})
    if all(_key({"module": n, "method": m, "bits": float(sp.bits), "group_size": sp.group_size,
                 "symmetric": sp.symmetric}) in done for sp in specs
           for n, m in (("embed_tokens", "mse"), ("lm_head", "mse"), ("lm_head", "gptq (final hidden states)"))):
        print(f"-> {out} (every row already measured)")
        return
    calib = calibration_batches(tok, load_text(args.calib), args.calib_samples, args.calib_len, seed=0)
    acc = None
    for i in range(calib.shape[0]):
        h = model.model(calib[i : i + 1])  # the final norm's output: what lm_head reads
        acc = acc or HessianAccumulator(h.shape[-1])
        acc.add(h)
    hessian = acc.finalize()
    for name, mod in (("embed_tokens", model.model.embed_tokens), ("lm_head", model.lm_head)):
        w0 = mod.weight
        for spec in specs:
            tag = {"bits": float(spec.bits), "group_size": spec.group_size, "symmetric": spec.symmetric}
            if _key({"module": name, "method": "mse", **tag}) not in done:
                mod.weight = dequantize(mse_scale_search(w0, spec, dtype=mx.float16)).astype(mx.float32)
                measure({"module": name, "method": "mse", **tag})
            if name == "lm_head" and _key({"module": name, "method": "gptq (final hidden states)", **tag}) not in done:
                qt = gptq_quantize(w0, hessian, spec, mx.float16, damp=0.01, act_order=True, block_size=128)
                mod.weight = dequantize(qt).astype(mx.float32)
                measure({"module": name, "method": "gptq (final hidden states)", **tag})
        mod.weight = w0
    print(f"-> {out}")


def parse_spec(text: str) -> QuantSpec:
    """``bits:group[:sym]`` -> QuantSpec; bits may be ``ternary`` / ``1.58``."""
    parts = text.strip().split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("sym", "asym")):
        raise SystemExit(f"--specs entry {text!r} is not bits:group[:sym], e.g. 2:128 or ternary:128:sym")
    return QuantSpec(bits=parse_bits(parts[0]), group_size=int(parts[1]), symmetric=len(parts) == 3 and parts[2] == "sym")


def _key(row: dict) -> tuple:
    """What identifies a measured row (old rows have integer bits and no ``symmetric``: asymmetric)."""
    bits = row.get("bits")
    return (row["module"], row["method"], None if bits is None else float(bits), row.get("group_size"),
            bool(row.get("symmetric", False)))


if __name__ == "__main__":
    main()
