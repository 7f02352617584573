#!/usr/bin/env bash
# One command on a fresh machine: set up, fetch a model, convert it to a 2-bit-class pack, then
# perplexity of the reference and the pack side by side, and a generation from each for the same
# prompt.
#
# The model is Qwen2.5-Coder-0.5B with the `w2-t3` recipe (block-Hadamard rotation, GPTQ 3-bit groups
# of 128 on the decoder, ternary embedding and head: 2.60 bits/weight all-in, PPL 57.34 against the
# reference's 41.58 = 1.38x on brown:eval, 4 x 512 tokens: bench/results/quickstart_qwen2.5-coder-0.5b_epyc.json),
# not the built-in default SmolLM2-135M: at <= 3 bits/weight SmolLM2's best pack, `convert --bpw 3.0`
# with its end-to-end distillation stage, is 3.3x its reference (96.2 vs 29.3,
# bench/results/learned_smollm2-135m_bpw3.0_e2e.json) and answers the prompt below with nothing, or,
# with chat turns in the e2e stage (the default since), with a sentence that loops
# (bench/results/chat_eval_smollm2-135m.json; issue 14). `MODEL=default RECIPE=smollm2-gptq-mixed-3.0` shows SmolLM2 anyway;
# `BPW=3.0` converts with the automatic pipeline (`convert --bpw 3.0`) instead of RECIPE.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-qwen2.5-coder-0.5b}
RECIPE=${RECIPE:-w2-t3}
BPW=${BPW:-}
WINDOWS=${WINDOWS:-4}
OUT=${OUT:-packs/${MODEL}-${BPW:+bpw}${BPW:-$RECIPE}}
PROMPT=${PROMPT:-"Write one sentence about the sea."}
T0=$(date +%s)
step() { echo "$1 $(( $(date +%s) - T0 ))" >> "$OUT.steps"; }  # seconds since the start, per finished step
mkdir -p "$(dirname "$OUT")" && : > "$OUT.steps"
MLX_DUPQ_EXTRAS= MLX_DUPQ_CUDA_CHECK=0 bash scripts/setup.sh  # the library alone (no test extras, no NVRTC: only the tests need them)
step setup
mlx-dupq models fetch "$MODEL"
step fetch
if [ -n "$BPW" ]; then
  mlx-dupq convert "$MODEL" -o "$OUT" --bpw "$BPW" --force
else
  mlx-dupq convert "$MODEL" -o "$OUT" --recipe "$RECIPE" --force
fi
step convert
mlx-dupq eval ppl "$MODEL" --data brown:eval --ctx 512 --windows "$WINDOWS" --json "$OUT.reference-ppl.json"
mlx-dupq eval ppl "$OUT" --data brown:eval --ctx 512 --windows "$WINDOWS" --json "$OUT.ppl.json"
step eval
mlx-dupq inspect "$OUT" --json > "$OUT.inspect.json"
echo "--- reference: $PROMPT"
mlx-dupq generate "$MODEL" --prompt "$PROMPT" --max-tokens 40 | tee "$OUT.reference-generation.txt"
echo "--- pack ($OUT): $PROMPT"
mlx-dupq generate "$OUT" --prompt "$PROMPT" --max-tokens 40 | tee "$OUT.generation.txt"
step generate
# the summary: printed, and kept in $OUT.quickstart.json (bench/results/quickstart_*.json are copies)
python3 - "$OUT" "$MODEL" "${BPW:+--bpw $BPW}${BPW:---recipe $RECIPE}" "$PROMPT" <<'EOF'
import json, os, sys
out, model, how, prompt = sys.argv[1:]
ref, q = (json.load(open(f"{out}.{k}.json")) for k in ("reference-ppl", "ppl"))
bpw = json.load(open(f"{out}.inspect.json"))["bits_per_weight"]
steps = {k: int(v) for k, v in (line.split() for line in open(f"{out}.steps"))}
gen = {k: open(f"{out}.{k}generation.txt").read().strip() for k in ("reference-", "")}
print()
print(f"{'':12} {'bits/weight':>12} {'PPL brown:eval':>15}   ({q['windows']} x {q['ctx']} tokens)")
print(f"{'reference':12} {'32':>12} {ref['ppl']:15.2f}")
print(f"{'pack':12} {bpw:12.3f} {q['ppl']:15.2f}   ({q['ppl'] / ref['ppl']:.2f}x)")
print(f"wall time {steps['generate'] / 60:.1f} min, of which convert {(steps['convert'] - steps['fetch']) / 60:.1f} min")
load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None
record = {
    "command": f"MODEL={model} bash scripts/quickstart.sh  (convert {how})", "model": model, "convert": how,
    "data": "brown:eval", "ctx": q["ctx"], "windows": q["windows"], "tokens": q.get("tokens"),
    "reference_ppl": ref["ppl"], "pack": out, "bits_per_weight": bpw, "ppl": q["ppl"],
    "ratio": q["ppl"] / ref["ppl"], "prompt": prompt,
    "generation": {"reference": gen["reference-"], "pack": gen[""]},
    "seconds_since_start": steps, "cpus": os.cpu_count(), "loadavg_at_end": load,
    "machine": q.get("machine"),  # what `mlx-dupq eval ppl` ran on (CPU, BLAS, versions), from $OUT.ppl.json
}
with open(f"{out}.quickstart.json.tmp", "w") as f:
    json.dump(record, f, indent=1)
os.replace(f"{out}.quickstart.json.tmp", f"{out}.quickstart.json")
print(f"summary: {out}.quickstart.json")
EOF
