"""End-to-end distillation (``mlx-dupq refine``) vs mlx-lm's DWQ on the same model and tokens.

    python bench/e2e_distill.py --model smollm2-135m --pack /tmp/e2e_bench/gptq2-e2 \
        --steps 40 --samples 32 --seq-len 256 --batch 4 --lr 1e-4

Rows (``bench/results/e2e_<model>.json``): the float reference; our pack before and after
``distill_pack``; mlx-lm's own 2-bit quantization (``quantize_model``, g64, fp16 scales) before and
after mlx-lm's ``dwq_quantize`` (imported, run as mlx-lm ships it: full-vocabulary teacher, its
temperature 2, its trainable set = scales, biases and every unquantized parameter) with the same
calibration windows (``calibration_windows`` of the same text, seed and sizes), the same number of
steps, batch and learning rate. Each row: all-in bits per weight (stored bytes x 8 / float
parameters), PPL on ``brown:eval`` and ``code:eval`` (ctx, windows, scored tokens recorded), the
stage's wall time and the peak RSS of the process that ran it (each stage runs in its own process;
the mlx-lm rows share one). Calibration text is a ``:calib`` set, never an evaluated one.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


from mlx_dupq._env import machine_record, reexec_with_fast_blas  # noqa: E402

reexec_with_fast_blas()

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.quant.dwq import dwq_quantize  # noqa: E402
from mlx_lm.utils import quantize_model  # noqa: E402

from mlx_dupq.eval.data import load_text, tokenize  # noqa: E402
from mlx_dupq.eval.ppl import perplexity  # noqa: E402
from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.io import pack as packio  # noqa: E402
from mlx_dupq.io.loader import load, load_model  # noqa: E402
from mlx_dupq.layers.cpu import use_dense_prefill  # noqa: E402
from mlx_dupq.refine.e2e import calibration_windows, distill_pack  # noqa: E402
from mlx_dupq.refine.e2e_spec import E2ESpec  # noqa: E402

EVAL_SETS = ("brown:eval", "code:eval")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ppl_cols(model, tok, ctx: int, windows: int) -> dict:
    row = {}
    for name in EVAL_SETS:
        r = perplexity(model, tok, load_text(name), ctx=ctx, windows=windows)
        key = name.split(":")[0]
        row[f"ppl_{key}"] = r["ppl"]
        row[f"tokens_{key}"] = r["tokens"]
    return row


def spec_of(args) -> E2ESpec:
    return E2ESpec(steps=args.steps, lr=args.lr, samples=args.samples, valid_samples=args.valid_samples,
                   seq_len=args.seq_len, batch=args.batch, trainable=args.trainable, data=args.data,
                   eval_every=args.eval_every, patience=args.patience, top_k=args.top_k, seed=args.seed)


def stage_reference(args) -> list[dict]:
    t0 = time.perf_counter()
    model, tok = load(args.model)
    row = {"name": "reference (float32)", "bits_per_weight": 32.0, **ppl_cols(model, tok, args.ctx, args.windows)}
    return [{**row, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}]


def stage_ours(args) -> list[dict]:
    pack = Path(args.pack)
    bpw = packio.pack_summary(pack)["bits_per_weight"]
    model, tok = load(pack)
    before = {"name": f"mlx-dupq {pack.name}", "bits_per_weight": bpw, **ppl_cols(model, tok, args.ctx, args.windows)}
    del model
    out = Path(args.work) / f"{pack.name}-e2e"
    t0 = time.perf_counter()
    log = lambda phase, done, total, info: print(phase, done, total, info, file=sys.stderr, flush=True)  # noqa: E731
    res = distill_pack(pack, args.model, spec_of(args), out=out, progress=log, resume=args.resume)
    secs = time.perf_counter() - t0
    model, tok = load(out)
    after = {"name": f"mlx-dupq {pack.name} + refine (e2e)", "bits_per_weight": packio.pack_summary(out)["bits_per_weight"],
             **ppl_cols(model, tok, args.ctx, args.windows), "seconds": secs, "refine": res.to_dict()}
    rss = peak_rss_mb()
    return [{**before, "peak_rss_mb": rss}, {**after, "peak_rss_mb": rss}]


def stage_dwq(args) -> list[dict]:
    spec = spec_of(args)
    teacher, config, _ = load_model(args.model)
    n_params = sum(v.size for _, v in tree_flatten(teacher.parameters()))
    q, _, _ = load_model(args.model, compute_dtype="float16")
    quantize_model(q, dict(config), group_size=64, bits=2)
    mx.eval(q.parameters())
    bpw = sum(v.nbytes for _, v in tree_flatten(q.parameters())) * 8 / n_params
    packio.cast_floats(q, mx.float32)
    use_dense_prefill(q)
    _, tok = load(args.model, lazy=True)
    before = {"name": "mlx-lm 2-bit g64 (quantize_model)", "bits_per_weight": bpw, **ppl_cols(q, tok, args.ctx, args.windows)}
    ids = tokenize(tok, load_text(spec.data))
    train_w, valid_w = calibration_windows(ids, spec)
    epochs = -(-spec.steps * spec.batch // len(train_w))  # dwq runs one pass: repeat the windows
    train = [(list(map(int, w)), 0) for w in train_w] * epochs
    train = train[: spec.steps * spec.batch]
    valid = [(list(map(int, w)), 0) for w in valid_w]
    t0 = time.perf_counter()
    opt = optim.Adam(learning_rate=spec.lr, bias_correction=True)
    dwq_quantize(q, lambda batch, i, split: teacher(batch), opt, train, valid, batch_size=spec.batch,
                 max_seq_length=spec.seq_len + 1, seed=spec.seed, dtype=mx.float32)
    secs = time.perf_counter() - t0
    packio.cast_floats(q, mx.float16)  # the stored precision of the trained scales/biases/norms
    packio.cast_floats(q, mx.float32)
    after = {"name": "mlx-lm 2-bit g64 + DWQ (mlx_lm.quant.dwq)", "bits_per_weight": bpw,
             **ppl_cols(q, tok, args.ctx, args.windows), "seconds": secs,
             "dwq": {"steps": len(train) // spec.batch, "lr": spec.lr, "temperature": 2.0, "loss": "full-vocabulary KL"}}
    rss = peak_rss_mb()
    return [{**before, "peak_rss_mb": rss}, {**after, "peak_rss_mb": rss}]


STAGES = {"reference": stage_reference, "ours": stage_ours, "dwq": stage_dwq}


def table(paths: list[Path]) -> str:
    """Markdown table of the rows of result files (``--table``), in file order."""
    lines = ["| row | bpw | PPL brown:eval | PPL code:eval | wall s | peak RSS MB |", "|---|---:|---:|---:|---:|---:|"]
    for p in paths:
        for r in json.loads(p.read_text())["rows"]:
            secs = f"{r['seconds']:.0f}" if "seconds" in r else "-"
            lines.append(f"| {r['name']} | {r['bits_per_weight']:.3f} | {r['ppl_brown']:,.1f} | {r['ppl_code']:,.1f} "
                         f"| {secs} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pack", default=None, help="Our pack to refine (converted from --model).")
    ap.add_argument("--stages", default="reference,ours,dwq")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: run one stage, print its rows
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--valid-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=256)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trainable", default="scales,biases,norms")
    ap.add_argument("--data", default="mix:calib")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--work", default="/tmp/e2e_bench")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, nargs="+", default=None, help="Print result files as a markdown table.")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.stage:
        rows = [{**r, "machine": machine_record()} for r in STAGES[args.stage](args)]
        print("ROWS " + json.dumps(rows), flush=True)
        return
    out = args.out or Path(__file__).parent / "results" / f"e2e_{args.model}.json"
    result = {"command": "python bench/e2e_distill.py " + " ".join(sys.argv[1:]), "model": args.model,
              "eval": {"sets": list(EVAL_SETS), "ctx": args.ctx, "windows": args.windows},
              "e2e": spec_of(args).to_dict(), "rows": []}
    if out.exists():  # keep finished stages (a rerun continues)
        old = json.loads(out.read_text())
        if old.get("command") == result["command"]:
            result = old
    for stage in args.stages.split(","):
        if any(r.get("stage") == stage for r in result["rows"]):
            continue
        argv = [sys.executable, __file__, *sys.argv[1:], "--stage", stage]
        p = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
        lines = [x for x in p.stdout.splitlines() if x.startswith("ROWS ")]
        if p.returncode or not lines:
            sys.exit(f"stage {stage} failed (exit {p.returncode}); the rows so far are in {out}")
        result["rows"] += [{"stage": stage, **r} for r in json.loads(lines[-1][5:])]
        write_result(out, result)
        print(f"{stage}: done", flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
