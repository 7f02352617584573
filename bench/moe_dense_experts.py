"""The CPU dense-experts path of MoE blocks against mlx-lm's gather path, on a MoE pack.

    python bench/moe_dense_experts.py --pack PACK [--layer 5] [--tokens 256] [--repeats 3] \
        --out bench/results/moe_dense_experts_smollm2-135m-moe.json

Two timings, each the fastest of ``--repeats`` after a warm-up run, fp32 on the CPU:

- ``block``: forward + backward (gradients of the block's switch layers' scales) of one MoE block
  (``model.layers.<layer>.mlp.switch_mlp``) on ``--tokens`` random hidden states, the router's own
  top-k picks: :class:`mlx_dupq.layers.cpu.DensePrefillSwitchGLU` against mlx-lm's ``SwitchGLU``;
- ``model``: one forward pass of the whole pack over ``--tokens`` tokens, every MoE block on one path
  or the other; with the largest difference of the logits between the two paths.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mlx_dupq._env import reexec_with_fast_blas

reexec_with_fast_blas()

import mlx.core as mx  # noqa: E402
from mlx_lm.models.switch_layers import SwitchGLU  # noqa: E402

from mlx_dupq.errors import DupqError  # noqa: E402
from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.io.loader import load  # noqa: E402
from mlx_dupq.layers.cpu import DensePrefillSwitchGLU  # noqa: E402


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", required=True)
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.tokens < 16 or a.repeats < 1:
        raise DupqError("--tokens must be >= 16 and --repeats >= 1")
    model, _ = load(a.pack)
    blocks = [m for _, m in model.named_modules() if isinstance(m, SwitchGLU)]
    if not blocks:
        raise DupqError(f"{a.pack} has no MoE block (mlx-lm SwitchGLU)")
    moe = model.model.layers[a.layer].mlp
    sw = moe.switch_mlp
    x = mx.random.normal((1, a.tokens, moe.gate.weight.shape[-1]), key=mx.random.key(0))
    inds, _ = moe.gate(x)
    projs = ("up_proj", "gate_proj", "down_proj")
    params = {n: getattr(sw, n)["scales"] for n in projs}

    def loss(p):
        for n, s in p.items():
            getattr(sw, n).scales = s
        return (sw(x, inds) ** 2).mean()

    grad = mx.value_and_grad(loss)
    toks = mx.array([[(17 * i) % 1000 + 100 for i in range(a.tokens)]])
    out = {"pack": str(a.pack), "layer": a.layer, "tokens": a.tokens, "repeats": a.repeats,
           "experts": sw.up_proj.num_experts, "top_k": int(inds.shape[-1]),
           "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}
    logits = {}
    for name, cls in (("dense", DensePrefillSwitchGLU), ("gather", SwitchGLU)):
        for b in blocks:
            b.__class__ = cls
        out[f"block_{name}_s"] = _best(lambda: mx.eval(grad(params)), a.repeats)
        out[f"model_{name}_s"] = _best(lambda: mx.eval(model(toks)), a.repeats)
        logits[name] = model(toks)
    out["max_logit_diff"] = float(mx.abs(logits["dense"] - logits["gather"]).max())
    out["max_logit"] = float(mx.abs(logits["gather"]).max())
    write_result(a.out, out)
    print(f"block fwd+bwd: dense {out['block_dense_s'] * 1e3:.0f} ms, gather {out['block_gather_s'] * 1e3:.0f} ms; "
          f"model forward: dense {out['model_dense_s']:.2f} s, gather {out['model_gather_s']:.2f} s; "
          f"max logit difference {out['max_logit_diff']:.2e} (of {out['max_logit']:.1f})")


if __name__ == "__main__":
    try:
        main()
    except DupqError as e:
        sys.exit(f"error: {e}")
