#!/usr/bin/env bash
# CPU decode speed of SmolLM2-135M, one `mlx-dupq bench` run (float32 compute, 2 cores):
#  - our 2-bit pack (rtn2: linears 2-bit g64, embedding/lm_head 8-bit),
#  - mlx-lm's own 4-bit of the same model (`mlx_lm convert -q --q-bits 4`, g64, embeddings too),
#  - a duplicated pack (dup-residual2: last 25 % of layers as 2 residual copies) whose base is rtn2,
#  - the float model.
# `--dup-base` makes the bench report the duplication overhead (extra time per generated token)
# next to the share of linear FLOPs the copies add.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${WORK:-/tmp/dupq-speed}
mkdir -p "$W"
if [ ! -f "$W/smollm2-float/config.json" ]; then
  python3 -c "import sys; from mlx_dupq.io.source import open_source, write_hf_dir; write_hf_dir(open_source('default'), sys.argv[1], 'float16')" "$W/smollm2-float"
fi
rm -rf "$W/smollm2-mlx4"
python3 -m mlx_lm convert --hf-path "$W/smollm2-float" --mlx-path "$W/smollm2-mlx4" -q --q-bits 4 --q-group-size 64
mlx-dupq convert default -o "$W/smollm2-rtn2" --recipe rtn2 --force
mlx-dupq convert default -o "$W/smollm2-dup2" --recipe dup-residual2 --force
mlx-dupq bench "$W/smollm2-rtn2" --against "$W/smollm2-mlx4" --against "$W/smollm2-dup2" --against default \
  --dup-base "$W/smollm2-rtn2" --prompt-tokens 128 --gen-tokens 64 --repeats 3 --json bench/results/bench_smollm2.json
