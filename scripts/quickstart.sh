#!/usr/bin/env bash
# One command on a fresh machine: set up, convert the built-in default model (SmolLM2-135M-Instruct)
# to 2 bits (rotation + GPTQ, ~5-8 minutes on 2 CPU cores), measure its perplexity next to the
# full-precision reference, and generate from it.
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=${RECIPE:-smollm2-gptq-mixed-3.0}  # best measured for the default model: PPL ~260 at 3.0 bpw (bench/results/ladder_smollm2-135m-mixed.json)
OUT=${OUT:-packs/smollm2-135m-${RECIPE}}
MLX_DUPQ_CUDA_CHECK=0 bash scripts/setup.sh  # (no NVRTC: only the tests need it)
mlx-dupq models fetch default
mlx-dupq convert default -o "$OUT" --recipe "$RECIPE" --force
mlx-dupq inspect "$OUT" --json | python3 -c 'import json,sys; print("all-in bits/weight:", round(json.load(sys.stdin)["bits_per_weight"], 3))'
mlx-dupq eval ppl default --data brown:eval --ctx 512 --windows 8 --json "$OUT.reference-ppl.json"
mlx-dupq eval ppl "$OUT" --data brown:eval --ctx 512 --windows 8 --json "$OUT.ppl.json"
mlx-dupq generate "$OUT" --prompt "Write one sentence about the sea." --max-tokens 40
