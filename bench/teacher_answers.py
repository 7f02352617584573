"""Time the e2e stage's teacher answers as a fresh machine makes them (the chat turns of ``convert --bpw``).

    MLX_DUPQ_CACHE=/tmp/empty-cache python bench/teacher_answers.py FLOAT_DIR \
        --out bench/results/teacher_answers_qwen2.5-coder-0.5b.json

``convert --bpw``'s e2e stage trains on chat turns whose answers the float teacher writes
(:mod:`mlx_dupq.refine.chat_data`); they are cached under ``$MLX_DUPQ_CACHE/chat`` and read back by every
later conversion, so a timed conversion on a machine that made them before leaves their time out. This runs
the stage's own step (``e2e._chat_conversations``) with ``convert --bpw``'s options (``auto._e2e``)
on FLOAT_DIR (a float model directory, as convert's teacher) and records the seconds, the number of
answers and their digest. Point ``MLX_DUPQ_CACHE`` at an empty directory to time the generation; the
answers are left there (compare them with the user cache's file of the same name: same options and
seed give the same bytes).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

from mlx_dupq._env import reexec_with_fast_blas

reexec_with_fast_blas()

from mlx_lm.utils import load_tokenizer  # noqa: E402

from mlx_dupq.auto import _e2e  # noqa: E402
from mlx_dupq.cache import cache_dir  # noqa: E402
from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.io.source import open_source  # noqa: E402
from mlx_dupq.refine import chat_data, e2e  # noqa: E402
from mlx_dupq.refine.e2e_spec import E2ESpec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("float_dir", type=Path, help="the float teacher (a model directory)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    spec = E2ESpec.from_dict(_e2e(None)[0])  # convert --bpw's own e2e options
    src = open_source(args.float_dir)
    cache = chat_data.cache_path(src.fingerprint(), spec.data, spec.seed, spec.chat_max_tokens, spec.chat_temp)
    cached = cache.is_file()
    t0 = time.time()
    convs, _ = e2e._chat_conversations(src, load_tokenizer(args.float_dir), spec, None)
    seconds = time.time() - t0
    write_result(args.out, {
        "command": "python bench/teacher_answers.py " + " ".join(sys.argv[1:]),
        "cache": str(cache_dir()), "cache_file": cache.name, "read_from_cache": cached,
        "seconds": seconds, "conversations": len(convs), "digest": chat_data.digest(convs),
        "chat_samples": spec.chat_samples, "seq_len": spec.seq_len, "max_tokens": spec.chat_max_tokens,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loadavg_end": os.getloadavg()})
    print(f"{len(convs)} conversations in {seconds:.0f} s ({'read from the cache' if cached else 'generated'})"
          f" -> {args.out}")


if __name__ == "__main__":
    main()
