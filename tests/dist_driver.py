"""Run under ``mlx.launch`` by tests/test_distributed.py: for each pack, the pipeline's greedy tokens,
summed NLL (one pass and chunked through the KV cache) and per-rank memory; rank 0 writes JSON.

usage: python tests/dist_driver.py OUT.json PACK [PACK ...]
"""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import make_sampler

from mlx_dupq.distributed.comm import Session
from mlx_dupq.distributed.pipeline import Pipeline
from mlx_dupq.eval.pipelined import pipeline_nll, rank_memory

PROMPT = [1, 5, 9, 20, 33, 47, 60, 71, 2, 8, 15, 40]
GEN_TOKENS = 16
CTX = 32
IDS = np.random.default_rng(0).integers(0, 300, 3 * CTX).astype(np.int32)


def main(out: str, packs: list[str]) -> None:
    results = {}
    with Session(timeout=120) as s:
        for path in packs:
            mx.clear_cache()
            pipe = Pipeline.load(path, s)
            tokens = list(pipe.generate(PROMPT, GEN_TOKENS, make_sampler(temp=0.0)))
            nll, _ = pipeline_nll(pipe, IDS, CTX, None, None)
            nll_chunked, _ = pipeline_nll(pipe, IDS, CTX, None, 8)
            results[path] = {"tokens": tokens, "nll": nll, "nll_chunked": nll_chunked,
                             "per_rank": rank_memory(pipe, [int(mx.get_peak_memory())])}
            del pipe
        if s.rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
