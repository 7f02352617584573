"""The layer-duplication experiments of the dense seed (issue 5, SPEC F9), each with an equal-bits control.

    python bench/dup_experiments.py --model qwen2.5-coder-0.5b --windows 4 --tables ladder,strategies,count,modes,full
    python bench/dup_experiments.py --model smollm2-135m --windows 8 --tables ladder,modes,count,eps,scaling,groups,act,score
    python bench/dup_experiments.py --model qwen2.5-coder-0.5b --windows 4 --base-bits 3 --tables ladder,count,eps,mix,scaling,groups

Every row is built in memory from the float model with the same machinery a pack uses
(:func:`mlx_dupq.dup.runtime.duplicate_linears` for parallel / residual copies,
:func:`~mlx_dupq.dup.runtime.duplicate_layers` for serial copies; every decoder linear, duplicated
or not, goes through the copy engine's RTN, embedding and lm_head 8-bit g64 as in the shipped
recipes), so no conversion is written to disk. Each row records:

- ``bits_per_weight``: all-in, every stored array (codes, fp16 scales/biases, fp16 norms and
  biases) over the float model's parameter count, each copy's bytes included, shared codes once
  -- the definition of the pack's bpw (``tests/test_dup_convert.py`` checks a pack's);
- ``ppl`` on held-out ``brown:eval`` windows (the plan's scores come from ``brown:calib``);
- ``decode_tps`` (``mlx_dupq.eval.speed.bench_speed``, 32 prompt + 16 generated tokens) and
  ``latency_ratio`` = decode time per token / that of the plain 2-bit row of the same model and
  run (the shared CPU makes these noisy; compare within one results file).

Every duplication row has an ``equal-bits control``: the same planned layers stored once at the
highest-precision RTN spec (bits in 3/4/5/6/8, groups 32/64/128) whose bits per weight do not
exceed those layers' copies together (:func:`control_spec`). The seed's layer counts (of a
64-layer model) are scaled to the model's depth. Results: ``bench/results/dup_<model>.json``
(rows are appended as they finish; a rerun skips rows already there).
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

from mlx_dupq.config import QuantSpec  # noqa: E402
from mlx_dupq.dup.scores import layer_scores, measured_truth, spearman  # noqa: E402
from mlx_dupq.dup.specs import CopySpec, DupPlan  # noqa: E402
from mlx_dupq.layers.cpu import use_dense_prefill  # noqa: E402
from mlx_dupq.dup.study import (  # noqa: E402
    BASE,
    EMBED,
    Bench,
    control_plan,
    copies_of,
    last,
    scaled,
)
from mlx_dupq.io.atomic import write_result  # noqa: E402


def table_rows(table: str, n: int, ranked: list[int] | None, base: QuantSpec = BASE, counts=(2, 3, 4, 5, 6),
               ladder=("8-bit", "4-bit", "2-bit", "rot"), modes=("parallel", "residual", "serial", "serial-all"),
               eps_values=(0.0, 0.01, 0.05, 0.1, 0.5)) -> list[tuple[str, DupPlan | None, QuantSpec]]:
    """(label, plan, base spec) of each row of a table; ``ranked`` = layers by score, best first."""
    a_n = scaled(n, 20)
    par2 = copies_of(2)
    rows: list[tuple[str, DupPlan | None, QuantSpec]] = []
    if table == "ladder":
        rot = {k: [CopySpec(rotation={"kind": "block_hadamard", "seed": 0})] for k in range(n)}
        rows = [("8-bit g64", None, QuantSpec(bits=8, group_size=64)), ("4-bit g64", None, QuantSpec(bits=4, group_size=64)),
                ("2-bit g64", None, QuantSpec(bits=2, group_size=64)),
                (f"{base.bits}-bit g64 + rotation (block Hadamard per linear)",
                                            DupPlan(mode="parallel", copies=rot), base)]
        rows = [r for r, key in zip(rows, ("8-bit", "4-bit", "2-bit", "rot")) if key in ladder]
    elif table == "strategies":
        mid = scaled(n, 24)
        b = {k: copies_of(2) for k in range(n - a_n - mid, n - a_n)} | {k: copies_of(3) for k in range(n - a_n, n)}
        rows = [(f"A: last {a_n} layers x2", last(n, a_n, par2), base),
                (f"B: middle {mid} x2, last {a_n} x3", DupPlan(mode="parallel", copies=b), base),
                (f"C: top {scaled(n, 10)} by score x4", DupPlan(mode="parallel", copies={k: copies_of(4) for k in ranked[:scaled(n, 10)]}), base)]
    elif table == "count":
        rows = [(f"last {a_n} layers x{c}", last(n, a_n, copies_of(c)), base) for c in counts]
    elif table == "modes":
        rows = [(f"last {a_n} layers x2 {m}", last(n, a_n, par2 if m == "parallel" else [CopySpec()] * 2, m), base)
                for m in ("parallel", "residual", "serial") if m in modes]
        if "serial-all" in modes:
            rows.append((f"all {n} layers x2 serial (seed 'every layer x1')", last(n, n, [CopySpec()] * 2, "serial"), base))
    elif table == "full":
        top = sorted(ranked[: max(1, round(0.5 * n))])
        rot2 = [CopySpec(), CopySpec(rotation={"kind": "perturbed", "seed": 1, "eps": 0.05})]
        rows = [(f"full: top 50% by score, residual x2 (copy 2 rotated H.P eps 0.05)",
                 DupPlan(mode="residual", copies={k: rot2 for k in top}), base),
                (f"full: top 50% by score, parallel x3 (scale 1/1.05/0.95)",
                 DupPlan(mode="parallel", copies={k: copies_of(3) for k in top}), base)]
    elif table == "eps":
        for eps in eps_values:
            cs = [CopySpec(rotation={"kind": "perturbed", "seed": 0, "eps": 0.0}),
                  CopySpec(rotation={"kind": "perturbed", "seed": 0, "eps": eps})]
            rows.append((f"last {a_n} x2 parallel, rotations H / H.P eps {eps}", last(n, a_n, cs), base))
        cs = [CopySpec(rotation={"kind": "block_hadamard", "seed": 0}), CopySpec(rotation={"kind": "block_hadamard", "seed": 7})]
        rows.append((f"last {a_n} x2 parallel, two unrelated Hadamards (seeds 0/7)", last(n, a_n, cs), base))
    elif table == "scaling":
        rows = [
            (f"last {a_n} x2 shared codes, same scale", last(n, a_n, [CopySpec(), CopySpec(shared_codes=True)]), base),
            (f"last {a_n} x3 shared codes, scale 1/1.05/0.95",
             last(n, a_n, [CopySpec(), CopySpec(scale_mult=1.05, shared_codes=True), CopySpec(scale_mult=0.95, shared_codes=True)]), base),
            (f"last {a_n} x3 own codes, scale 1/1.05/0.95", last(n, a_n, copies_of(3, "scale")), base),
            (f"last {a_n} x3 own codes, grid offset 0/0.25/0.5", last(n, a_n, copies_of(3, "offset")), base),
            # the seed's "quantile adjustment": group ranges from the 0.99 / 0.995 / 0.98 quantiles
            (f"last {a_n} x3 shared codes, quantile scales 0.99/0.995/0.98",
             last(n, a_n, [CopySpec(quantile=0.99), CopySpec(quantile=0.995, shared_codes=True),
                           CopySpec(quantile=0.98, shared_codes=True)]), base),
            (f"last {a_n} x3 own codes, quantile scales 0.99/0.995/0.98",
             last(n, a_n, [CopySpec(quantile=0.99), CopySpec(quantile=0.995), CopySpec(quantile=0.98)]), base),
        ]
    elif table == "mix":
        # the seed's aggregations, fitted on calibration inputs of the float model (dup.aggregate.fit_mix)
        for agg in ("mean", "variance_weighted", "learned", "selective"):
            rows.append((f"last {a_n} x3 parallel (scale 1/1.05/0.95), {agg}",
                         DupPlan(mode="parallel", aggregation=agg,
                                 copies={k: copies_of(3) for k in range(n - a_n, n)}), base))
    elif table == "groups":
        def g(gs):
            return [CopySpec(quant=QuantSpec(bits=base.bits, group_size=x)) for x in gs]
        rows = [(f"last {a_n} x2 groups 128/128 (scale 1/1.05)",
                 last(n, a_n, g((128,)) + [CopySpec(quant=QuantSpec(bits=base.bits, group_size=128), scale_mult=1.05)]), base),
                (f"last {a_n} x2 groups 64/128", last(n, a_n, g((64, 128))), base),
                (f"last {a_n} x2 groups 128/256", last(n, a_n, g((128, 256))), base),
                (f"last {a_n} x3 groups 128/64/256", last(n, a_n, g((128, 64, 256))), base)]
    elif table == "act":
        def a(*specs):
            return [CopySpec(scale_mult=m, act_bits=b, act_clip=c, quant=q) for m, b, c, q in specs]
        asym, sym = QuantSpec(bits=base.bits, group_size=64), QuantSpec(bits=base.bits, group_size=64, symmetric=True)
        rows = [(f"last {a_n} x2, both a8", last(n, a_n, a((1.0, 8, None, None), (1.05, 8, None, None))), base),
                (f"last {a_n} x2, a8 clip 0.90/0.95", last(n, a_n, a((1.0, 8, 0.9, None), (1.05, 8, 0.95, None))), base),
                (f"last {a_n} x2, a8 / a6", last(n, a_n, a((1.0, 8, None, None), (1.05, 6, None, None))), base)]
    else:
        raise SystemExit(f"unknown table {table!r}")
    return rows


# ------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tables", default="ladder,strategies,count,modes,full")
    ap.add_argument("--data", default="brown:eval")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--truth-windows", type=int, default=4, help="calibration windows (256 tokens) for the per-layer truth")
    ap.add_argument("--base-bits", type=int, default=2, help="bits of the RTN base (g64) that copies build on")
    ap.add_argument("--copies", default="2,3,4,5,6", help="total copies per layer in the count table")
    ap.add_argument("--ladder", default="8-bit,4-bit,2-bit,rot", help="ladder rows")
    ap.add_argument("--modes", default="parallel,residual,serial,serial-all", help="rows of the modes table")
    ap.add_argument("--eps", default="0,0.01,0.05,0.1,0.5", help="perturbation strengths of the eps table")
    ap.add_argument("--no-controls", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    base = QuantSpec(bits=args.base_bits, group_size=64, symmetric=False)
    base_label = f"{args.base_bits}-bit g64"
    suffix = "" if args.base_bits == 2 else f"-base{args.base_bits}"
    out = args.out or Path(__file__).parent / "results" / f"dup_{args.model}{suffix}.json"
    result = {"rows": []}
    if out.exists():
        result = json.loads(out.read_text())
    command = "python bench/dup_experiments.py " + " ".join(sys.argv[1:])
    commands = result.get("commands") or ([result["command"]] if "command" in result else [])
    result.update(command=command, commands=commands + ([command] if command not in commands else []), model=args.model,
                  data=args.data, ctx=args.ctx, windows=args.windows, base=base.to_dict(), embed=EMBED.to_dict())
    done = {(r["table"], r["label"]) for r in result["rows"]}
    memo = {r["key"]: r for r in result["rows"] if "key" in r}  # identical builds are measured once

    def save():
        write_result(out, result)

    bench = Bench(args.model, args.data, args.ctx, args.windows)
    n = bench.n_layers
    result["n_layers"] = n
    tables = args.tables.split(",")
    ranked = None
    if any(t in ("strategies", "full", "score") for t in tables):
        if "scores" not in result:
            t0 = time.time()
            sc = layer_scores(bench.fresh(), bench.calib, base)
            result["scores"] = [s.to_dict() for s in sc]
            result["scores_seconds"] = time.time() - t0
            save()
        vals = [s["score"] for s in result["scores"]]
        ranked = sorted(range(n), key=lambda k: (-vals[k], -k))
        result["ranked_by_score"] = ranked

    def run(table: str, label: str, plan: DupPlan | None, base: QuantSpec, extra: dict | None = None):
        if (table, label) in done:
            return
        key = json.dumps([None if plan is None else plan.to_dict(), base.to_dict(), label == "reference"], sort_keys=True)
        if key in memo:
            keep = ("table", "label", "control_of")
            row = {**{k: v for k, v in memo[key].items() if k not in keep}, "table": table, "label": label,
                   "same_build_as": memo[key]["label"], **(extra or {})}
            result["rows"].append(row)
            done.add((table, label))
            save()
            return
        t0 = time.time()
        if label == "reference":
            model, bpw = bench.fresh(), 16.0
            use_dense_prefill(model)
        else:
            model, bpw = bench.build(plan, base)
        build_s = time.time() - t0
        m = bench.measure(model)
        del model
        mx.clear_cache()
        row = {"table": table, "label": label, "bits_per_weight": bpw, **m, "build_seconds": build_s,
               "base": base.to_dict(), "plan": None if plan is None else plan.to_dict(),
               "layers_run": n + (0 if plan is None else sum(len(c) - 1 for c in plan.copies.values())), "key": key,
               **(extra or {})}
        memo[key] = row
        result["rows"].append(row)
        done.add((table, label))
        ref = next((r for r in result["rows"] if r["table"] == "ladder" and r["label"] == base_label), None)
        for r in result["rows"]:
            if ref and r.get("decode_tps"):
                r["latency_ratio"] = ref["decode_tps"] / r["decode_tps"]
        save()
        print(f"[{table}] {label}: bpw {bpw:.3f} ppl {m['ppl']:.3f} tps {m.get('decode_tps', 0):.1f} "
              f"(build {build_s:.0f}s, eval {m['eval_seconds']:.0f}s)", flush=True)

    if "ladder" in tables:
        run("ladder", "reference", None, base)
    for table in tables:
        if table == "score":
            score_table(bench, result, ranked, run, save, args.truth_windows, base, args.modes.split(","))
            continue
        # the 2-bit baseline first: every latency ratio is relative to it
        run("ladder", base_label, None, base)
        for label, plan, b in table_rows(table, n, ranked, base, [int(c) for c in args.copies.split(",")],
                                        args.ladder.split(","), args.modes.split(","),
                                        [float(e) for e in args.eps.split(",")]):
            run(table, label, plan, b)
            if plan is not None and plan.layers and not args.no_controls:
                cp = control_plan(plan, b)
                if all(c[0].quant == b for c in cp.copies.values()):  # no spec fits above the base: it IS the base
                    cp = None
                if cp is None:
                    run(table, f"{label} | equal-bits control: none above the base fits, the plain base", None, b,
                        {"control_of": label})
                    continue
                specs = sorted({c[0].quant.label() for c in cp.copies.values()})
                run(table, f"{label} | equal-bits control: {len(cp.copies)} layers at {'/'.join(specs)}", cp, b,
                    {"control_of": label})
    print(f"-> {out}")


def score_table(bench: Bench, result: dict, ranked, run, save, truth_windows: int, base: QuantSpec,
                modes=("parallel", "residual")) -> None:
    """Score vs measured truth (Spearman), and top-N by score vs the fixed last N."""
    n = bench.n_layers
    if "truth" not in result:
        t0 = time.time()
        truth = measured_truth(bench.fresh(), bench.calib[:truth_windows], base)
        result["truth"] = truth
        result["truth_seconds"] = time.time() - t0
        vals = [s["score"] for s in result["scores"]]
        result["spearman_score_vs_ppl_increase"] = spearman(vals, [t["ppl_increase"] for t in truth])
        result["spearman_score_vs_kl"] = spearman(vals, [t["kl"] for t in truth])
        save()
    by_truth = sorted(range(n), key=lambda k: -result["truth"][k]["kl"])
    top = scaled(n, 10)
    for name, layers in ((f"top {top} by score", sorted(ranked[:top])), (f"last {top}", list(range(n - top, n))),
                         (f"top {top} by measured truth (KL)", sorted(by_truth[:top]))):
        if "parallel" in modes:
            run("score", f"{name} x2 parallel", DupPlan(mode="parallel", copies={k: copies_of(2) for k in layers}), base)
        run("score", f"{name} x2 residual", DupPlan(mode="residual", copies={k: [CopySpec()] * 2 for k in layers}), base)
        cp = control_plan(DupPlan(mode="residual", copies={k: [CopySpec()] * 2 for k in layers}), base)
        run("score", f"{name} | equal-bits control at {cp.copies[layers[0]][0].quant.label()}", cp, base,
            {"control_of": f"{name} x2"})


if __name__ == "__main__":
    main()
