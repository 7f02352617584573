"""Why top-k of SmolLM2-135M's cut MLPs loses quality: per-layer MLP output error of the cut.

    python bench/moe_split_probe.py                  # -> bench/results/moe_smollm2_split_probe.json
    python bench/moe_split_probe.py --layers 4,16,28 --tokens 4096

For a few layers of the dense model (inputs from the dense model itself, on brown:calib windows drawn
with seed 0), each layer is cut with :func:`mlx_dupq.moe.from_dense.split_layer` on the first
``--tokens`` tokens and measured on the remaining (held-out) calibration tokens: relative error
``||block(x) - mlp(x)|| / ||mlp(x)||`` of the MoE block with

- the trained router (the gate as built: softmax top-k, the fitted temperature and scale);
- an oracle router (the k routed experts with the largest outputs ``||E_i(x)||``, weight 1);
- per-neuron oracle (no experts: the same share of the MLP's neurons, the largest contributions of
  each token), the error floor of any cut into experts at that active share.

Each config is (neurons per expert, shared experts, top-k), with the router trained for
``router_steps``. No perplexity here (bench/moe_from_dense.py has it); this is the diagnosis.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from mlx_dupq._env import reexec_with_fast_blas

reexec_with_fast_blas()

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_dupq.eval.data import calibration_batches, load_text  # noqa: E402
from mlx_dupq.io.atomic import write_result  # noqa: E402
from mlx_dupq.io.loader import _tokenizer, load_model  # noqa: E402
from mlx_dupq.moe import from_dense as F  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = [(96, 4, 8, 150), (96, 4, 8, 600), (96, 8, 4, 150), (48, 8, 16, 150), (32, 12, 24, 150), (96, 4, 9, 150),
           (96, 4, 10, 150)]


def rel(a: mx.array, b: mx.array) -> float:
    return float(mx.linalg.norm(a - b) / mx.linalg.norm(b))


def probe_layer(mlp, xtr: mx.array, xte: mx.array, seed: int) -> dict:
    down = mlp.down_proj.weight
    inter = down.shape[1]
    acts = F.neuron_activations(mlp, xte)
    full = acts @ down.T
    contrib = np.array(F.contributions(acts, down))
    out = {"neuron_oracle": {}, "configs": []}
    for share in (0.75, 0.8125, 0.875):
        m = int(round(inter * share))
        thr = np.partition(contrib, inter - m, axis=1)[:, inter - m][:, None]
        out["neuron_oracle"][str(share)] = rel((acts * mx.array((contrib >= thr).astype(np.float32))) @ down.T, full)
    for unit, n_shared, k, steps in CONFIGS:
        t0 = time.perf_counter()
        cfg = replace(F.SMOLLM2_135M_MOE, unit=unit, n_shared=n_shared, top_k=k, router_steps=steps)
        E = cfg.n_routed(inter)
        split, st = F.split_layer(mlp, xtr, cfg, E, seed)
        d = F.down_cat(down, split)
        z = F.gated_activations(xte, split, k, acts)
        pick = F.router_targets(F.expert_outputs_norm(acts, down, split.experts), k) * k  # (T, E) 0/1
        routed = acts[:, mx.array(split.experts.reshape(-1))].reshape(-1, E, unit) * pick[..., None]
        zo = mx.concatenate([acts[:, mx.array(split.shared)], routed.reshape(-1, E * unit)], axis=1)
        do = mx.concatenate([d[: len(split.shared)], d[len(split.shared):] / split.scale], axis=0)
        out["configs"].append({"unit": unit, "n_shared": n_shared, "experts": E, "k": k, "router_steps": steps,
                               "active_share": (n_shared + k) * unit / inter,
                               "router_loss": st["router_loss"], "router_recall_train": st["router_recall"],
                               "err_router": rel(z @ d, full), "err_oracle": rel(zo @ do, full),
                               "seconds": round(time.perf_counter() - t0, 1)})
    return out


def fail(msg: str) -> None:
    """Bad input: one line on stderr, exit status 2, nothing written."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default="smollm2-135m")
    ap.add_argument("--layers", default="4,16")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens the cut is fitted on")
    ap.add_argument("--held-out", type=int, default=2048, help="further calibration tokens it is measured on")
    ap.add_argument("--out", default=str(RESULTS / "moe_smollm2_split_probe.json"))
    args = ap.parse_args()
    try:
        layers = sorted({int(v) for v in args.layers.split(",")})
    except ValueError:
        fail(f"--layers takes comma-separated layer numbers, got {args.layers!r}")
    if args.tokens < 256 or args.held_out < 256:
        fail("--tokens and --held-out must be at least 256 (one window)")
    t0 = time.perf_counter()
    dense, conf, tok_dir = load_model(args.dense)
    if not layers or layers[0] < 0 or layers[-1] >= len(dense.model.layers):
        fail(f"--layers must be in 0..{len(dense.model.layers) - 1}")
    tok = _tokenizer(Path(tok_dir), conf)
    n = -(-(args.tokens + args.held_out) // 256)
    h = dense.model.embed_tokens(calibration_batches(tok, load_text("brown:calib"), n, 256, 0))
    H = h.shape[-1]
    res = {}
    for i, layer in enumerate(dense.model.layers[: layers[-1] + 1]):
        a = h + layer.self_attn(layer.input_layernorm(h), mask="causal")
        x = layer.post_attention_layernorm(a).reshape(-1, H)
        h = a + layer.mlp(x).reshape(h.shape)
        mx.eval(h)
        if i in layers:
            res[str(i)] = probe_layer(layer.mlp, x[: args.tokens], x[args.tokens : args.tokens + args.held_out], i)
            print(f"layer {i}: " + "; ".join(f"{c['unit']}x{c['n_shared']}+top-{c['k']}/{c['experts']} "
                                             f"router {c['err_router']:.3f} oracle {c['err_oracle']:.3f}"
                                             for c in res[str(i)]["configs"]), flush=True)
    data = {"command": "python bench/moe_split_probe.py " + " ".join(sys.argv[1:]), "dense": args.dense,
            "calib": "brown:calib", "fit_tokens": args.tokens, "held_out_tokens": args.held_out, "layers": res,
            "seconds": round(time.perf_counter() - t0, 1), "loadavg": [round(v, 2) for v in os.getloadavg()]}
    out = Path(args.out)
    write_result(out, data)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
