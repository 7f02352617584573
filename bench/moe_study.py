"""MoE studies (SPEC F6.1-F6.7) on a trained MoE model; writes bench/results/moe_*.json and MOE_REPORT.md.

    python bench/moe_study.py                       # tiny-deepseek-moe, every part (~15-30 min on 2 cores)
    python bench/moe_study.py --parts stats,router  # some parts
    python bench/moe_study.py --report-only         # re-render MOE_REPORT.md + plots from the JSONs
    python bench/moe_study.py --model smollm2-135m-moe  # the MoE cut from SmolLM2-135M: moe_smollm2_*.json,
                                                        # MOE_REPORT_smollm2.md (see --prefix)

Parts (one JSON each, ``bench/results/moe_<part>.json``):
  stats        routing frequency per expert and layer, hot/cold share, massive activations per expert,
               expert types from per-genre routing on Brown (F6.1)
  sensitivity  the seed's score (0.5 err + 0.3 grad + 0.2 freq) vs measured ablation importance,
               and PPL when one expert class alone is quantized to 2 bits (F6.2)
  router       router quantization at 8/4/2 bits per layer and end to end, router bias
               recalibration from expert degradation, router temperature (F6.3)
  ladder       real packs (rtn8/4/3/2, moe-w2; all-in bpw) and simulated expert treatments:
               INT2 experts plain / Hadamard / DFRot / duplication (30 %) / Hadamard + duplication (F6.4-F6.5)
  layers       per-layer effect of treating one layer's experts (F6.6 seed table "per-layer")
  topk         top-k reduction vs quantization at matched weight bytes per token, dynamic k from
               router entropy, fallback expert (F6.6)
  agreement    routing agreement of each pack with the float model (F6.7)
  contribution how much the float model leans on its MoE blocks: PPL without the routed experts, with
               k experts drawn at random (router scores kept), without the shared experts, without both
  packs        only convert and evaluate --packs (bpw, PPL, ratio to the float model); auto-<bpw> is the
               plan of `mlx-dupq convert MODEL --bpw <bpw> --e2e-steps 0`
  pack_parts   the modules of one pack (--parts-pack) swapped into the float model one part at a time
               (embedding, lm_head, attention, dense MLP, shared experts, routed experts)

Simulated treatments replace float weights by their dequantized values (:mod:`mlx_dupq.moe.experts`):
same numbers the packed layers compute with, without a conversion per variant. Perplexity: brown:eval,
non-overlapping windows of --ctx tokens (--windows of them), float32 on the CPU.
The study itself is mlx_dupq/moe/study.py (Study, StudySettings); this script is its command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mlx_dupq._env import reexec_with_fast_blas

reexec_with_fast_blas()

from mlx_dupq.errors import DupqError  # noqa: E402
from mlx_dupq.moe.study import (PACK_RECIPES, PARTS, Study, StudySettings, check_packs, check_parts,  # noqa: E402
                                default_prefix, log)
from mlx_dupq.report.moe import write_report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    d = StudySettings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--ctx", type=int, default=d.ctx)
    ap.add_argument("--windows", type=int, default=d.windows)
    ap.add_argument("--calib-samples", type=int, default=d.calib_samples)
    ap.add_argument("--sens-samples", type=int, default=d.sens_samples)
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--genre-tokens", type=int, default=d.genre_tokens)
    ap.add_argument("--dup-budget", type=float, default=d.dup_budget)
    ap.add_argument("--dfrot-steps", type=int, default=d.dfrot_steps)
    ap.add_argument("--dfrot-tokens", type=int, default=d.dfrot_tokens)
    ap.add_argument("--pack-dir", default=None, help="where packs are converted (default /tmp/<prefix>_packs)")
    ap.add_argument("--packs", default=",".join(PACK_RECIPES), help="pack recipes of the ladder / top-k / agreement parts")
    ap.add_argument("--parts-pack", default=d.parts_pack, help="the pack of the pack_parts part")
    ap.add_argument("--prefix", default=None, help="result files <prefix>_<part>.json (default: moe, moe_smollm2 for "
                    "smollm2-135m-moe)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--results", default=str(RESULTS), help="where the JSONs and the report go")
    args = ap.parse_args()
    results = Path(args.results)
    prefix = args.prefix or default_prefix(args.model)
    try:
        check_packs(args.packs)
        if not args.report_only:
            parts = [p.strip() for p in args.parts.split(",")]
            check_parts(parts)
            settings = StudySettings(
                model=args.model, ctx=args.ctx, windows=args.windows, calib_samples=args.calib_samples,
                sens_samples=args.sens_samples, seq_len=args.seq_len, genre_tokens=args.genre_tokens,
                dup_budget=args.dup_budget, dfrot_steps=args.dfrot_steps, dfrot_tokens=args.dfrot_tokens,
                pack_dir=args.pack_dir or f"/tmp/{prefix}_packs", packs=args.packs,
                parts_pack=args.parts_pack)
            cache = f"MLX_DUPQ_CACHE={os.environ['MLX_DUPQ_CACHE']} " if os.environ.get("MLX_DUPQ_CACHE") else ""
            st = Study(settings, results, prefix,
                       command=f"{cache}python bench/moe_study.py " + " ".join(sys.argv[1:]))
            for part in parts:
                log(f"part {part}")
                data = st.run_part(part)
                log(f"part {part} done in {data['meta']['seconds']:.0f}s")
                write_report(results, prefix)  # after every part: a partial run still leaves a report
    except DupqError as e:
        sys.exit(f"error: {e}")
    log(f"wrote {write_report(results, prefix)}")


if __name__ == "__main__":
    main()
