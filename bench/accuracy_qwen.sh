#!/usr/bin/env bash
# Accuracy rows for Qwen2.5-Coder-0.5B (docs/learned.md "Accuracy"): the float reference, the old best
# hand recipe at <= 2.5 bpw (`w2-t3a4`, 2.49996 bpw, docs/quality.md) and the `convert --bpw 2.5` pack
# with its e2e stage (bench/results/learned_qwen2.5-coder-0.5b_mix.json row refine:auto:2.5), with the
# protocol of SmolLM2's eval_tasks_* / eval_agree_* files: 50 cloze + 50 next-sentence items from
# brown:eval; greedy agreement on the 8 built-in prompts x 32 tokens and next-token top-1 / KL on
# 4 x 256 tokens of brown:eval.
#   NEW=<the --bpw 2.5 pack> [WORK=/tmp/accrows] bash bench/accuracy_qwen.sh [ref|new|old ...]
set -euo pipefail
cd "$(dirname "$0")/.."
W=${WORK:-/tmp/accrows}
NEW=${NEW:-/tmp/dupq-learned2/qwen2.5-coder-0.5b/refine_auto_2.5}
OLD=$W/w2-t3a4
M=qwen2.5-coder-0.5b
for part in "${@:-ref new old}"; do for p in $part; do case $p in
  ref) mlx-dupq eval tasks $M --tasks cloze,mc --n 50 --json bench/results/eval_tasks_qwen2.5-coder-0.5b_ref.json ;;
  new) mlx-dupq eval tasks "$NEW" --tasks cloze,mc --n 50 --json bench/results/eval_tasks_qwen2.5-coder-0.5b_bpw2.5.json
       mlx-dupq eval agree $M "$NEW" --max-tokens 32 --windows 4 --ctx 256 --json bench/results/eval_agree_qwen2.5-coder-0.5b_bpw2.5.json ;;
  old) [ -f "$OLD/manifest.json" ] || mlx-dupq convert $M -r w2-t3a4 -o "$OLD"
       mlx-dupq eval tasks "$OLD" --tasks cloze,mc --n 50 --json bench/results/eval_tasks_qwen2.5-coder-0.5b_w2-t3a4.json
       mlx-dupq eval agree $M "$OLD" --max-tokens 32 --windows 4 --ctx 256 --json bench/results/eval_agree_qwen2.5-coder-0.5b_w2-t3a4.json ;;
  *) echo "error: unknown part $p (use ref, new, old)" >&2; exit 2 ;;
esac; done; done
