"""Packs across processes and machines with ``mx.distributed`` (pipeline parallelism).

- :mod:`.split`: which rank holds which decoder layers, balanced by measured bytes;
- :mod:`.stage`: one rank's modules, loaded from only its tensors;
- :mod:`.comm`: the process group, and one-line exits when a peer dies or hangs;
- :mod:`.pipeline`: the forward pass across ranks, generation with per-rank KV caches.

Perplexity and speed over a pipeline are in :mod:`mlx_dupq.eval.pipelined`; ``docs/distributed.md``
says how to launch on several Macs.
"""
