"""GGUF export checked with llama.cpp: the pack's PPL beside the PPL llama.cpp gets from its export.

One pack (``convert MODEL --bits B --group-size G``, the default recipe: 8-bit g64 embeddings)
is exported three ways -- exact (``export --gguf``), exact with the 8-bit tensors as Q8_0
(``--fallback Q8_0``, lossy there) and re-quantized (``--requantize Q4_K``, lossy) -- and every
file is run by llama.cpp (llama-cpp-python) on the same token windows the pack is scored on
(the pack's tokenizer, :mod:`mlx_dupq.eval.ppl`'s protocol). Also recorded: llama.cpp on the
source GGUF beside mlx-dupq's float reference (the same weights: checks the harness), the
next-token logits of the exact export against the pack's on the first window, and whether
llama.cpp's tokenizer reads the eval text as the pack's does.

    python bench/gguf_export.py --model smollm2-135m --bits 4 --group-size 32 --data brown:eval --ctx 512 --windows 4

writes bench/results/gguf_export_<model>.json (packs and GGUFs go under --work, not the repo).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from importlib.metadata import version
from pathlib import Path


from mlx_dupq._env import reexec_with_fast_blas  # noqa: E402

reexec_with_fast_blas()

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_dupq.eval.data import load_text, tokenize  # noqa: E402
from mlx_dupq.eval.ppl import perplexity, windows_of  # noqa: E402
from mlx_dupq.export.gguf import export_gguf  # noqa: E402
from mlx_dupq.export.verify import llama_cpp_perplexity, open_llama, sequence_logits  # noqa: E402
from mlx_dupq.io.loader import load  # noqa: E402
from mlx_dupq.io.models import fetch  # noqa: E402
from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.io.pack import load_weights, pack_summary, read_config  # noqa: E402
from mlx_dupq.quant.bitpack import unpack  # noqa: E402
from mlx_dupq.pipeline import convert  # noqa: E402


def mlx_ppl(path, text, ctx, windows) -> dict:
    model, tok = load(str(path))
    r = perplexity(model, tok, text, ctx=ctx, windows=windows)
    del model
    gc.collect()
    mx.clear_cache()
    return r


def logits_check(pack: Path, gguf_path: Path, window: np.ndarray) -> dict:
    """llama.cpp's logits of the exact export vs the pack's (mlx) on one window."""
    model, _ = load(str(pack))
    want = np.array(model(mx.array(window[None]))[0].astype(mx.float32))
    del model
    llm = open_llama(gguf_path, len(window))
    got = sequence_logits(llm, [int(t) for t in window])
    llm.close()
    return {
        "positions": int(len(window)),
        "rel_err": float(np.linalg.norm(got - want) / np.linalg.norm(want)),
        "max_abs_diff": float(np.abs(got - want).max()),
        "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
    }


def tokenizer_check(pack: Path, gguf_path: Path, text: str) -> dict:
    """Does llama.cpp tokenize ``text`` as the pack's tokenizer does?"""
    _, tok = load(str(pack), lazy=True)
    ours = tokenize(tok, text).tolist()
    llm = open_llama(gguf_path, 64)
    add_bos = bool(ours) and tok.bos_token_id is not None and ours[0] == tok.bos_token_id
    theirs = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
    llm.close()
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if first is None and len(ours) != len(theirs):
        first = min(len(ours), len(theirs))
    return {"tokens_ours": len(ours), "tokens_llama_cpp": len(theirs), "identical": first is None,
            "first_difference": first}


def q8_0_fit(pack: Path) -> dict:
    """For each 8-bit tensor: the share of its groups whose zero is on the grid (``b = -k s``, k
    integer) with every code in int8 range after the shift -- the groups Q8_0 could hold exactly."""
    cfg = read_config(pack)
    weights = load_weights(pack)
    out = {}
    for path, e in cfg["mlx_dupq"]["modules"].items():
        if int(e["bits"]) != 8:
            continue
        qt = unpack({n: weights[f"{path}.{n}"] for n in ("weight", "scales", "biases") if f"{path}.{n}" in weights}, e)
        s, b = np.array(qt.scales.astype(mx.float32)), np.array(qt.offsets())
        codes = np.array(qt.codes).astype(np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            k = np.rint(-b / s)
        on_grid = (-k * s) == b
        shifted = codes.reshape(*s.shape, -1) - k[..., None]
        in_range = ((shifted >= -128) & (shifted <= 127)).all(-1)
        out[path] = {"groups": int(s.size), "zero_on_grid": float(on_grid.mean()),
                     "q8_0_exact": float((on_grid & in_range).mean())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--data", default="brown:eval")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--requantize", default="Q4_K")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "mlx_dupq" / "bench" / "gguf_export")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(__file__).resolve().parent / "results" / f"gguf_export_{args.model}.json"
    work = args.work / args.model
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    source = fetch(args.model)
    text = load_text(args.data)
    pack = work / f"w{args.bits}g{args.group_size}"
    convert(args.model, pack, bits=args.bits, group_size=args.group_size, force=True)
    _, tok = load(str(pack), lazy=True)
    wins = windows_of(tokenize(tok, text), args.ctx, args.windows)

    rows = {}
    print("pack (mlx) ...", flush=True)
    rows["pack"] = {"engine": "mlx-dupq", "bits_per_weight": pack_summary(pack)["bits_per_weight"],
                    **mlx_ppl(pack, text, args.ctx, args.windows)}
    exports = {
        "gguf_exact": dict(),
        "gguf_fallback_q8_0": dict(fallback="Q8_0"),
        f"gguf_requantize_{args.requantize.lower()}": dict(requantize=args.requantize),
    }
    for name, kw in exports.items():
        path = work / f"{name}.gguf"
        res = export_gguf(pack, path, force=True, **kw)
        print(f"{name}: {res.type_counts()} ...", flush=True)
        rows[name] = {"engine": "llama.cpp", "export": {k: v for k, v in kw.items()}, "exact": res.exact,
                      "types": res.type_counts(), "bits_per_weight": res.bits_per_weight,
                      "file_bytes": path.stat().st_size, **llama_cpp_perplexity(path, wins)}
    print("reference ...", flush=True)
    rows["reference_mlx"] = {"engine": "mlx-dupq", "model": str(source), **mlx_ppl(args.model, text, args.ctx, args.windows)}
    rows["reference_llama_cpp"] = {"engine": "llama.cpp", "model": str(source), **llama_cpp_perplexity(source, wins)}
    for r in rows.values():
        r["ppl_vs_pack"] = r["ppl"] / rows["pack"]["ppl"] - 1
    checks = {
        "logits_exact_vs_pack_first_window": logits_check(pack, work / "gguf_exact.gguf", wins[0]),
        "tokenizer": tokenizer_check(pack, work / "gguf_exact.gguf", text),
        "q8_0_fit_of_8_bit_tensors": q8_0_fit(pack),
    }
    result = {
        "command": " ".join(["python bench/gguf_export.py", *sys.argv[1:]]),
        "model": args.model, "bits": args.bits, "group_size": args.group_size, "data": args.data,
        "ctx": args.ctx, "windows": int(len(wins)), "tokens": int(len(wins) * (args.ctx - 1)),
        "llama_cpp_python": version("llama-cpp-python"),
        "rows": rows, "checks": checks, "seconds": time.time() - t0,
    }
    write_result(out, result)
    for name, r in rows.items():
        print(f"{name:28s} {r['engine']:10s} PPL {r['ppl']:9.4f}  ({100 * r['ppl_vs_pack']:+.2f}% vs pack)")
    print(checks)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
