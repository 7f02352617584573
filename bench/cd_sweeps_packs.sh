#!/bin/bash
# The whole-pack check of docs/quality.md "Coordinate descent after GPTQ": SmolLM2-135M converted with the gptq2
# study recipe and with bench/gptq2_cd4.toml (the same + cd_sweeps = 4), then brown:eval PPL (ctx 512, 8 windows).
# Run from the repository root: nice -n 5 bash bench/cd_sweeps_packs.sh  (packs and timings under /tmp/cdquant/)
set -e
mkdir -p /tmp/cdquant
export PYTHONPATH=$PWD OPENBLAS_NUM_THREADS=1
for r in gptq2 bench/gptq2_cd4.toml; do
  n=$(basename $r .toml)
  cat /proc/loadavg
  /usr/bin/time -v python3 -m mlx_dupq.cli convert smollm2-135m -r $r -o /tmp/cdquant/pack_$n --force 2> /tmp/cdquant/time_convert_$n.txt
  tail -25 /tmp/cdquant/time_convert_$n.txt | grep -E "User time|System time|Elapsed"
done
for n in gptq2 gptq2_cd4; do
  cat /proc/loadavg
  python3 -m mlx_dupq.cli eval ppl /tmp/cdquant/pack_$n --data brown:eval --ctx 512 --windows 8 --json bench/results/cd_sweeps_ppl_smollm2-135m_$n.json
done
echo DONE
