#!/usr/bin/env bash
# Decode/prompt speed, memory, size and all-in bpw of SmolLM2-135M: 2-bit and 4-bit RTN packs
# and the float reference, measured in one `mlx-dupq bench` run (CPU, float32 compute).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${WORK:-/tmp/dupq-speed}
mlx-dupq convert default -o "$W/smollm2-rtn2" --recipe rtn2 --force
mlx-dupq convert default -o "$W/smollm2-rtn4" --recipe rtn4 --force
mlx-dupq bench "$W/smollm2-rtn2" --against "$W/smollm2-rtn4" --against default \
  --prompt-tokens 128 --gen-tokens 64 --repeats 3 --json bench/results/bench_smollm2.json
